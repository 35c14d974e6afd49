"""LoRA adapters (ithaca.runtime.lora) on FLUX.1, Qwen-Image and Wan2.2.

Pyramid: in-process 1-rank runs against diffusers' ``load_lora_weights`` +
``set_adapters`` with the same scales (latents within 1e-5, images within 1/255), for
a diffusers-format file, a kohya/ComfyUI file and PEFT LoHa and LoKr folders; two stacked
adapters; scale 0 and unloading give the base model bit for bit (adding zero; no
adapter left in the forward); fusing restores the base weights bit for bit; a file that
does not fit names its key and loads nothing. Then 2-rank gloo layouts (Ulysses, Ring,
CFG-parallel) with adapters on every rank against our 1-rank run (the adapter touches
``proj_out``, the layer the plan gathers at, so the hooks must follow peft's wrapper).
Tiny random checkpoints and adapters, 28x20 px, 2 steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from unittest import mock

import numpy as np
import pytest
import torch

from ithaca.config import CacheConfig
from ithaca.models.flux.pipeline import FluxPipeline
from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.testing.lora import random_lora, save_peft_folder, save_safetensors
from ithaca.types import GenerationParams, LoraRef
from tests.models import harness
from tests.models.harness import (
    LAYOUTS,
    check_layout,
    check_reference,
    diffusers_reference,
    generate,
    max_image_diff,
    world_size,
)

REQUEST = dict(prompt="a red cat", width=28, height=20, num_inference_steps=2, seed=3,
               guidance_scale=3.5, request_id="r")  # fmt: skip
CFG = dict(REQUEST, negative_prompt="blurry", true_cfg_scale=4.0, request_id="cfg")


def _transformer(path, cls):
    return cls.from_pretrained(path, subfolder="transformer")


@pytest.fixture(scope="module")
def flux(tiny_family, tmp_path_factory):
    """The tiny FLUX.1-dev checkpoint and two random diffusers-format adapters."""
    from diffusers import FluxTransformer2DModel

    path = tiny_family(FluxPipeline)
    root = tmp_path_factory.mktemp("lora_flux")
    model = _transformer(path, FluxTransformer2DModel)
    a = save_safetensors(random_lora(model, seed=1), root / "a.safetensors")
    b = save_safetensors(random_lora(model, seed=2, targets=("ff.net.2",)), root / "b.safetensors")
    return {"path": path, "a": a, "b": b, "model": model, "root": root}


@contextlib.contextmanager
def reference_loras(loras):
    """diffusers' reference pipelines load ``loras`` ``(name, path, scale)`` and
    ``set_adapters`` them with those scales."""
    original = harness._load_reference

    def load(class_name, path):
        pipe = original(class_name, path)
        for name, file, _ in loras:
            pipe.load_lora_weights(
                os.path.dirname(file), weight_name=os.path.basename(file), adapter_name=name
            )
        pipe.set_adapters([n for n, _, _ in loras], [s for _, _, s in loras])
        return pipe

    with mock.patch.object(harness, "_load_reference", load):
        yield


def _refs(*pairs):
    return tuple(LoraRef(n, s) for n, s in pairs)


def test_flux_diffusers_format_equals_diffusers(flux):
    loras = (("a", flux["a"], 0.8),)
    ours = generate({}, flux["path"], [dict(REQUEST, lora=_refs(("a", None)))], loras=loras)
    assert ours[2]["metadata"][0]["lora"] == [{"name": "a", "scale": 0.8}]
    with reference_loras(loras):
        reference = diffusers_reference(flux["path"], REQUEST)
    check_reference(ours, 0, reference)
    base = diffusers_reference(flux["path"], REQUEST)
    assert max_image_diff(ours[0][0], base[1]) > 8  # the adapter changes the image


def test_flux_two_stacked_adapters_equal_diffusers(flux):
    loras = (("a", flux["a"], 1.0), ("b", flux["b"], 1.0))
    request = dict(CFG, lora=_refs(("a", 0.7), ("b", -0.5)))
    ours = generate({}, flux["path"], [request], loras=loras)
    with reference_loras((("a", flux["a"], 0.7), ("b", flux["b"], -0.5))):
        reference = diffusers_reference(flux["path"], CFG)
    check_reference(ours, 0, reference)


def test_scale_zero_fusing_and_unloading_give_the_base_model_back(flux):
    pipe = load_pipeline(flux["path"], ParallelState.single())
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def image(**extra):
        result = pipe.generate([GenerationParams(**REQUEST, **extra)])[0]
        return np.asarray(result.images[0])

    base = image()
    pipe.load_lora("a", flux["a"], 1.0)
    assert np.array_equal(image(), base)  # loaded, not applied: the base model
    assert np.array_equal(image(lora=_refs(("a", 0.0))), base)  # adds exactly zero
    unfused = image(lora=_refs(("a", 0.6)))
    pipe.fuse_loras = True
    fused = image(lora=_refs(("a", 0.6)))
    assert max_image_diff([fused], [unfused]) <= 1  # merged weights round differently
    assert pipe.loras.fused  # stays merged while the same set is asked for
    assert np.array_equal(image(lora=_refs(("a", 0.6))), fused)
    assert np.array_equal(image(), base)  # unfused: the kept weights copied back
    pipe.unload_lora("a")
    assert pipe.list_loras() == []
    assert np.array_equal(image(), base)
    state = pipe.transformer.state_dict()
    for key, value in weights.items():  # peft's wrappers rename base_layer weights
        wrapped = key.rsplit(".", 1)
        now = state.get(key, state.get(f"{wrapped[0]}.base_layer.{wrapped[1]}"))
        assert torch.equal(now, value), key


def test_mismatched_file_names_its_key_and_loads_nothing(flux, tmp_path):
    pipe = load_pipeline(flux["path"], ParallelState.single())
    state = random_lora(flux["model"], seed=4)
    key = sorted(state)[0].replace(".lora_A.", ".lora_B.")
    state[key] = torch.zeros(7, 4)  # 7 outputs: fits no layer
    bad = save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=rf"{key}.*FLUX.1"):
        pipe.load_lora("bad", bad)
    other = save_safetensors({"transformer.nope.lora_A.weight": torch.zeros(4, 8)},
                             tmp_path / "other.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"transformer\.nope\.lora_A\.weight"):
        pipe.load_lora("other", other)
    assert pipe.list_loras() == []
    assert not getattr(pipe.transformer, "peft_config", {})
    with pytest.raises(ValueError, match="unknown LoRA 'bad'") as info:
        pipe.generate([GenerationParams(**REQUEST, lora=_refs(("bad", 1.0)))])
    assert info.value.param == "lora"


def test_request_field_of_a_lora_error_reaches_the_error_body(flux):
    """A :class:`ParamError` raised on the model (an expert FLUX.1 does not have, a taken
    name, ``layers`` on a flat model) keeps its ``param`` through the engine's failure to
    the OpenAI error body; the expert is refused by validation, before it is queued."""
    from ithaca.engine.errors import GenerationFailedError
    from ithaca.engine.executor import InProcessExecutor, PipelineSpec
    from ithaca.server.errors import from_engine
    from ithaca.types import LoraCommand

    pipe = load_pipeline(flux["path"], ParallelState.single())
    executor = InProcessExecutor(PipelineSpec(model=flux["path"]), pipeline=pipe)
    executor.manage_lora(LoraCommand("load", "a", flux["a"], 1.0))
    bad = GenerationParams(**REQUEST, lora=(LoraRef("a", 1.0, "high_noise"),))
    for run in (executor.validate, lambda p: executor.execute([p], None)):  # queued / its batch
        with pytest.raises(GenerationFailedError, match="expert 'high_noise'") as info:
            run(bad)
        error = from_engine(info.value).body()["error"]
        assert (info.value.status, error["param"], error["code"]) == (400, "lora", "invalid_value")
    with pytest.raises(GenerationFailedError, match="already loaded") as info:
        executor.manage_lora(LoraCommand("load", "a", flux["b"], 1.0))
    assert from_engine(info.value).body()["error"]["param"] == "name"
    with pytest.raises(GenerationFailedError, match="only for layered models") as info:
        executor.validate(GenerationParams(**REQUEST, layers=2))
    assert from_engine(info.value).body()["error"]["param"] == "layers"


def test_no_false_missing_keys_warning(flux):
    """diffusers' missing-keys warning matches adapter names as substrings: loading ``b``
    after ``a`` listed ``a``'s keys (``b`` is in ``transformer_blocks``). Ours says nothing;
    a key of ``b`` itself would still be reported (the filter keeps its own keys)."""
    from ithaca.runtime.lora_files import _OwnMissingKeys

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    peft_log = logging.getLogger("diffusers.utils.peft_utils")
    peft_log.addHandler(handler)
    try:
        pipe = load_pipeline(flux["path"], ParallelState.single())
        pipe.load_lora("a", flux["a"])
        pipe.load_lora("b", flux["b"])
    finally:
        peft_log.removeHandler(handler)
    assert not [m for m in seen if "missing keys" in m], seen
    head = _OwnMissingKeys.HEAD
    record = logging.LogRecord("x", logging.WARNING, "", 0, head + "x.lora_A.a.weight, "
                               "x.lora_B.b.weight.", None, None)  # fmt: skip
    assert _OwnMissingKeys("b").filter(record) and record.msg == head + "x.lora_B.b.weight."


def _arrays(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_a_lora_request_never_joins_a_step_batch(flux):
    """Continuous batching: a request with an adapter runs its own loop with the adapter
    (``Request.lora`` is resolved with the request, so its join key is its own); it once
    joined the step batch and ran on the base weights. Same loop: equal bytes."""
    from ithaca.runtime.stepping import generate_stepwise, join_key

    pipe = load_pipeline(flux["path"], ParallelState.single())
    pipe.load_lora("a", flux["a"])
    with_a = GenerationParams(**dict(REQUEST, lora=_refs(("a", None)), request_id="a"))
    plain = GenerationParams(**dict(REQUEST, seed=4, request_id="plain"))
    assert join_key(pipe, pipe.resolve(with_a))[-1] is not None  # alone
    stepped = generate_stepwise(pipe, [plain, with_a])
    assert [r.request_id for r in stepped] == ["plain", "a"]
    assert stepped[1].metadata["lora"] == [{"name": "a", "scale": 1.0}]
    alone = pipe.generate([with_a])[0]
    assert max_image_diff(_arrays(stepped[1]), _arrays(alone)) == 0
    base = pipe.generate([GenerationParams(**dict(REQUEST, request_id="b"))])[0]
    assert max_image_diff(_arrays(alone), _arrays(base)) > 8  # the adapter is on


def test_lru_residency_reloads_on_demand(flux):
    pipe = load_pipeline(flux["path"], ParallelState.single())
    pipe.max_loras = 1
    pipe.load_lora("a", flux["a"])
    pipe.load_lora("b", flux["b"])
    assert [x["resident"] for x in pipe.list_loras()] == [False, True]
    first = pipe.generate([GenerationParams(**REQUEST, lora=_refs(("a", 0.5)))])[0]
    assert [x["resident"] for x in pipe.list_loras()] == [True, False]  # a back, b out
    pipe.generate([GenerationParams(**REQUEST, lora=_refs(("b", 0.5)))])
    again = pipe.generate([GenerationParams(**REQUEST, lora=_refs(("a", 0.5)))])[0]
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_folder_equals_peft_on_diffusers(flux, kind):
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = save_peft_folder(flux["model"], flux["root"] / kind, kind=kind, seed=5)
    ours = generate({}, flux["path"], [dict(REQUEST, lora=_refs(("h", 1.0)))],
                    loras=(("h", folder, 1.0),))  # fmt: skip
    original = harness._load_reference

    def load(class_name, path):  # peft itself on the reference's transformer
        pipe = original(class_name, path)
        inject_adapter_in_model(PeftConfig.from_pretrained(folder), pipe.transformer, "h")
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        set_peft_model_state_dict(pipe.transformer, weights, adapter_name="h")
        return pipe

    with mock.patch.object(harness, "_load_reference", load):
        reference = diffusers_reference(flux["path"], REQUEST)
    check_reference(ours, 0, reference)
    assert max_image_diff(ours[0][0], diffusers_reference(flux["path"], REQUEST)[1]) > 8


SPLIT = {"tp2": dict(tensor_parallel_size=2), "tp2 fused": dict(tensor_parallel_size=2),
         "hsdp2": dict(ulysses_degree=2, use_hsdp=True)}  # fmt: skip
"""Ride on the ulysses2 task: adapters split like the weights (the packed single-block
``proj_out``, row-parallel ``to_out.0`` / ``ff.net.2``); HSDP fuses the set."""


def generate_each(layouts: dict, path: str, batch: list[dict], loras: tuple) -> dict:
    """``harness.generate`` under each layout (``fused`` in the name: ``fuse_loras``)."""
    return {
        name: generate(layout, path, batch, {"fuse_loras": "fused" in name}, loras)
        for name, layout in layouts.items()
    }


@pytest.mark.parametrize("name", ["ulysses2", "ring2", "cfg2", "hybrid2x2"])
def test_flux_layouts_equal_one_rank(worker_pool, flux, name):
    loras = (("a", flux["a"], 0.8), ("b", flux["b"], 1.0))
    batch = [dict(CFG, lora=_refs(("a", None), ("b", 0.5))), dict(REQUEST, request_id="base")]
    one_rank = generate({}, flux["path"], batch, loras=loras)
    layouts = {name: LAYOUTS[name], **(SPLIT if name == "ulysses2" else {})}
    results = worker_pool(world_size(LAYOUTS[name])).run(generate_each, layouts, flux["path"],
                                                         batch, loras)  # fmt: skip
    check_layout([r[name] for r in results], one_rank)
    assert max_image_diff(one_rank[0][0][:1], one_rank[0][1]) > 8  # adapter vs base differ
    for split in layouts.keys() - {name}:  # the returning rank's latents and images
        images, latents, _ = results[0][split]
        err = max((a - b).abs().max().item() for a, b in zip(latents, one_rank[1], strict=True))
        diff = max(max_image_diff(a, b) for a, b in zip(images, one_rank[0], strict=True))
        print(f"FLUX.1 {split} with adapters: latents {err:.1e}, images {diff}/255")
        assert err <= 1e-4 and diff <= 1, (split, err, diff)


def test_step_cache_state_is_per_adapter_set(flux):
    """TeaCache with adapters: the cache is rebuilt when the adapter set changes (its
    key holds the set), so A after B decides exactly as A after A."""
    pipe = load_pipeline(flux["path"], ParallelState.single())
    pipe.configure_cache(CacheConfig.from_dict("tea_cache", {"rel_l1_thresh": 0.6}))
    pipe.load_lora("a", flux["a"])
    pipe.load_lora("b", flux["b"])
    request = dict(REQUEST, num_inference_steps=4)

    def run(*pairs):
        result = pipe.generate([GenerationParams(**request, lora=_refs(*pairs))])[0]
        assert pipe.step_cache_key[1] == tuple(LoraRef(n, s) for n, s in pairs)
        return np.asarray(result.images[0]), result.metadata["cache"]

    first = run(("a", 1.0))
    run(("b", 1.0))
    again = run(("a", 1.0))
    assert np.array_equal(first[0], again[0]) and first[1] == again[1]
    assert first[1]["cached_steps"] + first[1]["computed_steps"] == 4


def test_offloaded_transformer_takes_adapters_and_gives_the_base_back(flux):
    """--enable-cpu-offload / --enable-layerwise-offload keep the transformer's tensors by
    identity, so peft's renamed weights and added adapter tensors do not shift the host
    copy: a LoRA request equals the resident run (latents 1e-5, images 1/255), and after
    unloading the host buffer and the image are the base ones, bit for bit."""
    loras = (("a", flux["a"], 0.8),)
    batch = [dict(CFG, lora=_refs(("a", None)))]
    resident = generate({}, flux["path"], batch, loras=loras)
    for layout in (dict(cpu_offload=True), dict(layerwise_offload=True)):
        offloaded = generate(layout, flux["path"], batch, loras=loras)
        check_reference(offloaded, 0, (resident[1][0], resident[0][0]))

    from ithaca.config import ParallelConfig

    pipe = load_pipeline(flux["path"], ParallelState.single(ParallelConfig(cpu_offload=True)))
    pipe.fuse_loras = True  # refused under offload: a merge would land in the device copy
    copy = pipe.offloading.offload.copies["transformer"]
    host = copy.flat.clone()

    def image(**extra):
        result = pipe.generate([GenerationParams(**CFG, **extra)])[0]
        return np.asarray(result.images[0])

    base = image()
    pipe.load_lora("a", flux["a"], 0.8)
    adapted = image(lora=_refs(("a", None)))
    assert max_image_diff([adapted], resident[0][0]) <= 1
    assert max_image_diff([adapted], [base]) > 8  # the adapter ran
    assert not pipe.loras.fused and not copy.resident() and copy.loads >= 2
    pipe.unload_lora("a")
    assert np.array_equal(image(), base)
    assert torch.equal(copy.flat, host)  # the host copy never saw the adapter


def test_adapters_split_like_the_weights_they_touch(flux):
    """Tensor parallel 2 as rank 1, no processes: FLUX.1's own ``_tp_plan`` splits the
    model, and :func:`split_for_layout` keeps rank 1's rows of ``lora_B`` on a
    column-parallel layer (``lora_A`` whole), its columns of ``lora_A`` on a row-parallel
    one (``lora_B`` whole), block by block on the packed single-block ``proj_out``
    (``cat([attention, MLP])``), rows of ``lora_B`` on the gathered AdaLN modulation
    (``norm1.linear``), and whole adapters on replicated layers; so the local
    ``B A`` is exactly this rank's slice of the whole ``B A``. Adapters that cannot be
    split so are refused naming the key, and a file is checked against the full sizes."""
    from types import SimpleNamespace

    from ithaca.models.flux.transformer import FluxTransformer2DModel
    from ithaca.parallel.tensor import split_weights
    from ithaca.runtime.lora_files import check_fits, split_for_layout
    from ithaca.testing.lora import TARGETS

    model = _transformer(flux["path"], FluxTransformer2DModel)
    state = random_lora(model, seed=1, targets=(*TARGETS, "norm1.linear"))
    split_weights(model, SimpleNamespace(tp=SimpleNamespace(size=2, rank=1)), "FLUX.1")
    check_fits(state, model, "FLUX.1", "a", prefix="transformer.")  # full shapes still fit
    local = split_for_layout(state, model, "FLUX.1", "a", prefix="transformer.")

    def pair(layer, tensors):
        return tensors[f"transformer.{layer}.lora_B.weight"], tensors[
            f"transformer.{layer}.lora_A.weight"
        ]

    def second_halves(delta, dim, blocks):  # rank 1's pieces, block by block
        parts, start = [], 0
        for block in blocks:
            parts.append(delta.narrow(dim, start + block // 2, block // 2))
            start += block
        return torch.cat(parts, dim)

    layers = {"transformer_blocks.0.attn.to_q": 0, "transformer_blocks.0.attn.to_out.0": 1,
              "single_transformer_blocks.0.proj_out": 1, "proj_out": None,
              "transformer_blocks.0.norm1.linear": 0}  # fmt: skip
    for layer, dim in layers.items():
        (b, a), (lb, la) = pair(layer, state), pair(layer, local)
        if dim is None:  # replicated: whole
            assert lb is b and la is a
            continue
        assert (lb is b) == (dim == 1) and (la is a) == (dim == 0), layer  # one factor whole
        blocks = model._tp_specs[f"{layer}.weight"].block_sizes
        assert len(blocks) == (2 if layer.startswith("single") else 1)
        whole = second_halves(b @ a, dim, blocks)
        assert (lb @ la).shape == model.get_submodule(layer).weight.shape
        assert torch.allclose(lb @ la, whole, atol=1e-6), layer

    bad = dict(state)
    bad["transformer.transformer_blocks.0.attn.to_out.0.lora_B.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"to_out\.0\.lora_B\.bias.*row-parallel"):
        split_for_layout(bad, model, "FLUX.1", "bad", prefix="transformer.")
    dora = {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(64)}
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*column-parallel"):
        split_for_layout(dora, model, "FLUX.1", "dora", prefix="transformer.")
    short = {"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"has shape \(32, 4\), FLUX.1's .*to_q has 64 outputs"):
        check_fits(
            short, model, "FLUX.1", "short", prefix="transformer."
        )  # the local size is not the model's
