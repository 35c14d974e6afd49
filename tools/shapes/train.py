"""Train the shapes model from a seed: ``python -m tools.shapes.train --out DIR``.

Stages (each logs to ``DIR/log.jsonl`` and shows a progress bar):

1. **VAE** (``AutoencoderKLQwenImage``) on random 64x64 crops of rendered scenes, in two
   parts against a fixed latent code (:func:`target_latent`: 4x4 sub-block colours):
   the decoder learns code (+ noise) -> pixels (L1 + MSE) on rank 1 while rank 0 trains
   the encoder pixels -> code (MSE). Then per-channel mean and std of
   the posterior means over fresh scenes become ``latents_mean`` / ``latents_std`` in its
   config, the normalisation the pipeline undoes before decoding.
2. **Latent bank**: training scenes (never held-out ones) rendered at the trained sizes and
   encoded once (posterior mean, normalised, packed into 2x2 patches as the pipeline
   packs them). Each step draws a fresh wording for a banked scene.
3. **Transformer + text encoder** (``--text-encoder train``, the default, or ``frozen``):
   flow matching on exactly what the pipeline feeds the transformer at inference:
   ``QwenImagePipeline.encode_prompt`` embeddings (template, 34 dropped tokens, mask),
   ``x_t = (1 - s) x_0 + s n`` with the sigma ``s`` passed as ``timestep`` (the pipeline
   passes ``t / 1000``), target ``n - x_0``. 10% of prompts are dropped to "" for
   classifier-free guidance. Data parallel over ``--procs`` processes (gloo); rank 0
   keeps the EMA, validates, probes prompt adherence and saves.

Writes ``DIR/checkpoint`` (the pipeline directory, fp16 weights by default),
``DIR/loss.png``, ``DIR/log.jsonl`` and ``DIR/bank.pkl`` (for ``--reuse``).
Deterministic given ``--seed``, ``--procs`` and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tools.shapes import components, scenes

SIZES = {(128, 128): 1.0}
"""Training resolutions (width, height) and their share of the bank and the steps. One
size: the 3x3 grid cells then sit at fixed token positions, which a 4-layer model with
only RoPE learns far sooner than a size-relative layout."""


def tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Scene prompts the tokenizer is trained on (every wording, held-out layouts too:
    they are words, not pictures)."""
    rng = random.Random(seed)
    return [scenes.describe(scenes.sample_scene(rng, "any"), rng) for _ in range(n)]


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("a")

    def __call__(self, **record):
        record["time"] = round(time.time(), 2)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def start_run(args) -> tuple[Path, Log, float]:
    """Seed the RNG, make the output folder, log the arguments: ``(out, log, start time)``."""
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.jsonl")
    log(stage="args", **vars(args))
    return out, log, time.time()


def render_batch(batch: list[scenes.Scene], width: int, height: int) -> torch.Tensor:
    """(B, 3, 1, H, W) pixels in [-1, 1]: the VAE's video layout with one frame."""
    arr = np.stack([scenes.to_tensor_array(scenes.render(s, width, height)) for s in batch])
    return torch.from_numpy(arr).unsqueeze(2)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _single_frame_forward(self, x, cache_x=None):
    """``QwenImageCausalConv3d`` on one frame with no cache, as a 2-D convolution.

    Exact: causal padding puts zeros before the only frame, so just the last temporal
    slice of the kernel touches data. Saves the 3x work spent multiplying those zeros.
    """
    if cache_x is not None or x.shape[2] != 1:
        return type(self).forward(self, x, cache_x)
    # (B, C, 1, H, W) -> (B, C, H, W) -> conv -> (B, C', 1, H', W')
    pad = (self._padding[2], self._padding[0])  # (h, w); _padding is F.pad order (w, w, h, h, t, 0)
    out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], pad)
    return out.unsqueeze(2)


