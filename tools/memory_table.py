"""Write ``docs/memory.md``: bytes per rank for each model and layout, and what fits where.

Usage::

    python -m tools.memory_table            # writes docs/memory.md
    python -m tools.memory_table --stdout   # prints it instead

Parameter counts are exact: each component of a model is built on the ``meta`` device
from its checkpoint's own ``config.json`` (excerpts in ``tools/memory_models/*.json``,
each naming its source; nothing is downloaded) and its parameters counted. Bytes use
the model's dtype, except where the class keeps modules in fp32 (T5's ``wo``), as
:mod:`ithaca.runtime.loading` does.

Per rank, for a group of N ranks (``docs/memory.md`` explains each term):

- transformer weights: all of them on every rank (Ulysses / Ring / CFG split the
  sequence and the guidance branches, not the weights); with HSDP ``1/N`` of them plus
  two whole blocks in flight (the one computing, the next one being gathered); with
  ``--enable-layerwise-offload``: everything outside the blocks plus two blocks;
- text encoders and VAE: on rank 0 only (``rank0`` placement); with
  ``--enable-cpu-offload`` on its host, so the device holds one component at a time;
- activations of one transformer forward (one CFG branch at a time, batch 1): the
  sequence shard ``(image + text tokens) / N_sp`` x ``(2 hidden + 2 ffn)`` values (the
  residual stream, the normed input and the MLP's hidden pair live at the widest
  point; attention runs in fused kernels and holds O(tokens x hidden)). An estimate;
- VAE decode: three live tensors of the decoder's widest stage (an estimate).

``tests/tools/test_memory_table.py`` checks the same counting on the tiny checkpoints
against the parameter bytes the ranks of a worker group report.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "memory_models"
OUT = ROOT / "docs" / "memory.md"
GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# -- exact parameter counts -----------------------------------------------------------
def build_on_meta(library: str, class_name: str, config, config_class: str | None = None):
    """``class_name`` of ``library`` built on the meta device from ``config`` (a dict, or
    a directory holding its ``config.json``); no weights are allocated or read."""
    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            if isinstance(config, str):
                config = cls.load_config(config)
            return cls.from_config(config)
        import transformers

        if isinstance(config, str):
            cfg = transformers.AutoConfig.from_pretrained(config)
        else:
            cfg = getattr(transformers, config_class or "AutoConfig")(**config)
        return cls._from_config(cfg)


def module_bytes(module: torch.nn.Module, dtype_bytes: int) -> int:
    """Bytes of ``module``'s parameters once loaded in a ``dtype_bytes`` dtype (modules the
    class keeps in fp32 at 4 bytes; each shared parameter once)."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    total = 0
    for name, p in module.named_parameters():  # named_parameters yields a tied one once
        fp32 = any(part in keep for part in name.split("."))
        total += p.numel() * (4 if fp32 else dtype_bytes)
    return total


def block_bytes(transformer: torch.nn.Module, dtype_bytes: int) -> list[int]:
    """Bytes of each element of the transformer's block lists (its ModuleLists)."""
    lists = [m for m in transformer.children() if isinstance(m, torch.nn.ModuleList)]
    return [module_bytes(b, dtype_bytes) for m in lists for b in m]


@dataclass
class Weights:
    """A model's components in bytes (``dtype_bytes`` per parameter)."""

    transformers: list[int]
    """One entry per transformer (Wan2.2 A14B: two experts)."""
    block: int
    """The largest transformer block."""
    outside_blocks: list[int]
    """Per transformer: the bytes outside its blocks (what stays resident, layerwise)."""
    encoders: dict[str, int]
    vae: int
    parameters: dict[str, int]
    """Exact parameter count per component."""


