"""Wan2.2 on one rank: the plan, request validation, parity with diffusers, MP4, offload.

Pyramid: here everything that needs no processes (plan and registry, validation,
1-rank pipelines vs diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` on tiny
checkpoints, the MP4 round trip, expert offloading); test_wan_parallel.py runs the
2- and 4-rank layouts against the 1-rank pipeline. Tolerances vs diffusers: final
latents max abs <= 1e-5 (fp32), frames identical after the uint8 conversion.
"""

import io
import types

import av
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
from diffusers import WanPipeline as RefWanPipeline
from PIL import Image

from ithaca.config import ParallelConfig
from ithaca.models.registry import load_pipeline, pipeline_class
from ithaca.models.wan.pipeline import WanImageToVideoPipeline as OurI2V
from ithaca.models.wan.pipeline import WanPipeline
from ithaca.models.wan.transformer import (
    WAN_SP_PLAN,
    WAN_SP_PLAN_PER_TOKEN_TIMESTEPS,
    WanTransformer3DModel,
)
from ithaca.parallel import ParallelState, validate_sp_plan
from ithaca.runtime.offload import ExpertPlacement
from ithaca.server.media import encode_mp4
from ithaca.types import GenerationParams
from tests.models.harness import FAMILIES, max_frame_diff, record, run_pipeline

LATENT_TOL = 1e-5
PROMPT = dict(prompt="a red cat walks on a blue street", negative_prompt="blurry, low quality")
# 9 frames -> 3 latent frames; 48 px -> 3x3 patches: 27 tokens (TI2V, 16x VAE: 3x2x3).
T2V = dict(PROMPT, num_frames=9, width=48, height=48, num_inference_steps=4, guidance_scale=4.0)
TI2V = dict(T2V, width=96, height=64, guidance_scale=5.0)


@pytest.fixture(scope="module")
def state():
    return ParallelState.single(ParallelConfig())


@pytest.fixture(autouse=True, scope="module")
def _no_ftfy():
    """diffusers 0.42.1's I2V pipeline calls ``ftfy`` unconditionally; it is not installed
    here. Our pipeline (and diffusers' T2V one) skip ftfy when it is missing, so the oracle
    gets the same identity fix-up."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    missing = not hasattr(i2v, "ftfy")
    if missing:
        i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    yield
    if missing:
        del i2v.ftfy


def _image(width=56, height=40, seed=3):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _reference(cls, path, request: dict, seed: int):
    """diffusers' (latents after the last step, uint8 frames) for ``request``."""
    pipe = cls.from_pretrained(path)
    kwargs = {k: v for k, v in request.items() if k not in ("images", "flow_shift")}
    if "flow_shift" in request:  # how diffusers' Wan docs set the shift
        config = pipe.scheduler.config
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            config, flow_shift=request["flow_shift"]
        )
    if "images" in request:
        kwargs["image"] = request["images"][0]
    last = {}

    def on_step(pipe, i, t, tensors):
        last["latents"] = tensors["latents"]
        return {}

    generator = torch.Generator().manual_seed(seed)
    video = pipe(**kwargs, generator=generator, output_type="np", callback_on_step_end=on_step)
    return last["latents"], (video.frames[0] * 255).round().astype(np.uint8)


# -- plan and registry ---------------------------------------------------------
def test_plan_declared_and_valid():
    assert WanTransformer3DModel._sp_plan is WAN_SP_PLAN
    validate_sp_plan(WAN_SP_PLAN)
    validate_sp_plan(WAN_SP_PLAN_PER_TOKEN_TIMESTEPS)
    assert set(WAN_SP_PLAN) == {"rope", "blocks.0", "proj_out"}
    assert set(WAN_SP_PLAN_PER_TOKEN_TIMESTEPS) - set(WAN_SP_PLAN) == {""}
    for spec in (*WAN_SP_PLAN["rope"].values(), WAN_SP_PLAN["blocks.0"]["hidden_states"]):
        assert spec.auto_pad and spec.split_dim == 1


def test_registry_picks_the_wan_classes(tiny_wan):
    assert pipeline_class(tiny_wan["t2v_a14b"]) is WanPipeline
    assert pipeline_class(tiny_wan["ti2v_5b"]) is WanPipeline
    assert pipeline_class(tiny_wan["i2v_a14b"]) is OurI2V


# -- validation ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("t2v_a14b", dict(num_frames=8), r"num_frames \(8\) must be 4k\+1.*nearest valid: 5 or 9"),
        ("t2v_a14b", dict(num_frames=0), r"num_frames \(0\) must be a positive integer"),
        ("t2v_a14b", dict(images=[_image()]), "takes no input image"),
        ("t2v_a14b", dict(width=8), r"width \(8\) must be an integer of at least 16"),
        ("t2v_a14b", dict(num_images=2), r"n \(2\) must be 1"),
        ("t2v_a14b", dict(flow_shift=0), r"flow_shift \(0\) must be a positive number"),
        ("t2v_a14b", dict(guidance_scale=-1.0), r"guidance_scale \(-1.0\) must be a non-neg"),
        ("t2v_a14b", dict(true_cfg_scale=4.0), "Wan uses guidance_scale"),
        ("t2v_a14b", dict(fps=0), r"fps \(0\) must be a positive int"),
        ("ti2v_5b", dict(guidance_scale_2=3.0), "guidance_scale_2 needs a two-expert"),
        ("ti2v_5b", dict(images=[_image(), _image()]), "at most one input image"),
        ("ti2v_5b", dict(height=16), r"height \(16\) must be an integer of at least 32"),
        ("i2v_a14b", dict(), "needs exactly one input image, got 0"),
    ],
)
def test_invalid_requests_raise(tiny_wan, state, kind, change, message):
    pipe = load_pipeline(tiny_wan[kind], state)
    with pytest.raises(ValueError, match=message):
        pipe.resolve(GenerationParams(**{**T2V, **change}))