@contextlib.contextmanager
def single_frame(vae):
    """Run ``vae`` (images only) with 2-D convolutions; same numbers, ~3x faster."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    convs = [m for m in vae.modules() if isinstance(m, QwenImageCausalConv3d)]
    for m in convs:
        m.forward = types.MethodType(_single_frame_forward, m)
    try:
        yield vae
    finally:
        for m in convs:
            del m.forward


# ----- stage 1: VAE -------------------------------------------------------------------


def target_latent(x: torch.Tensor) -> torch.Tensor:
    """The latent code the VAE is taught: (B, 3, 1, H, W) -> (B, 16, 1, H/8, W/8).

    Per 8x8 block: the mean colours of its four 4x4 sub-blocks (12 channels), its mean
    colour (3) and its pixel std (1, edges). Hand-designed because the tiny Wan-style
    VAE trained end to end from random init stays on the "predict the mean colour"
    plateau for hundreds of steps (docs/default-model.md); with a fixed code the
    decoder and the encoder each learn in minutes.
    """
    img = x[:, :, 0]  # (B, 3, H, W)
    b, _, h, w = img.shape
    sub = F.avg_pool2d(img, 4)  # (B, 3, H/4, W/4)
    # space-to-depth: (B, 3, H/4, W/4) -> (B, 12, H/8, W/8)
    sub = (
        sub.view(b, 3, h // 8, 2, w // 8, 2)
        .permute(0, 1, 3, 5, 2, 4)
        .reshape(b, 12, h // 8, w // 8)
    )
    mean = F.avg_pool2d(img, 8)
    std = (F.avg_pool2d(img.pow(2), 8) - mean.pow(2)).clamp_min(0).sum(1, keepdim=True).sqrt()
    return torch.cat([sub, mean, std], 1).unsqueeze(2)


def decode_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode`` for one frame without the final clamp to [-1, 1] (which would stop
    the gradient of every overshooting pixel)."""
    vae.clear_cache()
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0])
    vae.clear_cache()
    return out


def _crops(rng: random.Random, n: int, size: int = 64) -> torch.Tensor:
    full = rng.choice((96, 128, 160))
    x = render_batch([scenes.sample_scene(rng, "any") for _ in range(n)], full, full)
    ox, oy = rng.randrange(0, full - size + 1), rng.randrange(0, full - size + 1)
    return x[..., oy : oy + size, ox : ox + size]


def train_vae_part(vae, part: str, steps: int, args, seed: int, log: Log) -> None:
    """``part="decoder"``: code (+ noise) -> pixels (L1 + MSE); ``"encoder"``: pixels ->
    code (MSE). Each part has its own random streams, so either can be retrained (or run
    in parallel) without changing the other."""
    modules = (
        [vae.decoder, vae.post_quant_conv] if part == "decoder" else [vae.encoder, vae.quant_conv]
    )
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc=f"vae {part}", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.vae_lr, 50)
        x = _crops(rng, args.vae_batch)
        code = target_latent(x)
        if part == "decoder":
            y = decode_raw(vae, code + args.vae_noise * torch.randn(code.shape, generator=gen))
            loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        else:
            loss = F.mse_loss(vae.encode(x).latent_dist.mean, code)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log(stage=f"vae_{part}", step=step, loss=loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


DECODER_FILE = "decoder.safetensors"


def _decoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant"))}


def decoder_main(args) -> None:
    """The decoder stage: in its own process, next to the encoder stage."""
    from safetensors.torch import save_file

    out = Path(args.out)
    vae = components.build_vae(args.seed)
    with single_frame(vae):
        train_vae_part(
            vae, "decoder", args.vae_steps, args, args.seed + 100, Log(out / "log.jsonl")
        )
    save_file(_decoder_state(vae), str(out / (DECODER_FILE + ".tmp")))
    (out / (DECODER_FILE + ".tmp")).rename(out / DECODER_FILE)


def load_decoder(vae, out: Path) -> bool:
    """Load the decoder stage's weights into ``vae`` if that stage has finished."""
    from safetensors.torch import load_file

    path = out / DECODER_FILE
    if not path.is_file():
        return False
    vae.load_state_dict(load_file(str(path)), strict=False)
    return True


@torch.no_grad()
def set_latent_stats(vae, rng: random.Random, n: int = 512) -> None:
    """Per-channel mean/std of posterior means over ``n`` scenes -> the VAE config."""
    zs = []
    for i in range(0, n, 64):
        batch = [scenes.sample_scene(rng, "any") for _ in range(min(64, n - i))]
        zs.append(vae.encode(render_batch(batch, 128, 128)).latent_dist.mean)
    z = torch.cat(zs).transpose(0, 1).reshape(components.Z_DIM, -1)  # (C, B*T*H*W)
    vae.register_to_config(
        latents_mean=[round(v, 5) for v in z.mean(1).tolist()],
        latents_std=[round(v, 5) for v in z.std(1).tolist()],
    )


# ----- stage 2: latent bank -----------------------------------------------------------


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) -> (B, h/2 * w/2, 4C), the pipeline's 2x2 patch packing."""
    b, c, _, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), 4 * c)


