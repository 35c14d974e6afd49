"""Tensor parallel (``ithaca.parallel.tensor``): every supported family at TP 2 and
TP 2 x Ulysses 2 equals one rank; so do TP 2 with a step cache (TeaCache, Cache-DiT:
the same skipped steps as one rank with that cache) and TP 2 x data parallel 2 (each
replica); each rank holds ~1/TP of the split weights, loaded split (``split_weights``
on meta: tests/models/test_loading.py measures the peak).

64x64 px, 2 steps, a CFG request, fp32 on gloo. The all-reduce changes the order of the
sums, so latents are compared within fp32 tolerance and images within 1/255. Parameter
bytes: on a TP rank ``split * TP + replicated`` equals the one-rank total exactly, and
the split part is over 0.8 of the transformer: the AdaLN modulation is split too
(gathered colwise; Qwen-Image's tiny one was 0.58 split with the modulation whole). The
replicated rest: norms, embeddings, the rowwise biases and the final projection.

Wan2.2 (T2V and I2V, two experts each, 4 heads of 16 so that TP 2 x Ulysses 2 fits):
5 frames at 48x48 px, 2 steps on different experts (asserted), every rank's experts
logged; T2V at TP 2 with expert offload (the placement swaps the split experts) and
with TeaCache; TI2V-5B (per-token timesteps, an input image) at TP 2 in the I2V cell's
pool call. Besides: the plans on released configs (``meta``: valid degrees, what
splits; Bagel's on BAGEL-7B-MoT's sizes), Wan2.1-style image context (``add_k_proj``)
at the transformer level, the split RMSNorm against ``torch.nn.RMSNorm``, and a Wan
rank's streamed load. Bagel's TP cells: ``test_bagel_hsdp.py`` (its pool calls).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ithaca.config import ParallelConfig
from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.flux.transformer import FluxTransformer2DModel as OurFlux
from ithaca.models.longcat_image.pipeline import LongCatImagePipeline
from ithaca.models.longcat_image.pipeline import LongCatImageTransformer2DModel as OurLongCat
from ithaca.models.ovis_image.pipeline import OvisImagePipeline
from ithaca.models.qwen_image.transformer import QwenImageTransformer2DModel as OurQwen
from ithaca.models.registry import load_pipeline
from ithaca.models.sd3.pipeline import StableDiffusion3Pipeline
from ithaca.models.sd3.transformer import SD3Transformer2DModel as OurSD3
from ithaca.models.wan.transformer import WanTransformer3DModel as OurWan
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.models.z_image.transformer import ZImageTransformer2DModel as OurZImage
from ithaca.parallel import ParallelState
from ithaca.parallel.tensor import (
    DegreeError,
    check_degree,
    parameter_bytes,
    shard_specs,
    tp_plan,
    tp_shard,
    valid_degrees,
)
from ithaca.runtime.offload import ExpertPlacement
from ithaca.testing.distributed import parallel_state
from ithaca.testing.tiny_wan import build_tiny_wan
from ithaca.types import GenerationParams
from tests.models.harness import LAYOUT_LATENT_TOL, max_image_diff, record, world_size

REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0, width=64,
               height=64, num_inference_steps=2, seed=3)  # fmt: skip
LAYOUTS = {
    "tp2": dict(tensor_parallel_size=2),
    "tp2 x ulysses2": dict(tensor_parallel_size=2, ulysses_degree=2),
    "tp2 x ring2": dict(tensor_parallel_size=2, ring_degree=2),
    "tp2 x cfg2": dict(tensor_parallel_size=2, cfg_parallel_size=2),
    "tp2 x dp2": dict(tensor_parallel_size=2, data_parallel_size=2),
    "tp2 + tea_cache": dict(tensor_parallel_size=2),
    "tp2 + cache_dit": dict(tensor_parallel_size=2),
    "tp2 + expert_offload": dict(tensor_parallel_size=2),
}
CACHES = {"tea_cache": dict(rel_l1_thresh=0.6), "cache_dit": dict(Fn_compute_blocks=1,
          Bn_compute_blocks=0, max_warmup_steps=0, residual_diff_threshold=10.0)}  # fmt: skip
"""Thresholds that skip steps of the 4-step cached request (asserted on one rank)."""


WAN = dict(prompt="a red cat walks", negative_prompt="blurry", num_frames=5, width=48, height=48,
           num_inference_steps=2, guidance_scale=4.0, guidance_scale_2=2.0, seed=5)  # fmt: skip
"""A Wan2.2 request: 2 latent frames x 3 x 3 patches, both experts (999 | 500)."""
WAN_KINDS = {"Wan2.2 T2V": "t2v_a14b", "Wan2.2 I2V": "i2v_a14b"}


def wan_request(name: str) -> dict:
    if name == "Wan2.2 T2V":
        return WAN
    pixels = np.random.default_rng(4).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    if name == "Wan2.2 TI2V-5B":  # its 16x VAE: 64 px = 2 x 2 patches; one expert
        return dict(WAN, width=64, height=64, guidance_scale_2=None,
                    images=[Image.fromarray(pixels)])  # fmt: skip
    return dict(WAN, images=[Image.fromarray(pixels)])


def cache_of(layout: str) -> str | None:
    return next((c for c in CACHES if layout.endswith(c)), None)


FAMILIES = {
    "FLUX.1": FluxPipeline,
    "LongCat-Image": LongCatImagePipeline,
    "Ovis-Image": OvisImagePipeline,
    "Z-Image": ZImagePipeline,
    "SD3.5": StableDiffusion3Pipeline,
}


def run(layout: dict, path: str, cache: str | None = None, request: dict = REQUEST,
        expert_offload: bool = False) -> tuple:  # fmt: skip
    """``(pixels uint8 or None, final latents fp32 or None, this rank's transformer bytes,
    cache metadata or None, experts per forward)``; with ``cache``, 4 steps with that step
    cache. Pixels: images, or a video's frames; every expert's bytes are summed."""
    request = dict(request, num_inference_steps=4) if cache else request
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state, cache_backend=cache, cache_config=CACHES.get(cache))
        captured, experts = {}, []
        decode = pipe.decode

        def keep(job, latents):
            captured["latents"] = latents.float().cpu()
            return decode(job, latents)

        pipe.decode = keep
        transformers = getattr(pipe, "experts", None) or [pipe.transformer]
        if len(transformers) > 1:  # Wan2.2: which expert each forward ran
            if expert_offload:  # as WanPipeline(expert_offload=True) places the split experts
                pipe.placement = ExpertPlacement(transformers, pipe.placement.device, True)
            activate = pipe.placement.activate
            pipe.placement.activate = lambda i: (experts.append(i), activate(i))[1]
        [result] = pipe.generate([GenerationParams(**request)])
        pixels = result.frames if result.frames is not None else None
        if result.images:
            pixels = np.stack([np.asarray(im) for im in result.images])
        for runtime in getattr(pipe, "runtimes", [pipe.runtime]):
            runtime.remove()
        counts = [parameter_bytes(t) for t in transformers]
        nbytes = {key: sum(c[key] for c in counts) for key in counts[0]}
        swaps = len(pipe.placement.swaps) if expert_offload else None
        cached = (result.metadata or {}).get("cache")
        return pixels, captured.get("latents"), nbytes, cached, (experts, swaps)


CELLS = [
    *(("Qwen-Image", layout) for layout in LAYOUTS if not layout.endswith("expert_offload")),
    *((name, "tp2") for name in FAMILIES),
    ("Z-Image", "tp2 x ulysses2"),
    ("LongCat-Image", "tp2 x ulysses2"),
    ("SD3.5", "tp2 x ulysses2"),
    ("Wan2.2 T2V", "tp2 + expert_offload"),
    ("Wan2.2 T2V", "tp2 x ulysses2"),
    ("Wan2.2 T2V", "tp2 + tea_cache"),
    ("Wan2.2 I2V", "tp2"),
    ("Wan2.2 I2V", "tp2 x ulysses2"),
]
"""Qwen-Image (joint text) under every layout: Ring and CFG-parallel sit outside the tp
axis, so one family shows they compose. Every family at TP 2. TP 2 x Ulysses 2 also for
Z-Image (30 heads: padded for Ulysses after the TP split) and LongCat-Image (FLUX.1's
processor, shared by FLUX.1 and Ovis-Image, whose plans differ only in entries TP 2
covers; both passed TP 2 x Ulysses 2 too, Ovis 1.7e-6 and 0/255, but cost 2 min each).
Qwen-Image also with each step cache (the cache sees the replicated hidden states, so
every tp rank decides alike) and beside data parallelism (every replica's picture).
SD3.5 (joint attention, a context-pre-only last block, dual attention in block 0) at
TP 2 x Ulysses 2 too. Wan2.2 T2V and I2V (split QK RMSNorms across heads, both experts)
at TP 2 and TP 2 x Ulysses 2; T2V's TP 2 run places its experts with offload, and T2V
at TP 2 with TeaCache (one cache per expert)."""


TI2V = "Wan2.2 TI2V-5B"
ALSO = {("Wan2.2 I2V", "tp2"): (TI2V,)}
"""Families run in another cell's pool call (same layout, no pool start of their own):
Wan2.2 TI2V-5B (``expand_timesteps``: per-token timesteps, 0 on the input image's latent
frame; one expert; the tiny one of ``test_wan_parallel.py``, 2 heads: one per tp rank)."""


def run_jobs(layout: dict, jobs: list[tuple]) -> list[tuple]:
    """:func:`run` of each ``(path, cache, request, expert_offload)`` under ``layout``."""
    return [run(layout, *job) for job in jobs]


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoints, tiny_family, tiny_checkpoint):
    """``one_rank(family, cache)`` -> ``(checkpoint, request, run({}, ...))``, once per
    family and cache."""
    runs: dict[tuple, tuple] = {}

    def get(name: str, cache: str | None = None) -> tuple:
        if (name, cache) not in runs:
            request = REQUEST
            if name == "Qwen-Image":
                path = tiny_checkpoints["t2i"]
            elif name in WAN_KINDS:
                path = tiny_checkpoint(build_tiny_wan, WAN_KINDS[name], heads=4)
                request = wan_request(name)
            elif name == TI2V:
                path, request = tiny_checkpoint(build_tiny_wan, "ti2v_5b"), wan_request(name)
            else:
                path = tiny_family(FAMILIES[name])
            runs[name, cache] = path, request, run({}, path, cache, request)
        return runs[name, cache]

    return get


@pytest.mark.parametrize("name,layout", CELLS, ids=[f"{n}-{lay}" for n, lay in CELLS])
def test_tensor_parallel_matches_one_rank(worker_pool, one_rank, name, layout):
    cache = cache_of(layout)
    offload = layout.endswith("expert_offload")
    names = [name, *ALSO.get((name, layout), ())]
    references = [one_rank(n, cache) for n in names]
    jobs = [(path, cache, request, offload) for path, request, _ in references]
    per_rank = worker_pool(world_size(LAYOUTS[layout])).run(run_jobs, LAYOUTS[layout], jobs)
    for i, (family, (_, _, reference)) in enumerate(zip(names, references, strict=True)):
        check_cell(family, layout, [jobs[i] for jobs in per_rank], reference)


def check_cell(name: str, layout: str, results: list[tuple], reference: tuple) -> None:
    """Every rank's :func:`run` of ``name`` under ``layout`` against the one-rank run."""
    cache = cache_of(layout)
    ref_pixels, ref_latents, one_bytes, ref_cache, ref_experts = reference
    if cache:  # the cache really skips steps on one rank
        assert ref_cache["cached_steps"] > 0, ref_cache
    if name in WAN_KINDS:  # both experts denoise
        assert set(ref_experts[0]) == {0, 1}, ref_experts
    tp = LAYOUTS[layout]["tensor_parallel_size"]
    offload = layout.endswith("expert_offload")
    returned = [r for r in results if r[0] is not None]  # each replica's returning rank
    assert len(returned) == LAYOUTS[layout].get("data_parallel_size", 1)
    for pixels, latents, _, cached, _ in returned:
        err = (latents - ref_latents).abs().max().item()
        diff = max_image_diff(list(pixels), list(ref_pixels))
        assert err <= LAYOUT_LATENT_TOL, f"{name} {layout}: latents differ by {err:.2e}"
        assert diff <= 1, f"{name} {layout}: images differ by {diff}/255"
        assert cached == ref_cache  # the same steps skipped (None without a cache)
    for *_, (experts, swaps) in results:  # every rank ran the experts in the same order
        assert experts == ref_experts[0]
        assert swaps == (2 if offload else None)  # offload: on (0), then 0 -> 1
    record(name, layout, err, diff, cache or "none")
    assert one_bytes["split"] == 0
    for _, _, nbytes, _, _ in results:  # every rank: 1/TP of the split weights, the rest whole
        assert nbytes["split"] * tp + nbytes["replicated"] == one_bytes["total"]
        assert nbytes["split"] * tp > 0.8 * one_bytes["total"], nbytes
    ratio = results[0][2]["total"] / one_bytes["total"]
    print(f"{name} {layout}: transformer bytes per rank {ratio:.3f} of one rank")


def test_bad_degree_names_the_valid_ones(tiny_checkpoints, tiny_family):
    pipe = load_pipeline(tiny_checkpoints["t2i"], ParallelState.single())
    heads = pipe.transformer.config.num_attention_heads
    bad = next(d for d in range(2, heads + 2) if heads % d)
    with pytest.raises(DegreeError, match=rf"tensor_parallel_size \({bad}\) must divide .*valid"):
        check_degree(pipe.transformer, bad, "Qwen-Image")  # no fallback load catches it
    sd3 = load_pipeline(tiny_family(StableDiffusion3Pipeline), ParallelState.single())
    valid = r"\(3\) must divide num_attention_heads \(4\).*valid degrees: \[1, 2, 4\]"
    with pytest.raises(DegreeError, match=valid):
        check_degree(sd3.transformer, 3, "SD3.5")
    from diffusers import WanTransformer3DModel

    two = SimpleNamespace(tp=SimpleNamespace(size=2))  # what tp_shard reads of the state
    with pytest.raises(DegreeError, match=r"\(2\): WanTransformer3DModel declares no tensor"):
        tp_shard(two, WanTransformer3DModel)  # diffusers' class, without ithaca's plan
    assert tp_shard(ParallelState.single(), WanTransformer3DModel) is None
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(0\) must be a positive"):
        ParallelConfig(tensor_parallel_size=0)
    assert ParallelConfig(tensor_parallel_size=2, ulysses_degree=2).world_size == 4


SD35 = dict(attention_head_dim=64, joint_attention_dim=4096, out_channels=16,
            pooled_projection_dim=2048, qk_norm="rms_norm", sample_size=128)  # fmt: skip
WAN_A14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
           in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)  # fmt: skip
