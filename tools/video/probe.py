"""Does a video checkpoint place shapes by the prompt? ``python -m tools.video.probe DIR``.

Seconds instead of the evaluator's minutes. At sigma ~1 the transformer sees only noise,
so its clean-video prediction ``x0 = x_t - sigma * v`` is where it *intends* to put
things, and only the prompt can say where. For pairs of prompts that differ in one
attribute (the start and end cells, the colour, the kind) this prints how far apart the
two predictions are, from the same noise, relative to the prediction's own size:

- ``position``: "from the left to the right" against "from the right to the left", ...
- ``colour``: "a red circle" against "a green circle" (same cells);
- ``kind``: "a red circle" against "a red square".

A model that ignores its position words shows ``position`` near 0 while ``colour`` is
well above it: it then places the shape wherever the noise suggests (the video model
until ~14,000 steps; docs/default-model.md has the column over its training).
"""

from __future__ import annotations

import argparse

import torch

from tools.video.components import SERVING_DEFAULTS

SIGMA = 0.999
BACKGROUND = "on a blue background"
MOVING = "a red circle moving from the left to the right"
STILL = "a green square at the top left"
DOWN = "a red circle moving from the top to the bottom"
PAIRS = {
    "position": [
        (MOVING, "a red circle moving from the right to the left"),
        (DOWN, DOWN.replace("top to the bottom", "bottom to the top")),
        (STILL, "a green square at the bottom right"),
    ],
    "colour": [(MOVING, MOVING.replace("red", "green")), (STILL, STILL.replace("green", "yellow"))],
    "kind": [
        (MOVING, MOVING.replace("circle", "square")),
        (STILL, STILL.replace("square", "triangle")),
    ],
}  # fmt: skip


@torch.no_grad()
def separations(path: str, seeds: int = 4) -> dict[str, float]:
    """Mean relative distance between the two x0 predictions of each pair, per attribute."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, torch_dtype=torch.float32)
    d = SERVING_DEFAULTS  # the size the model was trained at; 8x spatial, 4x temporal VAE
    shape = (seeds, pipe.transformer.config.in_channels, (d["num_frames"] - 1) // 4 + 1,
             d["height"] // 8, d["width"] // 8)  # fmt: skip
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    timestep = torch.full((seeds,), SIGMA * 1000)

    def x0(prompt: str) -> torch.Tensor:
        emb, _ = pipe.encode_prompt(
            f"{prompt} {BACKGROUND}", do_classifier_free_guidance=False, num_videos_per_prompt=seeds
        )
        v = pipe.transformer(
            hidden_states=SIGMA * noise, timestep=timestep, encoder_hidden_states=emb,
            return_dict=False,
        )[0]  # fmt: skip
        return noise - SIGMA * v

    out = {}
    for attribute, pairs in PAIRS.items():
        dist = []
        for a, b in pairs:
            pa, pb = x0(a), x0(b)
            dist.append(((pa - pb).flatten(1).norm(dim=1) / pa.flatten(1).norm(dim=1)).mean())
        out[attribute] = float(torch.stack(dist).mean())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", help="checkpoint (default: the shipped video model)")
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    if args.model is None:
        from ithaca.models.shapes import shipped_video_checkpoint_path

        args.model = str(shipped_video_checkpoint_path())
    for attribute, value in separations(args.model, args.seeds).items():
        print(f"{attribute:10s} {value:.3f}")


if __name__ == "__main__":
    main()