@torch.no_grad()
def encode_scenes(vae, batch: list[scenes.Scene], width: int, height: int) -> torch.Tensor:
    """Normalised, packed latents exactly as the transformer sees clean images."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    z = vae.encode(render_batch(batch, width, height)).latent_dist.mean
    return pack((z - mean) / std)


def build_bank(vae, args, rng: random.Random, split: str = "train", total: int | None = None):
    total = total or args.bank
    bank = {}
    for (w, h), share in SIZES.items():
        n = max(min(64, total), int(total * share))  # a small --bank: a smoke run
        items, latents = [], []
        for i in tqdm(range(0, n, 64), desc=f"bank {w}x{h}", mininterval=5):
            batch = [scenes.sample_scene(rng, split) for _ in range(min(64, n - i))]
            items += batch
            latents.append(encode_scenes(vae, batch, w, h))
        bank[(w, h)] = (items, torch.cat(latents))
    return bank


# ----- stage 3: transformer ------------------------------------------------------------


def make_pipeline(tokenizer, text_encoder, vae, transformer):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(
        scheduler=components.build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def flow_loss(pipe, x0, prompts, sigmas, noise, size):
    """Flow-matching MSE for packed clean latents ``x0`` (B, S, 4C)."""
    w, h = size
    b = x0.shape[0]
    emb, mask = pipe.encode_prompt(prompts, device=x0.device)
    s = sigmas.view(b, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = pipe.transformer(
        hidden_states=xt,
        timestep=sigmas,  # the pipeline passes t / 1000 = sigma
        encoder_hidden_states=emb,
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, h // 16, w // 16)]] * b,
        return_dict=False,
    )[0]
    return F.mse_loss(pred, noise - x0)


def sample_sigmas(b: int, gen: torch.Generator) -> torch.Tensor:
    """Sigmas in (0, 1), a quarter each: uniform; logit-normal around 0.5; logit-normal
    around 0.73 (``sigmoid(1)``); uniform in [0.85, 1).

    The last quarter is what teaches the layout. Near sigma 1 the noisy input shows
    nothing of the image, so only the prompt can say where a shape goes; at lower
    sigmas the model can denoise what it already sees and never has to learn
    positions. With a third of the samples logit-normal around 0.73 instead (7% above
    0.9) the x0 prediction at sigma 1 was the same for every position word after 3,000
    steps; a toy with only sigma 1 learns the prompt's position in ~300 steps.
    """
    uniform = torch.rand(b, generator=gen)
    z = torch.randn(b, generator=gen)
    pick = torch.randint(0, 4, (b,), generator=gen)
    sig = torch.where(pick == 1, torch.sigmoid(z), torch.sigmoid(z + 1.0))
    sig = torch.where(pick == 0, uniform, sig)
    sig = torch.where(pick == 3, 0.85 + 0.15 * uniform, sig)
    return sig.clamp(1e-3, 1 - 1e-3)


def draw(bank, rng: random.Random, b: int, drop: float):
    sizes = list(bank)
    size = rng.choices(sizes, weights=[SIZES[s] for s in sizes])[0]
    items, latents = bank[size]
    idx = [rng.randrange(len(items)) for _ in range(b)]
    prompts = [
        rng.choice(("", " ")) if rng.random() < drop else scenes.describe(items[i], rng)
        for i in idx
    ]
    return size, latents[idx], prompts


@torch.no_grad()
def validation_loss(pipe, val, gen_seed: int) -> float:
    gen = torch.Generator().manual_seed(gen_seed)
    rng = random.Random(gen_seed)
    losses = []
    for size, (items, latents) in val.items():
        for i in range(0, len(items), 64):
            x0 = latents[i : i + 64]
            b = x0.shape[0]
            prompts = [scenes.describe(s, rng) for s in items[i : i + 64]]
            sig = sample_sigmas(b, gen)
            noise = torch.randn(x0.shape, generator=gen)
            losses.append(flow_loss(pipe, x0, prompts, sig, noise, size).item() * b)
    return sum(losses) / sum(len(items) for items, _ in val.values())


class EMA:
    """Exponential moving average of parameters (decay warms up from 0)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the averaged weights into the model."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, p in zip(saved, self.params, strict=True):
                    p.copy_(s)