RELEASED = {
    "Qwen-Image": (OurQwen, {}),  # diffusers' defaults are the released config
    "FLUX.1": (OurFlux, dict(guidance_embeds=True)),  # FLUX.1-dev
    "LongCat-Image": (OurLongCat, {}),
    "Z-Image": (OurZImage, {}),
    "SD3.5-large": (OurSD3, dict(SD35, num_layers=38, num_attention_heads=38,
                    caption_projection_dim=2432, pos_embed_max_size=192)),
    "SD3.5-medium": (OurSD3, dict(SD35, num_layers=24, num_attention_heads=24,
                     caption_projection_dim=1536, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)))),
    "Wan2.2 A14B expert": (OurWan, WAN_A14B),  # 40 heads of 128, ffn 13,824
    "Wan2.2 TI2V-5B": (OurWan, dict(WAN_A14B, num_attention_heads=24, ffn_dim=14336,
                       num_layers=30, in_channels=48, out_channels=48)),
    "Wan2.1 I2V (image context)": (OurWan, dict(WAN_A14B, image_dim=1280, added_kv_proj_dim=5120)),
}  # fmt: skip
"""Released configs built on ``meta``: what the plans split, the valid degrees and the
parameters per rank (docs/parallel.md's table)."""
VALID = {"Qwen-Image": [1, 2, 3, 4, 6, 8, 12, 24], "FLUX.1": [1, 2, 3, 4, 6, 8, 12, 24],
         "LongCat-Image": [1, 2, 3, 4, 6, 8, 12, 24], "Z-Image": [1, 2, 5, 10],
         "SD3.5-large": [1, 2, 19, 38], "SD3.5-medium": [1, 2, 3, 4, 6, 8, 12, 24],
         "Wan2.2 A14B expert": [1, 2, 4, 8], "Wan2.2 TI2V-5B": [1, 2, 4, 8],
         "Wan2.1 I2V (image context)": [1, 2, 4, 8]}  # fmt: skip
