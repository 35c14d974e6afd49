"""``--usp auto``: choose Ulysses, Ring and CFG degrees with a per-layer cost model.

The model (``docs/guide.md`` derives it and tabulates what it picks) estimates the time
of one transformer layer of one request on each rank, for every layout that fits the
world size, and takes the fastest:

    compute = (t_attn * (1 + RING_OVERHEAD * (r - 1)) + t_linear) / (u * r) / efficiency
    t_attn  = 4 * S^2 * C / FLOPS          (QK^T and PV, C = heads * head_dim)
    t_linear = 24 * S * C^2 / FLOPS        (QKV, output and a 4x MLP)
    efficiency = min(1, (S / (u * r)) / SATURATION_TOKENS)   (small shards idle the GPU)
    ulysses = 4 * S * d / (u * r) * (u - 1) / u / all_to_all_bandwidth
    ring    = max(RING_HIDDEN' * bytes_r, bytes_r - ring's attention time),
              bytes_r = 2 * S * d / u * (r - 1) / r / p2p_bandwidth, RING_HIDDEN' = 1 - 0.5
    latency = LATENCY * (2 * [u > 1] + (r - 1))
    layer   = compute + ulysses + ring + latency, times 2 when a rank runs both CFG branches

with ``d = C * 2`` bytes (bf16) per token; the byte counts are the ones
``benchmarks/attention.py`` measures. Ranks a request does not use become data-parallel
replicas. Estimates within 5% tie; ties go to fewer ranks per request (more replicas),
then to CFG-parallel, then to more Ulysses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

BYTES_PER_ELEMENT = 2  # bf16 activations on GPU
TIE = 0.05  # estimates closer than 5% are a tie: the model is not more precise than that


@dataclass(frozen=True)
class Hardware:
    """The cost model's constants (H100/H800-class GPUs; change them for yours)."""

    flops: float = 300e12
    """Sustained dense bf16 FLOP/s of one GPU."""
    saturation_tokens: int = 2048
    """Tokens per rank below which a GPU runs a layer no faster than with this many."""
    nvlink_bandwidth: float = 150e9
    """Bytes/s one rank sends over NVLink, all-to-all or peer-to-peer."""
    pcie_all_to_all_bandwidth: float = 5e9
    """Bytes/s one rank sends in an all-to-all over PCIe (every rank through the host)."""
    pcie_p2p_bandwidth: float = 20e9
    """Bytes/s one rank sends to its ring neighbour over PCIe."""
    latency_s: float = 20e-6
    """Fixed cost of one collective or ring step."""
    ring_overhead: float = 0.3
    """Extra attention time per additional ring step (split kernels, log-sum-exp merges)."""
    ring_hidden: float = 0.5
    """At most this share of the ring's transfers hides behind attention compute."""


@dataclass(frozen=True)
class ModelGeometry:
    """What the cost model needs to know about a model."""

    heads: int
    head_dim: int
    pixels_per_token: int = 16
    """Image side pixels per token side: VAE factor 8 x patch 2 for Qwen-Image/FLUX."""

    def tokens(self, width: int, height: int) -> int:
        return (width // self.pixels_per_token) * (height // self.pixels_per_token)


def model_geometry(model: str | ModelGeometry) -> ModelGeometry:
    """Heads and head size from a checkpoint's ``transformer/config.json`` (local or hub)."""
    if isinstance(model, ModelGeometry):
        return model
    path = os.path.join(model, "transformer", "config.json")
    if not os.path.isfile(path):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "transformer/config.json")
    with open(path) as f:
        config = json.load(f)
    heads = config.get("num_attention_heads")
    head_dim = config.get("attention_head_dim")
    if not heads or not head_dim:
        raise ValueError(f"{path} states no num_attention_heads / attention_head_dim")
    patch = int(config.get("patch_size", 2))
    return ModelGeometry(int(heads), int(head_dim), 8 * patch)


