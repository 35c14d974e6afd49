"""Train the default video model: ``python -m tools.video.train --out DIR``.

Stages (each logs to ``DIR/log.jsonl``):

1. **VAE**: none to train. The shipped image model's VAE becomes a Wan VAE with 4x
   temporal compression (:mod:`tools.video.vae`): latent frame ``k`` is the image
   latent of video frame ``4k``.
2. **Latent bank**: ``--bank`` training clips (never held-out ones) rendered at 64x64,
   17 frames, and encoded once (posterior mean, normalised as the pipeline
   normalises: ``(z - latents_mean) / latents_std``), shape ``(N, 16, 5, 8, 8)``.
3. **Transformer + text encoder**, jointly: flow matching on exactly what
   ``WanPipeline`` feeds the transformer: the UMT5 states of the real tokens
   zero-padded to 512, ``x_t = (1 - s) x_0 + s n``, ``timestep = 1000 s`` (the UniPC
   flow timesteps), target ``n - x_0``. 10% of prompts are dropped to ``""`` (the
   pipeline's default negative prompt) for classifier-free guidance. The image
   model's lessons: a quarter of the sigmas in [0.85, 1) (``sample_sigmas``), EMA of the
   weights, linear warm-up then cosine decay. Every ``--save-every`` steps the EMA
   weights are written to ``DIR/checkpoint`` (fp16) and probed for adherence.

Deterministic given ``--seed`` and the thread count. ``--reuse RUN`` takes the bank of
an earlier run; ``--init CHECKPOINT`` starts the transformer and text encoder from a saved
checkpoint (its EMA weights) instead of random ones, with a fresh optimiser, warm-up and
cosine schedule: how a run is continued past its planned length.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ithaca.models.shapes import shipped_checkpoint_path
from tools.shapes.train import EMA, Log, lr_at, sample_sigmas, single_frame, start_run
from tools.shapes.vocabulary import known_words
from tools.video import clips, components
from tools.video.vae import from_image_vae

MAX_SEQUENCE_LENGTH = 512
BANK_FILE = "bank.pkl"
KEY_FRAMES = list(range(0, clips.FRAMES, 4))


def load_image_vae():
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(shipped_checkpoint_path(), subfolder="vae")
    return vae.float().eval().requires_grad_(False)


@torch.no_grad()
def encode_clips(image_vae, batch: list[clips.Clip]) -> torch.Tensor:
    """Normalised latents ``(B, 16, 5, 8, 8)`` exactly as the pipeline's clean latents.

    The video VAE's latent frame ``k`` is the image VAE's latent of frame ``4k``
    (:mod:`tools.video.vae`; equal to 1e-6, tested), so only the key frames are encoded,
    one by one with 2-D convolutions."""
    x = [clips.render_clip(c, only=KEY_FRAMES) for c in batch]
    x = torch.from_numpy(clips.to_video_tensor(x))  # (B, 3, 5, H, W)
    b, _, _, h, w = x.shape
    keys = x.transpose(1, 2).reshape(-1, 3, 1, h, w)  # (B * 5, 3, 1, H, W)
    with single_frame(image_vae):
        z = image_vae.encode(keys).latent_dist.mean  # (B * 5, 16, 1, h, w)
    z = z.view(b, len(KEY_FRAMES), *z.shape[1:]).squeeze(3).transpose(1, 2)  # (B, 16, 5, h, w)
    cfg = image_vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def build_bank(vae, n: int, rng: random.Random, split: str = "train"):
    items = [clips.sample_clip(rng, split) for _ in range(n)]
    latents = [encode_clips(vae, items[i : i + 32]) for i in range(0, n, 32)]
    return items, torch.cat(latents)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """``WanPipeline``'s prompt states for a batch: (B, 512, D), zero past each prompt's
    real tokens (the encoder runs on the longest prompt only; the mask makes it equal)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = [prompt_clean(p) for p in prompts]  # as WanPipeline cleans them
    tokens = tokenizer(
        texts,
        padding="longest",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    hidden = hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.pad(hidden, (0, 0, 0, MAX_SEQUENCE_LENGTH - hidden.shape[1]))


def flow_loss(models, x0, prompts, sigmas, noise) -> torch.Tensor:
    tokenizer, text_encoder, transformer = models
    emb = encode_prompts(tokenizer, text_encoder, prompts)
    s = sigmas.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(
        hidden_states=xt, timestep=sigmas * 1000, encoder_hidden_states=emb, return_dict=False
    )[0]
    return F.mse_loss(pred, noise - x0)


def draw(bank, rng: random.Random, b: int, drop: float):
    items, latents = bank
    idx = [rng.randrange(len(items)) for _ in range(b)]
    prompts = ["" if rng.random() < drop else clips.describe(items[i], rng) for i in idx]
    return latents[idx], prompts


@torch.no_grad()
def validation_loss(models, val, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    items, latents = val
    total = 0.0
    for i in range(0, len(items), 64):
        x0 = latents[i : i + 64]
        prompts = [clips.describe(c, rng) for c in items[i : i + 64]]
        sig = sample_sigmas(x0.shape[0], gen)
        noise = torch.randn(x0.shape, generator=gen)
        total += flow_loss(models, x0, prompts, sig, noise).item() * x0.shape[0]
    return total / len(items)


def vocabulary() -> list[str]:
    return sorted(known_words(video=True))


def train(args, models, vae, bank, val, log: Log, out: Path) -> None:
    tokenizer, text_encoder, transformer = models
    params = [p for m in (text_encoder, transformer) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(params, args.ema)
    rng = random.Random(args.seed + 500)
    gen = torch.Generator().manual_seed(args.seed + 600)
    text_encoder.train()
    transformer.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.lr, args.warmup)
        x0, prompts = draw(bank, rng, args.batch, 0.1)
        sig = sample_sigmas(x0.shape[0], gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(models, x0, prompts, sig, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % 50 == 0:
            log(stage="transformer", step=step, loss=loss.item(), seconds=time.time() - start)
        if step % args.save_every == 0 or step == args.steps:
            with ema.applied():
                text_encoder.eval()
                transformer.eval()
                val_loss = validation_loss(models, val, args.seed + 1)
                path = components.save_checkpoint(
                    out / "checkpoint", tokenizer, text_encoder, vae, transformer, vocabulary()
                )
                text_encoder.train()
                transformer.train()
            log(stage="ema", step=step, val_loss=val_loss, seconds=time.time() - start)
            print(f"step {step}: val {val_loss:.4f}, saved {path}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bank", type=int, default=4000, help="training clips encoded once")
    p.add_argument("--val", type=int, default=128, help="held-out clips for the val loss")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--reuse", help="an earlier run directory whose bank to use")
    p.add_argument("--init", help="a checkpoint to start the transformer and text encoder from")
    p.add_argument("--ship", action="store_true", help="copy the result into the package")
    p.add_argument("--ship-only", metavar="CHECKPOINT", help="only copy it into the package")
    args = p.parse_args(argv)
    if args.ship_only:
        print(f"shipped {ship(Path(args.ship_only))}")
        return
    torch.set_num_threads(args.threads)
    out, log, start = start_run(args)
    image_vae = load_image_vae()
    vae = from_image_vae(image_vae)
    if args.reuse:
        with (Path(args.reuse) / BANK_FILE).open("rb") as f:
            bank, val = pickle.load(f)
    else:
        bank = build_bank(image_vae, args.bank, random.Random(args.seed + 400))
        val = build_bank(image_vae, args.val, random.Random(args.seed + 1), "heldout")
        with (out / BANK_FILE).open("wb") as f:
            pickle.dump((bank, val), f)
    log(stage="time", what="bank", seconds=time.time() - start)
    tokenizer = components.build_tokenizer(vocabulary())
    text_encoder = components.build_text_encoder(len(tokenizer), args.seed)
    transformer = components.build_transformer(args.seed)
    if args.init:
        init_from(Path(args.init), text_encoder, transformer)
    models = (tokenizer, text_encoder, transformer)
    train(args, models, vae, bank, val, log, out)
    log(stage="time", what="transformer", seconds=time.time() - start)
    (out / "done.json").write_text(json.dumps({"minutes": (time.time() - start) / 60}) + "\n")
    if args.ship:
        print(f"shipped {ship(out / 'checkpoint')}")


def init_from(checkpoint: Path, text_encoder, transformer) -> None:
    """Load a saved checkpoint's (fp16) weights into the fp32 models, every key."""
    from safetensors.torch import load_file

    for name, module in (("text_encoder", text_encoder), ("transformer", transformer)):
        state = {}
        for f in sorted((checkpoint / name).glob("*.safetensors")):
            state.update(load_file(f))
        own = module.state_dict()
        missing = module.load_state_dict(
            {k: v.to(own[k].dtype) for k, v in state.items()}, strict=False
        ).missing_keys
        tied = {"encoder.embed_tokens.weight"}  # UMT5 ties it to ``shared.weight``
        if set(missing) - tied or state.keys() - own.keys():
            raise ValueError(f"{checkpoint / name} does not fit: missing {missing}")


def ship(checkpoint: Path) -> Path:
    """Replace the package's video checkpoint with ``checkpoint`` (a saved run's)."""
    import shutil

    from ithaca.models.shapes import VIDEO_CHECKPOINT_DIR

    shutil.rmtree(VIDEO_CHECKPOINT_DIR, ignore_errors=True)
    shutil.copytree(checkpoint, VIDEO_CHECKPOINT_DIR)
    return VIDEO_CHECKPOINT_DIR


if __name__ == "__main__":
    main()