def test_sizes_round_down_like_diffusers(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["ti2v_5b"], state)
    request = pipe.resolve(GenerationParams(**{**T2V, "width": 100, "height": 70}))
    assert (request.width, request.height) == (96, 64)


# -- 1 rank vs diffusers -------------------------------------------------------------
def _check_parity(pipe, ref_cls, kind, path, request, seed):
    frames, latents, experts, _ = run_pipeline(pipe, [dict(request, seed=seed)])
    ref_latents, ref_frames = _reference(ref_cls, path, request, seed)
    err = (latents - ref_latents.float()).abs().max().item()
    assert err <= LATENT_TOL, f"final latents differ from diffusers by {err:.2e}"
    assert frames[0].dtype == np.uint8 and frames[0].shape == ref_frames.shape
    diff = max_frame_diff(frames[0], ref_frames)
    assert diff <= 1  # not bit-identical by construction: another attention kernel
    # The frames vary (not a constant grey), so closeness means something.
    assert frames[0].std() > 20
    record(FAMILIES[kind], "1 rank vs diffusers", err, diff)
    return experts


def test_t2v_a14b_two_experts_match_diffusers(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["t2v_a14b"], state)
    request = dict(T2V, guidance_scale_2=2.0)
    experts = _check_parity(pipe, RefWanPipeline, "t2v_a14b", tiny_wan["t2v_a14b"], request, 7)
    # Timesteps 999, 900 >= 875 run the high-noise expert, 750, 500 the low-noise one;
    # CFG calls each twice (positive, negative).
    assert experts == [0, 0, 0, 0, 1, 1, 1, 1]
    resolved = pipe.resolve(GenerationParams(**request))
    inputs = {"video": resolved.extra_key[0]}
    timesteps = pipe.schedule(4, None, inputs).timesteps
    assert timesteps.tolist() == [999, 900, 750, 500] and inputs["experts"] == [0, 0, 1, 1]
    job = types.SimpleNamespace(requests=[resolved], inputs=inputs)
    assert pipe.step_guidance_scales(job) == [4.0, 4.0, 2.0, 2.0]  # decided before the loop


def test_ti2v_text_only_matches_diffusers(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["ti2v_5b"], state)
    request = dict(TI2V, flow_shift=5.0)  # the checkpoint says 3.0
    experts = _check_parity(pipe, RefWanPipeline, "ti2v_5b", tiny_wan["ti2v_5b"], request, 5)
    assert experts == [0] * 8


def test_ti2v_with_image_matches_diffusers(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["ti2v_5b"], state)
    request = dict(TI2V, images=[_image()])
    _check_parity(pipe, WanImageToVideoPipeline, "ti2v_5b", tiny_wan["ti2v_5b"], request, 6)


def test_i2v_a14b_matches_diffusers(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["i2v_a14b"], state)
    request = dict(T2V, images=[_image()], guidance_scale=3.5, guidance_scale_2=1.5)
    path = tiny_wan["i2v_a14b"]
    experts = _check_parity(pipe, WanImageToVideoPipeline, "i2v_a14b", path, request, 8)
    assert experts == [0, 0, 0, 0, 1, 1, 1, 1]  # boundary 0.9: 999 and 900 are high-noise


def test_batch_of_two_requests_equals_each_alone(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["t2v_a14b"], state)
    a = dict(T2V, seed=1, request_id="a")
    b = dict(T2V, prompt="a small dog", negative_prompt="dark", seed=2, request_id="b")
    together, _, _, results = run_pipeline(pipe, [a, b])
    alone, _, _, _ = run_pipeline(pipe, [b])
    # Batched matmuls sum in another order: equal up to rounding.
    assert max_frame_diff(together[1], alone[0]) <= 1
    assert max_frame_diff(together[0], together[1]) > 50  # different requests, not a copy
    assert [r.metadata["num_frames"] for r in results] == [9, 9]
    assert [r.fps for r in results] == [16, 16]