SHARES = {"Qwen-Image": (0.501, 0.251), "FLUX.1": (0.502, 0.253),
          "LongCat-Image": (0.501, 0.251), "Z-Image": (0.501, None),
          "SD3.5-large": (0.502, None), "SD3.5-medium": (0.503, 0.255),
          "Wan2.2 A14B expert": (0.503, 0.254), "Wan2.2 TI2V-5B": (0.503, 0.255),
          "Wan2.1 I2V (image context)": (0.503, 0.254)}  # fmt: skip
"""A rank's share of the transformer's parameters at TP 2 and TP 4 (None: not a valid
degree). Before the AdaLN modulation was split (gathered colwise) Qwen-Image kept 0.667
at TP 2, FLUX.1 / LongCat-Image 0.638, SD3.5-large 0.668, SD3.5-medium 0.674."""
MODULATION = {"Qwen-Image": "transformer_blocks.59.img_mod.1",
              "FLUX.1": "single_transformer_blocks.37.norm.linear",
              "LongCat-Image": "transformer_blocks.0.norm1_context.linear",
              "Z-Image": "layers.29.adaLN_modulation.0",
              "SD3.5-large": "transformer_blocks.37.norm1_context.linear",
              "SD3.5-medium": "transformer_blocks.12.norm1.linear",
              "Wan2.2 A14B expert": "condition_embedder.time_proj",
              "Wan2.2 TI2V-5B": "condition_embedder.time_proj",
              "Wan2.1 I2V (image context)": "condition_embedder.time_proj"}  # fmt: skip