class GradientAverager:
    """Data parallelism by hand: every rank draws its own batches, and gradients (plus
    the loss, for the log) are averaged across ranks before the optimiser step, so the
    ranks' weights stay identical. One flat gloo all-reduce per step (~10 MB)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        import torch.distributed as dist

        self.dist, self.params = dist, params
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.world > 1:
            for p in params:  # rank 0's initial weights everywhere
                dist.broadcast(p.data, 0)

    def __call__(self, loss: torch.Tensor) -> float:
        if self.world == 1:
            return loss.item()
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1].item()


PROBE_SEED = 4321
"""Held-out scenes of the adherence probe during training (the evaluator's are 1234)."""


@torch.no_grad()
def adherence_probe(pipe, n: int, cfg: float = 4.0) -> dict[str, float]:
    """Generate ``n`` held-out prompts with the pipeline in memory (128x128, 20 steps,
    true CFG) and check them: how adherence develops during training."""
    from tools.shapes import analysis, evaluate

    cases = evaluate.heldout_cases(n, PROBE_SEED)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, n, 16):
        chunk = cases[i : i + 16]
        images += pipe(
            prompt=[c.prompt for c in chunk],
            negative_prompt=[" "] * len(chunk),
            true_cfg_scale=cfg,
            width=128,
            height=128,
            num_inference_steps=20,
            generator=[torch.Generator().manual_seed(c.seed) for c in chunk],
        ).images
    verdicts = [analysis.check(img, c.scene) for img, c in zip(images, cases, strict=True)]
    return analysis.accuracy(verdicts)