def model_weights(spec: dict) -> Weights:
    """Every component of a ``tools/memory_models`` entry, counted on the meta device."""
    dtype_bytes = DTYPE_BYTES[spec["dtype"]]
    built, sizes, counts, blocks = {}, {}, {}, {}
    for name, part in spec["components"].items():
        if "same_as" in part:
            module = built[part["same_as"]]
        else:
            module = build_on_meta(
                part["library"], part["class"], part["config"], part.get("config_class")
            )
        built[name] = module
        counts[name] = sum(p.numel() for p in module.parameters())
        sizes[name] = module_bytes(module, dtype_bytes)
        if name.startswith("transformer"):
            blocks[name] = block_bytes(module, dtype_bytes)
    names = [n for n in sizes if n.startswith("transformer")]
    return Weights(
        transformers=[sizes[n] for n in names],
        block=max(max(b) for b in blocks.values()),
        outside_blocks=[sizes[n] - sum(blocks[n]) for n in names],
        encoders={n: s for n, s in sizes.items() if n.startswith("text_encoder")},
        vae=sizes["vae"],
        parameters=counts,
    )


def checkpoint_rank_parameter_bytes(model_dir: str, dtype_bytes: int = 4) -> dict[str, int]:
    """What the ranks of a (non-HSDP) group hold for a local diffusers checkpoint:
    ``{"rank0": ..., "other": ...}`` bytes, counted from its config files alone."""
    with open(os.path.join(model_dir, "model_index.json")) as f:
        index = json.load(f)
    transformer = other = 0
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, processors, schedulers
        module = build_on_meta(library, class_name, os.path.join(model_dir, name))
        size = module_bytes(module, dtype_bytes)
        if name.startswith("transformer"):
            transformer += size
        else:
            other += size
    return {"rank0": transformer + other, "other": transformer}


# -- bytes per rank ---------------------------------------------------------------------
LAYOUTS = [  # (name, ranks, sequence-parallel degree, ring)
    ("1 GPU", 1, 1, False),
    ("Ulysses 2", 2, 2, False),
    ("Ring 2", 2, 2, True),
    ("CFG 2", 2, 1, False),
    ("Ulysses 4", 4, 4, False),
    ("Ring 4", 4, 4, True),
    ("CFG 2 x Ulysses 2", 4, 2, False),
    ("Ulysses 8", 8, 8, False),
    ("Ring 8", 8, 8, True),
    ("CFG 2 x Ulysses 4", 8, 4, False),
]
VARIANTS = ("plain", "hsdp", "hsdp+enc", "offload", "layerwise")
"""plain: weights resident, encoders on rank 0; hsdp: ``--use-hsdp`` over the group;
hsdp+enc: and ``--text-encoder-placement offload --vae-placement offload``; offload:
``--enable-cpu-offload``; layerwise: ``--enable-layerwise-offload --enable-cpu-offload``.
In this order of preference (offloading costs host-to-device copies per request)."""
GPUS = (16, 24, 40, 48, 80)
HEADROOM = 0.9
"""Share of a GPU's memory the estimate may fill (CUDA context, allocator slack)."""