"""One AdaLN modulation Linear per model: split by rows (``colwise_gather``)."""


@pytest.mark.parametrize("name", RELEASED)
def test_released_configs_plan(name):
    cls, config = RELEASED[name]
    with torch.device("meta"):
        transformer = cls(**config)
    plan = tp_plan(transformer)
    assert valid_degrees(transformer, plan)[1] == VALID[name]
    specs = shard_specs(transformer, plan, 2)
    assert specs[f"{MODULATION[name]}.weight"].dim == 0  # rows, gathered after the forward
    if cls is OurWan:  # the QK norms span the heads: split with them
        last = f"blocks.{len(transformer.blocks) - 1}"
        inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        assert specs[f"{last}.attn1.norm_q.weight"].block_sizes == [inner]
        image_context = f"{last}.attn2.add_k_proj.weight" in specs
        assert image_context == (config.get("added_kv_proj_dim") is not None)
    elif cls is OurSD3:  # context-pre-only last block: its text stream ends at the attention
        last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
        assert f"{last}.attn.to_add_out.weight" not in specs
        assert f"{last}.ff_context.net.2.weight" not in specs
        assert "transformer_blocks.0.ff_context.net.2.weight" in specs
        dual = "transformer_blocks.0.attn2.to_q.weight" in specs
        assert dual == bool(config.get("dual_attention_layers"))
    params = dict(transformer.named_parameters())
    split = sum(params[n].numel() for n, spec in specs.items() if spec.dim is not None)
    total = sum(p.numel() for p in params.values())
    shares = [(split / tp + total - split) / total if tp in VALID[name] else None for tp in (2, 4)]
    got = ", ".join("-" if s is None else f"{s:.1%}" for s in shares)
    print(f"{name}: {total / 1e9:.1f} B, {split / total:.1%} split; per rank at TP 2, 4: {got}")
    for share, expected in zip(shares, SHARES[name], strict=True):
        assert (share is None) == (expected is None)
        assert share is None or abs(share - expected) < 1e-3, (share, expected)


