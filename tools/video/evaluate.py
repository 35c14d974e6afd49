"""Prompt adherence of a video checkpoint: ``python -m tools.video.evaluate [--model DIR]``.

Draws N held-out clips (layouts training never saw), generates one clip per prompt
through ithaca's own ``WanPipeline`` (``load_pipeline``, one process) and checks its
first and last frames with the image checker (:mod:`tools.shapes.analysis`) against
the clip's first and last state:

- **background**: right on both frames;
- **colour**: the start colour found on the first frame and the end colour on the last;
- **kind**: right on both frames;
- **start** / **end**: the shape's cell on the first / last frame.

``--vae-roundtrip`` checks the ground truth through the VAE instead (the ceiling).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from tools.shapes import analysis
from tools.shapes import evaluate as shapes_evaluate
from tools.shapes.evaluate import Case
from tools.video import clips

ATTRIBUTES = ("background", "color", "kind", "start", "end")
TARGETS = {"background": 0.95, "color": 0.85, "kind": 0.40, "start": 0.80, "end": 0.80}
"""Held-out accuracy the shipped video model should reach per attribute. Kind is capped by
the VAE at 64x64 (a small shape is 2x2 latents): the ground truth through it scores 46%."""
HELDOUT_SEED = 1234


def heldout_cases(n: int, seed: int = HELDOUT_SEED) -> list[Case]:
    """``n`` held-out clips, each with one wording and a generation seed."""
    return shapes_evaluate.heldout_cases(n, seed, clips.sample_clip, clips.describe)


def check(frames: np.ndarray, clip: clips.Clip) -> dict[str, bool]:
    """One clip's ``(F, H, W, 3)`` uint8 frames against its ground truth."""
    first = analysis.check(Image.fromarray(frames[0]), clip.frame_scene(last=False))
    last = analysis.check(Image.fromarray(frames[-1]), clip.frame_scene(last=True))
    a, b = first.shapes[0], last.shapes[0]
    return {
        "background": first.background and last.background,
        "color": a["color"] and b["color"],
        "kind": a["kind"] and b["kind"],
        "start": a["position"],
        "end": b["position"],
    }


def accuracy(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    out = {k: float(np.mean([v[k] for v in verdicts])) for k in ATTRIBUTES}
    out["all"] = float(np.mean([all(v.values()) for v in verdicts]))
    return out


def generate(
    model: str, cases: list[Case], steps: int | None = None, guidance: float | None = None
) -> list[np.ndarray]:
    """Clips from ithaca's pipeline at the checkpoint's declared defaults (or these)."""
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel.state import ParallelState
    from ithaca.types import GenerationParams

    pipe = load_pipeline(model, ParallelState.single())
    params = [
        GenerationParams(
            prompt=c.prompt, seed=c.seed, num_inference_steps=steps, guidance_scale=guidance
        )
        for c in cases
    ]
    return [r.frames for r in pipe.generate(params)]


def vae_roundtrip(cases: list[Case]) -> list[np.ndarray]:
    """The ground truth encoded and decoded by the video VAE: the checker's ceiling."""
    import torch

    from tools.video.train import load_image_vae
    from tools.video.vae import from_image_vae

    vae = from_image_vae(load_image_vae())
    x = torch.from_numpy(clips.to_video_tensor([clips.render_clip(c.scene) for c in cases]))
    with torch.no_grad():
        video = vae.decode(vae.encode(x).latent_dist.mode()).sample  # (B, 3, F, H, W)
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(frames.permute(0, 2, 3, 4, 1).numpy())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the shipped video model)")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: declared)")
    p.add_argument("--vae-roundtrip", action="store_true")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    cases = heldout_cases(args.n)
    if args.vae_roundtrip:
        videos = vae_roundtrip(cases)
    else:
        from ithaca.models.shapes import shipped_video_checkpoint_path

        videos = generate(
            args.model or shipped_video_checkpoint_path(), cases, args.steps, args.guidance
        )
    acc = accuracy([check(v, c.scene) for v, c in zip(videos, cases, strict=True)])
    for k, v in acc.items():
        target = TARGETS.get(k)
        mark = (
            ""
            if target is None
            else f"  (target {target:.0%}: {'met' if v >= target else 'NOT met'})"
        )
        print(f"{k:12s} {v:6.1%}{mark}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "accuracy": acc, "targets": TARGETS}, f, indent=2)
    return 0 if all(acc[k] >= t for k, t in TARGETS.items()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