# -- outputs -------------------------------------------------------------------------
def test_mp4_round_trip(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["t2v_a14b"], state)
    _, _, _, results = run_pipeline(pipe, [dict(T2V, fps=12, seed=3)])
    frames = results[0].frames
    assert frames.shape == (9, 48, 48, 3) and results[0].fps == 12
    blob = encode_mp4(frames, results[0].fps)
    with av.open(io.BytesIO(blob)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12
    assert len(decoded) == 9
    assert decoded[0].shape == (48, 48, 3)
    # yuv420p halves chroma resolution, and the tiny model's frames are pixel noise, so
    # compare per-frame mean colours here (frame order and brightness survive) ...
    means = np.stack(decoded).mean(axis=(1, 2)) - frames.mean(axis=(1, 2))  # (F, 3)
    assert np.abs(means).max() < 4, means
    # ... and the pixels of smooth content, which H.264 keeps within a few levels.
    ramp = np.linspace(0, 200, 48)
    smooth = np.stack([np.add.outer(ramp, ramp * 0 + 5 * k) for k in range(9)])
    smooth = np.stack([smooth, smooth.transpose(0, 2, 1), 200 - smooth], axis=-1).astype(np.uint8)
    with av.open(io.BytesIO(encode_mp4(smooth, 12))) as container:
        back = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.abs(back.astype(int) - smooth.astype(int)).mean() < 4


def test_preview_is_the_first_frame_of_the_full_decode(tiny_wan, state):
    # The causal VAE decodes latent frame 0 alone to exactly the video's first frame.
    pipe = load_pipeline(tiny_wan["t2v_a14b"], state)
    _, latents, _, _ = run_pipeline(pipe, [dict(T2V, seed=4)])
    job = types.SimpleNamespace(inputs={})
    [full] = pipe.decode(job, latents)
    [first] = pipe.decode(job, latents[:, :, :1])
    assert first.shape[0] == 1
    assert max_frame_diff(first[0], full[0]) == 0
    previews = []

    def callback(event):
        previews.extend(event.previews or [])
        return False

    pipe.generate([GenerationParams(**T2V, seed=4, partial_images=1)], callback)
    assert len(previews) == 1 and previews[0].size == (48, 48)


def test_decode_reports_one_chunk_per_latent_frame_and_changes_nothing(tiny_wan, state):
    pipe = load_pipeline(tiny_wan["t2v_a14b"], state)
    params = GenerationParams(**T2V, seed=5, request_id="v")
    events = []
    [reported] = pipe.generate([params], on_decode=events.append)
    # 9 frames -> 3 latent frames: the start, then one event per latent frame's decoder call.
    assert [(e.request_ids, e.chunk, e.chunks) for e in events] == [(["v"], k, 3) for k in range(4)]
    [plain] = pipe.generate([params])
    assert reported.frames.shape == (9, 48, 48, 3)
    assert np.array_equal(reported.frames, plain.frames)  # the hook reads nothing
    assert not pipe.vae.decoder._forward_hooks  # and is gone after the decode


# -- memory: offloading the idle expert ------------------------------------------------
def test_expert_offload_swaps_once_per_switch_and_changes_nothing(tiny_wan, state):
    path = tiny_wan["t2v_a14b"]
    resident = load_pipeline(path, state)
    assert not resident.placement.offload  # auto: never on CPU
    offloaded = WanPipeline(path, state, torch.float32, expert_offload=True)
    assert offloaded.placement.offload
    # Two groups (different flow_shift), each crossing the boundary, one frame, no CFG.
    small = dict(T2V, num_frames=1, guidance_scale=1.0, seed=9)
    batch = [dict(small, flow_shift=3.0), dict(small, flow_shift=5.0)]
    want, _, want_experts, _ = run_pipeline(resident, batch)
    got, _, got_experts, _ = run_pipeline(offloaded, batch)
    assert got_experts == want_experts == [0, 0, 1, 1, 0, 0, 1, 1]
    for a, b in zip(got, want, strict=True):
        assert max_frame_diff(a, b) == 0
    # One host->device copy per switch, the idle expert dropped first; the second group
    # starts on the high-noise expert again.
    assert offloaded.placement.swaps == [(None, 0), (0, 1), (1, 0), (0, 1)]
    assert resident.placement.swaps == []


@pytest.mark.gpu
def test_placement_moves_only_the_active_expert_to_the_gpu():
    device = torch.device("cuda")
    experts = [torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)]
    host_weights = [e.weight.detach().clone() for e in experts]
    placement = ExpertPlacement(experts, device, offload=True)
    assert all(p.device.type == "cpu" and p.is_pinned() for e in experts for p in e.parameters())
    placement.activate(0)
    assert experts[0].weight.device == device and experts[1].weight.device.type == "cpu"
    placement.activate(1)
    # Deactivated: expert 0 points at its pinned host copy again (nothing copied back).
    assert experts[0].weight.device.type == "cpu" and experts[1].weight.is_cuda
    assert experts[0].weight.data_ptr() == placement.copies[0].host[0].data_ptr()
    assert torch.equal(experts[1].weight.cpu(), host_weights[1])
    assert placement.swaps == [(None, 0), (0, 1)]


def test_tiny_tokenizer_is_deterministic():
    # The Unigram trainer is parallel; the builder fixes the ids so checkpoints built in
    # different processes (the ranks' pools, later sessions) agree.
    from ithaca.testing.tiny_wan import train_tokenizer

    first, second = train_tokenizer(), train_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    text = "a red cat walks, slowly!"
    assert first(text).input_ids == second(text).input_ids