def detect_interconnect() -> str | None:
    """``"nvlink"`` when ``nvidia-smi topo -m`` shows NV links between the GPUs,
    ``"pcie"`` when it shows GPUs without them (or, without nvidia-smi, when torch says
    GPU 0 cannot reach GPU 1 peer-to-peer at all), ``None`` when it cannot tell."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return _peer_access_hint()
    try:
        out = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("GPU")]
    if len(rows) < 2:
        return None
    cells = [cell for row in rows for cell in row[1 : len(rows) + 1]]
    return "nvlink" if any(c.startswith("NV") for c in cells) else "pcie"


def _peer_access_hint() -> str | None:
    import torch

    if torch.cuda.device_count() < 2:
        return None
    # No peer access means traffic through host memory: PCIe at best. Peer access alone
    # does not tell NVLink from PCIe peer-to-peer, so it decides nothing.
    return None if torch.cuda.can_device_access_peer(0, 1) else "pcie"


@dataclass(frozen=True)
class Candidate:
    cfg: int
    ulysses: int
    ring: int
    seconds: float
    """Estimated time of one layer of one denoising step (both CFG branches) per rank."""

    @property
    def ranks(self) -> int:
        return self.cfg * self.ulysses * self.ring


def layer_seconds(
    tokens: int,
    geometry: ModelGeometry,
    ulysses: int,
    ring: int,
    branches: int,
    interconnect: str,
    hw: Hardware = Hardware(),
) -> float:
    """The model's estimate for one layer: ``branches`` CFG branches run in turn."""
    s, c = tokens, geometry.heads * geometry.head_dim
    p = ulysses * ring
    d = c * BYTES_PER_ELEMENT
    t_attn = 4 * s * s * c / hw.flops
    t_linear = 24 * s * c * c / hw.flops
    efficiency = min(1.0, s / p / hw.saturation_tokens)
    ring_attn = t_attn * (1 + hw.ring_overhead * (ring - 1)) / p / efficiency
    compute = ring_attn + t_linear / p / efficiency
    nvlink = interconnect == "nvlink"
    a2a_bw = hw.nvlink_bandwidth if nvlink else hw.pcie_all_to_all_bandwidth
    p2p_bw = hw.nvlink_bandwidth if nvlink else hw.pcie_p2p_bandwidth
    ulysses_s = 4 * s * d / p * (ulysses - 1) / ulysses / a2a_bw
    ring_bytes_s = 2 * s * d / ulysses * (ring - 1) / ring / p2p_bw
    # the transfer of the next K/V block runs under the current block's attention, but
    # no more than RING_HIDDEN of it hides (the first block and each step's sync do not)
    ring_s = max(ring_bytes_s * (1 - hw.ring_hidden), ring_bytes_s - ring_attn)
    latency = hw.latency_s * (2 * (ulysses > 1) + (ring - 1))
    return branches * (compute + ulysses_s + ring_s + latency)


def candidates(
    world_size: int,
    geometry: ModelGeometry,
    tokens: int,
    cfg: bool,
    interconnect: str,
    hw: Hardware = Hardware(),
) -> list[Candidate]:
    """Every layout that fits ``world_size``, fastest first."""
    out = []
    for c in (1, 2) if cfg else (1,):
        for u in range(1, world_size + 1):
            if geometry.heads % u:
                continue
            for r in range(1, world_size // u + 1):
                if world_size % (c * u * r):
                    continue
                branches = 2 if cfg and c == 1 else 1
                seconds = layer_seconds(tokens, geometry, u, r, branches, interconnect, hw)
                out.append(Candidate(c, u, r, seconds))
    best = min(k.seconds for k in out)

    # fastest; ties (within TIE) -> fewer ranks, then CFG-parallel (one all-gather per step),
    # then more Ulysses (no ring overhead to under-estimate)
    def key(k: Candidate):
        tie = k.seconds <= best * (1 + TIE)
        return (0, k.ranks, -k.cfg, -k.ulysses, k.seconds) if tie else (1, 0, 0, 0, k.seconds)

    return sorted(out, key=key)


@dataclass(frozen=True)
class AutoPlan:
    degrees: dict[str, int]
    """``ParallelConfig`` keyword arguments: the Ulysses, Ring, CFG and replica degrees."""
    reason: str
    table: list[Candidate]


def plan(
    world_size: int,
    model: str | ModelGeometry,
    size: tuple[int, int],
    cfg: bool = False,
    interconnect: str | None = None,
    hw: Hardware = Hardware(),
) -> AutoPlan:
    """The layout the cost model picks, the reason in words, and the ranked candidates."""
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be a positive integer")
    if interconnect not in (None, "nvlink", "pcie"):
        raise ValueError(f"interconnect ({interconnect!r}) must be 'nvlink', 'pcie' or None")
    source = "given"
    if interconnect is None:
        interconnect = detect_interconnect()
        source = "detected" if interconnect else "assumed: nothing to detect it from"
        interconnect = interconnect or "pcie"
    geometry = model_geometry(model)
    width, height = size
    tokens = geometry.tokens(width, height)
    if tokens < 1:
        raise ValueError(f"size ({width}x{height}) has no tokens at {geometry.pixels_per_token} px")
    table = candidates(world_size, geometry, tokens, cfg, interconnect, hw)
    best = table[0]
    single = next(k for k in table if k.ranks == 1 and k.cfg == 1)
    degrees = {
        "ulysses_degree": best.ulysses,
        "ring_degree": best.ring,
        "cfg_parallel_size": best.cfg,
        "data_parallel_size": world_size // best.ranks,
    }
    reason = (
        f"{world_size} GPU(s), {interconnect} ({source}), {tokens} image tokens "
        f"({width}x{height}), {geometry.heads} heads x {geometry.head_dim}, "
        f"true CFG {'on' if cfg else 'off'}: ulysses={best.ulysses} ring={best.ring} "
        f"cfg={best.cfg} dp={degrees['data_parallel_size']}; estimated "
        f"{best.seconds * 1e3:.3g} ms per layer and step vs {single.seconds * 1e3:.3g} ms on "
        f"one GPU ({single.seconds / best.seconds:.2f}x)"
    )
    if len(table) > 1:
        runner = table[1]
        reason += (
            f"; runner-up ulysses={runner.ulysses} ring={runner.ring} cfg={runner.cfg} "
            f"{runner.seconds * 1e3:.3g} ms"
        )
    return AutoPlan(degrees, reason, table)
