"""Qwen-Image at one rank: equal to the diffusers reference pipelines, and the framework.

Pyramid: here everything in-process (tiny checkpoints, 1 rank): templates and tokenizer,
registry, 1-rank pipeline vs diffusers (fp32 latents max abs <= 1e-5, uint8 images
within 1/255), save/load, batching, cancellation, previews, validation. Multi-rank layouts
are in test_qwen_image_parallel.py.
"""

import dataclasses
import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor

from ithaca.models import registry
from ithaca.models.qwen_image import templates
from ithaca.parallel import ParallelState
from ithaca.testing.tiny import build_tiny_qwen_image
from ithaca.types import GenerationParams
from tests.models.harness import max_image_diff, record

LATENT_TOL = 1e-5


class _Processor(Qwen2VLProcessor):
    """The reference's processor without its video part (which needs torchvision)."""

    def check_argument_for_proper_class(self, name, arg):
        return None


def reference_pipeline(path: str):
    kwargs = {}
    if Path(path, "processor").is_dir():
        kwargs["processor"] = _Processor(
            image_processor=Qwen2VLImageProcessor.from_pretrained(path, subfolder="processor"),
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="processor"),
        )
    return DiffusionPipeline.from_pretrained(path, **kwargs)


def run_reference(path: str, params: GenerationParams):
    """diffusers' output (uint8 images, final latents) for ``params``."""
    pipe = reference_pipeline(path)
    captured = {}

    def keep(_pipe, _i, _t, tensors):
        captured["latents"] = tensors["latents"].clone()
        return tensors

    kwargs = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        num_images_per_prompt=params.num_images,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
        callback_on_step_end=keep,
    )
    if params.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = params.true_cfg_scale
    if params.images:
        kwargs["image"] = params.images if len(params.images) > 1 else params.images[0]
    images = pipe(**kwargs).images
    return (images * 255).round().astype(np.uint8), captured["latents"]


def run_ours(path: str, batch: list[GenerationParams], callback=None, fuse=False):
    pipe = registry.load_pipeline(path, ParallelState.single())
    pipe.fuse_batches = fuse
    captured = []
    decode = pipe.decode

    def record(job, latents):
        captured.append(latents.clone())
        return decode(job, latents)

    pipe.decode = record
    results = pipe.generate(batch, callback)
    return results, captured


def edit_images():
    rng = np.random.default_rng(3)
    first = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    second = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    return [first, second]