def image_tokens(geometry: dict, size: tuple[int, int, int]) -> int:
    width, height, frames = size
    per = geometry["pixels_per_token"]
    latent_frames = (frames - 1) // geometry.get("temporal_compression", 1) + 1
    return latent_frames * (height // per) * (width // per)


def activation_bytes(spec: dict, size, sp: int, ring: bool) -> int:
    """One transformer forward's widest point on one rank of ``sp`` sequence shards."""
    g, nbytes = spec["geometry"], DTYPE_BYTES[spec["dtype"]]
    tokens = -(-(image_tokens(g, size) + g["text_tokens"]) // sp)
    values = tokens * (2 * g["hidden"] + 2 * g["ffn"])
    if ring and sp > 1:  # the K/V block arriving while the current one is used
        values += 2 * tokens * g["hidden"]
    return values * nbytes


def vae_activation_bytes(spec: dict, size) -> int:
    """Three live tensors of the decoder's widest stage (one chunk of frames)."""
    g = spec["geometry"]
    width, height, _ = size
    channels = g["vae_channels"]
    widest = max(
        [channels[0] * width * height]
        + [channels[i] * width * height // 4 ** (i - 1) for i in range(1, len(channels))]
    )
    return 3 * widest * g["vae_frames_per_chunk"] * DTYPE_BYTES[g["vae_dtype"]]


def rank_bytes(spec: dict, w: Weights, size, ranks: int, sp: int, ring: bool, variant: str):
    """``(rank 0 peak, other ranks' peak, transformer weights per rank)`` in bytes."""
    act = activation_bytes(spec, size, sp, ring)
    vae_act = vae_activation_bytes(spec, size)
    encoders = sum(w.encoders.values())
    if variant.startswith("hsdp"):
        weights = sum(w.transformers) // ranks + 2 * w.block * len(w.transformers)
    elif variant == "offload":
        weights = max(w.transformers)  # one transformer (expert) on the device at a time
    elif variant == "layerwise":
        weights = sum(w.outside_blocks) + 2 * w.block
    else:
        weights = sum(w.transformers)
    other = weights + act
    if variant in ("offload", "layerwise"):  # one component on the device at a time
        rank0 = max(encoders, weights + act, w.vae + vae_act)
    elif variant == "hsdp+enc":  # the transformer stays; encoders / VAE visit one at a time
        rank0 = weights + max(encoders, act, w.vae + vae_act)
    else:
        rank0 = weights + encoders + w.vae + max(act, vae_act)
    return rank0, (other if ranks > 1 else rank0), weights


def fits(spec: dict, w: Weights, size) -> dict[int, list[str]]:
    """Per GPU size (GB), per rank count (Ulysses): the first variant that fits, or "-"."""
    table = {}
    for gb in GPUS:
        budget = HEADROOM * gb * 1e9
        row = []
        for ranks in (1, 2, 4, 8):
            ok = [
                v
                for v in VARIANTS
                if (ranks > 1 or not v.startswith("hsdp"))
                and max(rank_bytes(spec, w, size, ranks, ranks, False, v)[:2]) <= budget
            ]
            row.append(ok[0] if ok else "-")
        table[gb] = row
    return table


# -- the document -------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _size(size) -> str:
    w, h, f = size
    return f"{w}x{h}" + (f"x{f}" if f > 1 else "")


def render(specs: list[dict]) -> str:
    lines = [
        "# Memory per rank",
        "",
        "Generated by `python -m tools.memory_table` (do not edit by hand): parameter counts",
        "are exact (each component built on the meta device from its checkpoint's",
        "`config.json`, excerpts with their sources in `tools/memory_models/`); activations",
        "are estimates (see the module docstring). GB = 10^9 bytes. The ranks report what",
        "they hold in `/health`, as `ithaca_rank_parameter_bytes{group,rank}` /",
        "`ithaca_rank_peak_memory_bytes{group,rank}` in `/metrics`, and with",
        "`ithaca generate --verbose`.",
        "",
        "Variants: **plain** (every rank holds the transformer, rank 0 also the text",
        "encoders and the VAE); **hsdp** (`--use-hsdp`, issue 15 items 1-2: the transformer",
        "sharded over the group, two blocks gathered at a time; encoders still whole on",
        "rank 0); **hsdp+enc** (and `--text-encoder-placement offload --vae-placement",
        "offload`: the encoders visit rank 0's device one at a time beside the transformer",
        "shard); **offload** (`--enable-cpu-offload`: text encoders, VAE and the transformer",
        "on the host, one on the device at a time; Wan2.2: one expert at a time);",
        "**layerwise** (`--enable-layerwise-offload --enable-cpu-offload`: blocks streamed,",
        "two on the device). Rank 0 is the fullest rank; the others hold no encoders and",
        "decode nothing. CFG-parallel holds what the same sequence split holds without it",
        "(each rank runs one branch, one forward at a time). The text encoders themselves",
        "are never sharded: where one is larger than a GPU's share (Qwen-Image's 16.6 GB",
        "Qwen2.5-VL), only offloading the transformer while it encodes fits that GPU.",
        "",
        "**Encoders are not HSDP-sharded** (issue 15 item 3 allows 'sharded or offloaded';",
        "offloaded is what exists): the text encoders (Qwen2.5-VL, T5, umT5, Qwen3, CLIP)",
        "and the VAE are placed on rank 0 or offloaded, never split. Sharding them with the",
        "same per-layer `fully_shard` would need every rank of the group to run the encoder",
        "together (each layer's all-gather), i.e. conditioning on every rank instead of on",
        "rank 0 plus one broadcast of the embeddings; not built. Bagel is the exception by",
        "construction: its prompt is encoded by its own decoder (the KV-cache prefill),",
        "sharded with the rest (its ViT layers too); its VAE is whole on every rank.",
        "",
        "**HSDP per family** (tested at 2 and 4 ranks; the layouts and what is refused:",
        "`docs/parallel.md`, HSDP). Measured on the tiny checkpoints: every rank holds at",
        "most 1/N of the transformer's parameter bytes + 2% (the tests' bound), the shards",
        "of a group add up to exactly the transformer; e.g. Bagel's golden checkpoint",
        "(475,616 parameters, 1.90 MB fp32) holds exactly 951,232 B per rank over 2 ranks and",
        "475,616 B over 4. Bagel's table is not below: no excerpt of BAGEL-7B-MoT's configs",
        "is stored in `tools/memory_models/` (its ~14 B parameters, two expert sets per",
        "decoder layer, split 1/N like the rest).",
        "",
        f"'Fits' allows {HEADROOM:.0%} of a GPU's memory (Ulysses layouts) and names the",
        "first variant that fits in the order above (the later ones copy weights from the",
        "host for every request or every block: slower).",
        "",
    ]
    for spec in specs:
        w = model_weights(spec)
        lines += [f"## {spec['name']}", "", f"Source: {spec['source']}.", ""]
        lines += ["| component | parameters | GB (" + spec["dtype"] + ") |", "|---|---:|---:|"]
        sizes = dict(zip([n for n in w.parameters if n.startswith("transformer")],
                         w.transformers, strict=True))  # fmt: skip
        sizes |= w.encoders | {"vae": w.vae}
        for name, count in w.parameters.items():
            lines.append(f"| {name} | {count:,} | {_gb(sizes[name])} |")
        lines.append(f"| largest block | | {_gb(w.block)} |")
        for size in spec["geometry"]["sizes"]:
            size = tuple(size)
            tokens = image_tokens(spec["geometry"], size)
            lines += [
                "",
                f"### {_size(size)} ({tokens:,} image tokens, VAE decode "
                f"~{_gb(vae_activation_bytes(spec, size))} GB on rank 0)",
                "",
                "| layout | activations / rank | "
                + " | ".join(f"rank 0 / others: {v}" for v in VARIANTS)
                + " |",
                "|---|---:|" + "---:|" * len(VARIANTS),
            ]
            for name, ranks, sp, ring in LAYOUTS:
                act = activation_bytes(spec, size, sp, ring)
                cells = []
                for v in VARIANTS:
                    rank0, other, _ = rank_bytes(spec, w, size, ranks, sp, ring, v)
                    if ranks == 1:
                        cells.append("-" if v.startswith("hsdp") else _gb(rank0))
                    else:
                        cells.append(f"{_gb(rank0)} / {_gb(other)}")
                lines.append(f"| {name} | {_gb(act)} | " + " | ".join(cells) + " |")
            lines += [
                "",
                f"Fits at {_size(size)} (the first variant that fits, per GPU count):",
                "",
                "| GPU | 1 | 2 | 4 | 8 |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {gb} GB | " + " | ".join(row) + " |" for gb, row in fits(spec, w, size).items()
            ]
        lines.append("")
    return "\n".join(lines)


def load_specs(names: list[str] | None = None) -> list[dict]:
    """The ``tools/memory_models`` entries (``names``: file stems; None: all)."""
    paths = sorted(MODELS.glob("*.json"))
    return [json.loads(p.read_text()) for p in paths if names is None or p.stem in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument("--model", action="append", help="a tools/memory_models stem; repeat")
    args = parser.parse_args(argv)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        text = render(load_specs(args.model))  # (meta-device init warnings silenced)
    if args.stdout:
        print(text)
    else:
        OUT.write_text(text)
        print(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