def learning_rate(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_transformer(pipe, bank, val, args, rng: random.Random, log: Log | None, save) -> None:
    """Flow matching, data-parallel over the ranks of the default process group (if
    any). Rank 0 keeps an EMA of the weights and, every ``--save-every`` steps and at
    the end, validates it on held-out scenes, probes its prompt adherence and saves it
    with ``save()``; the other ranks only compute gradients (``log``/``save`` None)."""
    params = list(pipe.transformer.parameters())
    train_text = args.text_encoder == "train"
    pipe.text_encoder.requires_grad_(train_text)
    if train_text:
        params += [p for n, p in pipe.text_encoder.named_parameters() if "visual" not in n]
    average = GradientAverager(params)
    lead = save is not None
    ema = EMA(params, args.ema) if lead else None
    pipe.transformer.train()
    pipe.text_encoder.train(train_text)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rank = average.dist.get_rank() if average.world > 1 else 0
    gen = torch.Generator().manual_seed(args.seed + 10 + 100_000 * rank)
    bar = tqdm(range(args.steps), desc=f"transformer x{average.world}", disable=not lead,
               mininterval=5)  # fmt: skip
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        size, x0, prompts = draw(bank, rng, args.batch, args.drop)
        sig = sample_sigmas(len(prompts), gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(pipe, x0.float(), prompts, sig, noise, size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mean_loss = average(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not lead:
            continue
        ema.update()
        if step % 10 == 0:
            log(stage="transformer", step=step, loss=mean_loss)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            pipe.transformer.eval()
            pipe.text_encoder.eval()
            with ema.applied():
                v = validation_loss(pipe, val, args.seed + 20)
                save()
                probe = (step + 1) % args.probe_every == 0 or step == args.steps - 1
                acc = adherence_probe(pipe, args.probe) if probe and args.probe else None
            pipe.transformer.train()
            pipe.text_encoder.train(train_text)
            log(stage="transformer_val", step=step, loss=v)
            note = ""
            if acc is not None:
                log(stage="adherence", step=step, **acc)
                note = ", adherence " + " ".join(f"{k} {v:.0%}" for k, v in acc.items())
            tqdm.write(f"step {step + 1}: held-out flow loss (EMA) {v:.4f}, saved{note}")
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    pipe.text_encoder.requires_grad_(False)
    if lead:
        with torch.no_grad():  # ship the averaged weights
            for s, p in zip(ema.shadow, ema.params, strict=True):
                p.copy_(s)


def ship(checkpoint: Path) -> Path:
    """Copy a trained checkpoint directory into the package (the shipped default model)."""
    import shutil

    from ithaca.models.shapes import CHECKPOINT_DIR

    if CHECKPOINT_DIR.exists():
        shutil.rmtree(CHECKPOINT_DIR)
    shutil.copytree(checkpoint, CHECKPOINT_DIR)
    components.write_model_index(CHECKPOINT_DIR)
    return CHECKPOINT_DIR


MODULE = "tools.shapes.train"
BANK_FILE = "bank.pkl"
"""The latent bank, written by rank 0 for the other training ranks."""


def _draws(args, rank: int) -> random.Random:
    return random.Random(args.seed + (1500 if args.init_from else 500) + 100_000 * rank)


def init_group(args, rank: int) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=rank,
        world_size=args.procs,
        timeout=datetime.timedelta(hours=2),  # rank 0 builds the bank while 1 trains the decoder
    )


def worker_main(args) -> None:
    """Training rank ``args.rank`` > 0: rank 1 first trains the VAE decoder, then every
    such rank computes transformer gradients on its own batches."""
    import pickle

    import torch.distributed as dist
    from transformers import Qwen2Tokenizer

    out = Path(args.out)
    init_group(args, args.rank)
    if args.rank == 1 and not (args.init_from or args.reuse):
        decoder_main(args)
    dist.barrier()  # rank 0 has written the tokenizer and the bank
    tokenizer = Qwen2Tokenizer.from_pretrained(out / "tokenizer")
    with (out / BANK_FILE).open("rb") as f:
        bank = pickle.load(f)
    # Fresh modules of the same shapes; GradientAverager broadcasts rank 0's weights.
    pipe = make_pipeline(
        tokenizer,
        components.build_text_encoder(tokenizer, args.seed),
        components.build_vae(args.seed),
        components.build_transformer(args.seed),
    )
    train_transformer(pipe, bank, None, args, _draws(args, args.rank), None, None)
    dist.destroy_process_group()


def spawn_ranks(args, argv: list[str]) -> list[subprocess.Popen]:
    """Start training ranks 1..procs-1 (or, with one process, the decoder stage alone)."""
    import socket

    out = Path(args.out)
    if args.procs == 1:
        if args.init_from or args.reuse:  # the VAE comes with the checkpoint or run
            return []
        command = ["--decoder-only", *argv]
        return [_start([sys.executable, "-m", MODULE, *command], out / "decoder_stdout.txt")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        args.port = sock.getsockname()[1]
    return [
        _start(
            [
                sys.executable,
                "-m",
                MODULE,
                *argv,
                "--rank",
                str(r),
                "--port",
                str(args.port),
            ],
            out / f"rank{r}_stdout.txt",
        )
        for r in range(1, args.procs)
    ]


def _start(command: list[str], log_path: Path) -> subprocess.Popen:
    # ``-m tools...`` must resolve from any working directory: the repository root first.
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=2, help="training processes (data parallel)")
    p.add_argument("--threads", type=int, default=1, help="threads per process")
    p.add_argument("--vae-steps", type=int, default=2500, help="decoder steps (encoder: 1/3)")
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-noise", type=float, default=0.05, help="code noise for the decoder")
    p.add_argument("--decoder-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--init-from", metavar="CHECKPOINT", help="continue from a saved checkpoint")
    p.add_argument(
        "--reuse",
        metavar="RUN",
        help="take the VAE and the latent bank from an earlier run's directory (same --seed "
        "and --bank) instead of recomputing them: the same result, 15 minutes sooner",
    )
    p.add_argument("--bank", type=int, default=8000, help="training scenes encoded once")
    p.add_argument("--val", type=int, default=256, help="held-out scenes for the val loss")
    p.add_argument("--stats", type=int, default=512, help="scenes for the latent mean / std")
    p.add_argument("--steps", type=int, default=9000, help="transformer steps")
    p.add_argument("--batch", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--drop", type=float, default=0.1, help="prompt dropout for CFG")
    p.add_argument("--text-encoder", choices=("train", "frozen"), default="train")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    p.add_argument("--save-every", type=int, default=500, help="validate and save the EMA")
    p.add_argument("--probe", type=int, default=32, help="held-out prompts per adherence probe")
    p.add_argument("--probe-every", type=int, default=1000)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--ship", action="store_true", help="copy the result into the package")
    p.add_argument("--ship-only", metavar="CHECKPOINT", help="only copy it into the package")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv_list)
    torch.set_num_threads(args.threads)
    if args.decoder_only:
        decoder_main(args)
        return
    if args.rank > 0:
        worker_main(args)
        return
    if args.ship_only:
        print(f"shipped {ship(Path(args.ship_only))}")
        return

    import pickle

    out, log, start = start_run(args)

    ranks = spawn_ranks(args, argv_list)
    if args.procs > 1:
        init_group(args, 0)
    tokenizer = components.build_tokenizer(tokenizer_corpus(args.seed))
    tokenizer.save_pretrained(out / "tokenizer")
    bank = None
    if args.reuse:
        # Stages 1 and 2 of an earlier run with the same seed: its VAE (the fp32 decoder,
        # the encoder as saved) and its bank of fp32 latents. Fresh text encoder and
        # transformer, so the transformer stage is the one a full run performs.
        from diffusers import AutoencoderKLQwenImage

        run = Path(args.reuse)
        text_encoder = components.build_text_encoder(tokenizer, args.seed)
        transformer = components.build_transformer(args.seed)
        vae = AutoencoderKLQwenImage.from_pretrained(
            run / "checkpoint", subfolder="vae", torch_dtype=torch.float32
        )
        if not load_decoder(vae, run):
            raise FileNotFoundError(f"{run / DECODER_FILE} missing: not a finished VAE stage")
        with (run / BANK_FILE).open("rb") as f:
            bank = pickle.load(f)
    elif args.init_from:
        # Continue training a saved checkpoint (its VAE, text encoder and transformer).
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        src = args.init_from
        f32 = torch.float32
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            src, subfolder="text_encoder", dtype=f32
        )
        transformer = QwenImageTransformer2DModel.from_pretrained(
            src, subfolder="transformer", torch_dtype=f32
        )
        vae = AutoencoderKLQwenImage.from_pretrained(src, subfolder="vae", torch_dtype=f32)
    else:
        # The decoder only has to map the fixed code to pixels: rank 1 (or a process of
        # its own) trains it while this one trains the encoder and builds the bank.
        text_encoder = components.build_text_encoder(tokenizer, args.seed)
        transformer = components.build_transformer(args.seed)
        vae = components.build_vae(args.seed)
        with single_frame(vae):
            train_vae_part(vae, "encoder", args.vae_steps // 3, args, args.seed + 200, log)
            set_latent_stats(vae, random.Random(args.seed + 300), args.stats)
    vae.requires_grad_(False)
    log(stage="time", what="vae encoder", seconds=time.time() - start)

    with single_frame(vae):
        if bank is None:
            bank = build_bank(vae, args, random.Random(args.seed + 400))
        val = build_bank(vae, args, random.Random(args.seed + 1), "heldout", total=args.val)
    log(stage="time", what="bank", seconds=time.time() - start)
    with (out / BANK_FILE).open("wb") as f:  # for the other ranks and for --reuse
        pickle.dump(bank, f)
    if args.procs > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 1 has trained the decoder
        log(stage="time", what="decoder (rank 1)", seconds=time.time() - start)

    from tools.shapes.plot import plot_log

    def save():
        load_decoder(vae, out)  # the decoder stage's result once it is there
        dtype = getattr(torch, args.dtype)
        components.save_checkpoint(
            out / "checkpoint", tokenizer, text_encoder, vae, transformer, dtype
        )
        plot_log(out / "log.jsonl", out / "loss.png")

    pipe = make_pipeline(tokenizer, text_encoder, vae, transformer)
    train_transformer(pipe, bank, val, args, _draws(args, 0), log, save)
    log(stage="time", what="transformer", seconds=time.time() - start)
    for proc in ranks:
        if proc.wait() != 0:
            raise RuntimeError(f"a training process failed: see {out}/*_stdout.txt")
    if args.procs > 1:
        dist.destroy_process_group()
    save()
    print(f"done in {(time.time() - start) / 60:.1f} min: {out / 'checkpoint'}")
    if args.ship:
        print(f"shipped {ship(out / 'checkpoint')}")


if __name__ == "__main__":
    main()