FAMILIES = {"t2i": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit_plus": "Qwen-Image-Edit-2509"}
"""Support-matrix names of the tiny checkpoint kinds."""
CASES = {
    "t2i": ("t2i", dict(prompt="a red cat")),
    "t2i_true_cfg": ("t2i", dict(prompt="a red cat", negative_prompt="blurry", num_images=2)),
    "edit_one_image": ("edit", dict(prompt="make it red", negative_prompt=" ", n_images=1)),
    "edit_two_images": ("edit_plus", dict(prompt="make it red", negative_prompt=" ", n_images=2)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_equals_diffusers(tiny_checkpoints, case):
    kind, spec = case
    spec = dict(spec)
    n_images = spec.pop("n_images", 0)
    params = GenerationParams(
        width=96, height=64, num_inference_steps=3, seed=7, true_cfg_scale=4.0,
        images=edit_images()[:n_images], **spec,
    )  # fmt: skip
    ref_images, ref_latents = run_reference(tiny_checkpoints[kind], params)
    results, latents = run_ours(tiny_checkpoints[kind], [params])
    err = (latents[-1] - ref_latents).abs().max().item()
    assert err <= LATENT_TOL, f"latents differ by {err:.2e}"
    ours = np.stack([np.asarray(im) for im in results[0].images])
    assert ours.shape == ref_images.shape == (params.num_images, 64, 96, 3)
    # Not bit-identical by construction (our attention runs another kernel): 1/255 at most.
    assert np.abs(ours.astype(int) - ref_images.astype(int)).max() <= 1
    assert ours.std() > 10  # the tiny decoder draws a real picture, not a flat grey
    record(FAMILIES[kind], "1 rank vs diffusers", err, max_image_diff(list(ours), list(ref_images)))


def test_templates_match_reference(tiny_checkpoints):
    for kind, template in (("t2i", templates.T2I), ("edit", templates.EDIT),
                           ("edit_plus", templates.EDIT_PLUS)):  # fmt: skip
        ref = reference_pipeline(tiny_checkpoints[kind])
        assert template.text == ref.prompt_template_encode
        assert template.drop == ref.prompt_template_encode_start_idx
        tok = AutoTokenizer.from_pretrained(tiny_checkpoints[kind], subfolder="tokenizer")
        assert len(tok(template.prefix)["input_ids"]) == template.drop


def test_registry_rejects_unknown_class(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(ValueError, match=r"'NoSuchPipeline' is not supported; supported classes: "
                       r"\[.*'QwenImageEditPlusPipeline', .*'QwenImagePipeline'.*\]"):  # fmt: skip
        registry.load_pipeline(str(tmp_path), ParallelState.single())


def test_registry_selects_by_class_name(tiny_checkpoints):
    from ithaca.models.qwen_image import pipeline

    assert registry.pipeline_class(tiny_checkpoints["t2i"]) is pipeline.QwenImagePipeline
    assert registry.pipeline_class(tiny_checkpoints["edit"]) is pipeline.QwenImageEditPipeline
    edit_plus = registry.pipeline_class(tiny_checkpoints["edit_plus"])
    assert edit_plus is pipeline.QwenImageEditPlusPipeline


def _digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def test_tiny_build_is_deterministic(tmp_path, tiny_checkpoints):
    again = build_tiny_qwen_image(tmp_path / "again", "t2i", seed=0)
    assert _digest(again) == _digest(Path(tiny_checkpoints["t2i"]))
    other = build_tiny_qwen_image(tmp_path / "other", "t2i", seed=1)
    assert _digest(other) != _digest(again)


def test_saved_and_reloaded_checkpoint_gives_the_same_image(tmp_path, tiny_checkpoints):
    params = GenerationParams(
        prompt="a red cat", width=64, height=64, num_inference_steps=2, seed=3
    )
    first, _ = run_ours(tiny_checkpoints["t2i"], [params])
    reference_pipeline(tiny_checkpoints["t2i"]).save_pretrained(tmp_path / "saved")
    second, _ = run_ours(str(tmp_path / "saved"), [params])
    assert np.array_equal(np.asarray(first[0].images[0]), np.asarray(second[0].images[0]))


def test_batch_equals_requests_run_alone(tiny_checkpoints):
    path = tiny_checkpoints["t2i"]
    common = dict(num_inference_steps=2, height=64)
    a = GenerationParams(prompt="a red cat", negative_prompt="blurry", width=64, seed=1,
                         request_id="a", **common)  # fmt: skip
    b = GenerationParams(prompt="a small blue bird near a tree", negative_prompt="dark",
                         width=64, seed=2, request_id="b", **common)  # fmt: skip
    # Another size: its own group.
    c = GenerationParams(prompt="a dog", width=96, seed=3, request_id="c", **common)
    together, lat_together = run_ours(path, [a, b, c], fuse=True)
    assert [r.request_id for r in together] == ["a", "b", "c"]
    assert len(lat_together) == 2  # (a, b) in one loop, c in another
    for i, p in enumerate((a, b)):
        alone, lat_alone = run_ours(path, [p])
        err = (lat_together[0][i] - lat_alone[0][0]).abs().max().item()
        assert err <= LATENT_TOL, f"request {p.request_id}: batched latents differ by {err:.2e}"
        diff = np.abs(np.asarray(together[i].images[0], int) - np.asarray(alone[0].images[0], int))
        assert diff.max() <= 1
    assert together[2].images[0].size == (96, 64)


def test_unfused_batch_gives_every_request_exactly_its_solo_bytes(tiny_checkpoints):
    path = tiny_checkpoints["t2i"]
    batch = [
        GenerationParams(prompt=p, negative_prompt="blurry", width=64, height=64,
                         num_inference_steps=2, seed=s, request_id=p)
        for p, s in (("a red cat", 1), ("a small blue bird near a tree", 2), ("a dog", 3))
    ]  # fmt: skip
    together, loops = run_ours(path, batch)
    assert len(loops) == 3  # one loop per request
    for i, params in enumerate(batch):
        alone, _ = run_ours(path, [params])
        assert np.array_equal(np.asarray(together[i].images[0]), np.asarray(alone[0].images[0]))


def test_progress_cancellation_and_previews(tiny_checkpoints):
    events = []

    def callback(event):
        events.append(event)
        return event.step == 3  # cancel after the third of four steps

    params = GenerationParams(prompt="a cat", width=64, height=64, num_inference_steps=4, seed=1,
                              partial_images=1, request_id="r")  # fmt: skip
    results, latents = run_ours(tiny_checkpoints["t2i"], [params], callback)
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.total_steps == 4 and e.request_ids == ["r"] for e in events)
    # One preview, half-way: after step 2 of 4.
    assert [e.previews is not None for e in events] == [False, True, False]
    assert events[1].previews[0].size == (64, 64)
    assert results[0].metadata["cancelled"] and results[0].images == []
    assert results[0].metadata["steps_done"] == 3
    assert len(latents) == 1  # only the preview was decoded


def test_seed_is_reported_and_reproduces(tiny_checkpoints):
    path = tiny_checkpoints["t2i"]
    base = dict(prompt="a cat", width=64, height=64, num_inference_steps=2)
    drawn, _ = run_ours(path, [GenerationParams(**base)])
    seed = drawn[0].metadata["seed"]
    again, _ = run_ours(path, [GenerationParams(**base, seed=seed)])
    other, _ = run_ours(path, [GenerationParams(**base, seed=seed + 1)])
    assert np.array_equal(np.asarray(drawn[0].images[0]), np.asarray(again[0].images[0]))
    assert not np.array_equal(np.asarray(drawn[0].images[0]), np.asarray(other[0].images[0]))


def test_sizes_round_down_like_diffusers_and_invalid_requests_raise(tiny_checkpoints):
    pipe = registry.load_pipeline(tiny_checkpoints["t2i"], ParallelState.single())
    assert (pipe.default_width, pipe.default_height, pipe.default_steps) == (1024, 1024, 50)
    request = pipe.resolve(GenerationParams(prompt="x", width=100, height=70))
    assert (request.width, request.height) == (96, 64)  # multiples of 2 * vae_scale_factor
    with pytest.raises(ValueError, match=r"width \(20\) must be an integer of at least 32"):
        pipe.resolve(GenerationParams(prompt="x", width=20, height=64))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.resolve(GenerationParams(prompt="x", num_inference_steps=0))
    with pytest.raises(ValueError, match=r"num_inference_steps \(1\) must be at least 2"):
        pipe.resolve(GenerationParams(prompt="x", num_inference_steps=1))
    with pytest.raises(ValueError, match="takes no input images"):
        pipe.resolve(GenerationParams(prompt="x", images=edit_images()[:1]))
    edit = registry.load_pipeline(tiny_checkpoints["edit"], ParallelState.single())
    with pytest.raises(ValueError, match="needs exactly one input image"):
        edit.resolve(GenerationParams(prompt="x"))
    with pytest.raises(ValueError, match="Qwen-Image-Edit needs exactly one input image, got 2"):
        edit.resolve(GenerationParams(prompt="x", images=edit_images()))


def test_true_cfg_needs_a_negative_prompt_like_the_reference(tiny_checkpoints):
    pipe = registry.load_pipeline(tiny_checkpoints["t2i"], ParallelState.single())
    assert not pipe.resolve(GenerationParams(prompt="x", true_cfg_scale=4.0)).do_cfg
    assert not pipe.resolve(
        GenerationParams(prompt="x", negative_prompt="y", true_cfg_scale=1.0)
    ).do_cfg
    assert pipe.resolve(GenerationParams(prompt="x", negative_prompt="y")).do_cfg  # default 4.0


def test_tiny_model_path_builds_once(tmp_path, monkeypatch):
    from ithaca.testing.tiny import tiny_model_path

    monkeypatch.setenv("ITHACA_CACHE", str(tmp_path))
    path = tiny_model_path()
    assert Path(path, "model_index.json").is_file()
    stamp = Path(path, "model_index.json").stat().st_mtime_ns
    assert tiny_model_path() == path
    assert Path(path, "model_index.json").stat().st_mtime_ns == stamp
    assert registry.pipeline_class(path).__name__ == "QwenImagePipeline"


def test_local_directory_loads_offline_without_network(tiny_checkpoints, monkeypatch):
    # HF_HUB_OFFLINE=1 and every socket connection refused: a local directory must load.
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    params = GenerationParams(prompt="a cat", width=64, height=64, num_inference_steps=2, seed=1)
    results, _ = run_ours(tiny_checkpoints["t2i"], [params])
    assert results[0].images[0].size == (64, 64)


def test_dtype_option(tiny_checkpoints):
    pipe = registry.load_pipeline(tiny_checkpoints["t2i"], ParallelState.single(), torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    params = GenerationParams(
        prompt="a red cat", width=64, height=64, num_inference_steps=2, seed=4
    )
    bf16 = np.asarray(pipe.generate([params])[0].images[0], dtype=int)
    fp32 = np.asarray(run_ours(tiny_checkpoints["t2i"], [params])[0][0].images[0], dtype=int)
    assert registry.default_dtype(torch.device("cpu")) == torch.float32
    assert registry.default_dtype(torch.device("cuda")) == torch.bfloat16
    # The same picture at bf16 precision: close to fp32 (a tiny random model amplifies
    # rounding), much closer than another seed's picture.
    other = dataclasses.replace(params, seed=5)
    fp32_other = np.asarray(run_ours(tiny_checkpoints["t2i"], [other])[0][0].images[0], dtype=int)
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.8
    assert np.abs(bf16 - fp32).mean() < 0.5 * np.abs(fp32_other - fp32).mean()