BAGEL_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064)  # fmt: skip
"""BAGEL-7B-MoT's ``llm_config.json`` (Qwen2-7B sizes); its ViT is SigLIP so400m/14."""
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                     num_hidden_layers=26, patch_size=14, image_size=980)  # fmt: skip


def test_bagel_released_config_plan():
    """Bagel's plan on BAGEL-7B-MoT's sizes (``meta``): the GQA's 4 KV heads bound the
    degrees (28 query heads would allow 7), a 3-degree error names them, and a rank's
    share of the decoder (both experts, 13.6 B) and of the whole network (14.0 B with
    the ViT) at TP 2 and 4."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from ithaca.models.bagel.model import Bagel, BagelConfig

    vit = SiglipVisionConfig(**SIGLIP_SO400M)
    with torch.device("meta"):
        net = Bagel(Qwen2Config(**BAGEL_7B), vit, BagelConfig())
    plan = tp_plan(net)
    assert valid_degrees(net, plan) == (28, [1, 2, 4])
    kv = r"\(3\) must divide num_attention_heads \(28\), .*self_attn.kv_heads \(4\), .*num_heads"
    with pytest.raises(DegreeError, match=kv + r" \(16\).*valid degrees: \[1, 2, 4\]"):
        check_degree(net, 3, "Bagel")
    specs = shard_specs(net, plan, 2)
    assert "language_model.model.layers.27.mlp_moe_gen.down_proj.weight" in specs
    assert specs["vit_model.vision_model.encoder.layers.25.mlp.fc1.weight"].dim == 0
    shares = {}
    for part, module in (("decoder", net.llm), ("network", net)):
        params = dict(module.named_parameters())
        prefix = "language_model.model." if part == "decoder" else ""
        split = sum(params[n.removeprefix(prefix)].numel() for n, spec in specs.items()
                    if spec.dim is not None and n.removeprefix(prefix) in params)  # fmt: skip
        total = sum(p.numel() for p in params.values())
        shares[part] = [round((split / tp + total - split) / total, 3) for tp in (2, 4)]
        print(f"Bagel {part}: {total / 1e9:.2f} B, {split / total:.1%} split; "
              f"per rank at TP 2, 4: {shares[part]}")  # fmt: skip
    assert shares == {"decoder": [0.52, 0.28], "network": [0.521, 0.281]}


def image_context_forward(layout: dict) -> torch.Tensor:
    """A Wan2.1-I2V-shaped transformer (image context: ``add_k_proj`` / ``add_v_proj``,
    ``norm_added_k`` across heads) under ``layout``, diffusers' own attention processor
    (no sequence parallelism): the output ``(1, C, F, H, W)`` fp32."""
    from ithaca.parallel.tensor import apply_tensor_parallel
    from ithaca.testing.parts import seeded

    sizes = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=12)  # fmt: skip
    transformer = seeded(0, OurWan, patch_size=(1, 2, 2), added_kv_proj_dim=32,
                         cross_attn_norm=True, rope_max_seq_len=32, **sizes)  # fmt: skip
    make = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4, generator=make),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 512, 16, generator=make),  # diffusers: 512 text
        encoder_hidden_states_image=torch.randn(1, 5, 12, generator=make),
    )
    with parallel_state(ParallelConfig(**layout)) as state, torch.no_grad():
        apply_tensor_parallel(transformer, state, "Wan2.1 I2V")
        return transformer(**inputs, return_dict=False)[0]


def test_wan_image_context_tp2(worker_pool):
    """The image-context keys / values and their across-heads RMSNorm split by the plan
    (no Wan2.2 checkpoint has them; ithaca's Wan pipelines refuse Wan2.1 I2V's CLIP
    encoder, so this is the transformer alone)."""
    reference = image_context_forward({})
    for out in worker_pool(2).run(image_context_forward, dict(tensor_parallel_size=2)):
        err = (out - reference).abs().max().item()
        assert err <= 1e-5, f"Wan image context TP 2: outputs differ by {err:.2e}"
    print(f"Wan image context TP 2: max abs diff {err:.2e}, |out| {reference.abs().max():.2f}")


NORM_CASES = [(torch.float32, "cpu"), (torch.bfloat16, "cpu"),
              pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu)]  # fmt: skip


@pytest.mark.parametrize("dtype,device", NORM_CASES)
def test_split_rms_norm_on_one_rank_is_torch_rms_norm(dtype, device):
    """With nothing to all-reduce, :class:`SplitRMSNorm` is ``torch.nn.RMSNorm`` bit for
    bit, in bf16 too (CUDA: against its fused kernel; the bf16 sums across ranks on NCCL
    are not checked anywhere yet)."""
    from ithaca.parallel.tensor import SplitRMSNorm

    norm = torch.nn.RMSNorm(64, eps=1e-6).to(dtype)
    make = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=make) * 0.5 + 1)
    x = (torch.randn(2, 9, 64, generator=make) * 3).to(dtype)
    norm, x = norm.to(device), x.to(device)
    assert torch.equal(SplitRMSNorm(norm, ParallelState.single(), 1)(x), norm(x))


def test_wan_loads_only_its_split(tiny_checkpoint):
    """``load_streamed`` with the ``split_weights`` hook reads each tp rank's pieces of a
    Wan expert, the split QK norms' rows included (no whole-tensor fallback): what each
    rank holds is exactly its part of the checkpoint. No collective: the hook reads only
    ``tp.rank`` / ``tp.size``."""
    import functools

    from ithaca.parallel.tensor import split_weights, take
    from ithaca.runtime.loading import load_streamed

    path = tiny_checkpoint(build_tiny_wan, "t2v_a14b", heads=4)
    whole = dict(load_streamed(OurWan, path, "transformer").named_parameters())
    for rank in range(2):
        state = SimpleNamespace(tp=SimpleNamespace(size=2, rank=rank))
        hook = functools.partial(split_weights, state=state)
        split = load_streamed(OurWan, path, "transformer", shard=hook)
        assert split.blocks[1].attn2.norm_k.weight.shape == (32,)  # 4 heads x 16 -> 2 x 16
        for name, param in split.named_parameters():
            pieces = split._load_slices.get(name)
            expected = take(whole[name], pieces) if pieces else whole[name]
            assert torch.equal(param, expected), name
