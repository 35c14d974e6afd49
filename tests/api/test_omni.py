"""The documented offline API (``ithaca.omni``) and the idle CFG-parallel warning.

Pyramid: argument conversion in-process; one in-process engine on a tiny checkpoint
(bit-identical to ``ithaca.api.Ithaca`` by construction: same engine, same seed);
2-rank gloo for the CFG-parallel warning. The seeds' snippets are in tests/docs.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

from ithaca import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams, ParallelConfig
from ithaca.api import Ithaca
from ithaca.config import CacheConfig
from ithaca.omni import _cache_options, _prompt_fields, resolve_model
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams


def test_sampling_params_validate_and_convert():
    with pytest.raises(ValueError, match=r"num_inference_steps \(0\)"):
        OmniDiffusionSamplingParams(num_inference_steps=0)
    with pytest.raises(ValueError, match=r"num_outputs_per_prompt \(0\)"):
        OmniDiffusionSamplingParams(num_outputs_per_prompt=0)
    fields = OmniDiffusionSamplingParams(width=64, num_outputs_per_prompt=3).to_fields()
    params = GenerationParams(prompt="x", **fields)
    assert (params.width, params.num_images) == (64, 3)


def test_prompt_dicts_and_cache_configs():
    img = Image.new("RGB", (8, 8))
    fields = _prompt_fields(
        {"prompt": "dog", "negative_prompt": "", "multi_modal_data": {"image": [img, img]}}
    )
    assert fields == {"prompt": "dog", "negative_prompt": "", "images": [img, img]}
    assert _prompt_fields({"prompt": "dog", "multi_modal_data": {"image": img}})["images"] == [img]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prompts'\]"):
        _prompt_fields({"prompts": "dog"})
    with pytest.raises(ValueError, match="unsupported key"):
        _prompt_fields({"prompt": "dog", "multi_modal_data": {"video": 1}})

    @dataclasses.dataclass
    class TeaCacheConfig:
        rel_l1_thresh: float = 0.3

    class Plain:
        def __init__(self):
            self.Fn_compute_blocks = 2

    assert _cache_options(TeaCacheConfig()) == {"rel_l1_thresh": 0.3}
    assert _cache_options(Plain()) == {"Fn_compute_blocks": 2}
    config = CacheConfig.from_dict("tea_cache", {"rel_l1_thresh": 0.1})
    assert _cache_options(config) == {"rel_l1_thresh": 0.1}
    assert DiffusionParallelConfig is ParallelConfig


def test_unknown_hub_id_offline_is_a_value_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="neither a local directory"):
        resolve_model("nobody/no-such-model")


def test_omni_matches_ithaca_in_process(tiny_checkpoints):
    path = tiny_checkpoints["t2i"]
    params = OmniDiffusionSamplingParams(num_inference_steps=2, width=64, height=64, seed=5)
    with Omni(model=path, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.2}) as omni:
        outputs = omni.generate(["a red fox", {"prompt": "a blue bird"}], params)
        keyword = omni.generate(prompt="a red fox", num_inference_steps=2, width=64, height=64,
                                seed=5)  # fmt: skip
        two = omni.generate("a red fox", dataclasses.replace(params, num_outputs_per_prompt=2))
        with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['steps'\]"):
            omni.generate("x", steps=3)
    with Ithaca(path, cache=CacheConfig.from_dict("tea_cache", {"rel_l1_thresh": 0.2})) as gen:
        reference = gen.generate("a red fox", num_inference_steps=2, width=64, height=64, seed=5)
    assert len(outputs) == 2 and len(two) == 1 and len(two[0].images) == 2
    assert outputs[0].metadata["cache"]["backend"] == "tea_cache"
    same = np.asarray(outputs[0].images[0])
    assert np.array_equal(same, np.asarray(reference.images[0]))
    assert np.array_equal(same, np.asarray(keyword[0].images[0]))
    assert not np.array_equal(same, np.asarray(outputs[1].images[0]))


def run_cfg_parallel(path: str, negative_prompt: str | None):
    from ithaca.models.registry import load_pipeline

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ithaca.runtime.loop").addHandler(handler)
    with parallel_state(ParallelConfig(cfg_parallel_size=2)) as state:
        pipe = load_pipeline(path, state)
        params = GenerationParams(
            prompt="a cat", negative_prompt=negative_prompt, true_cfg_scale=4.0,
            width=64, height=64, num_inference_steps=2, seed=0, request_id="r1",
        )  # fmt: skip
        results = pipe.generate([params])
        pipe.runtime.remove()
    logging.getLogger("ithaca.runtime.loop").removeHandler(handler)
    logged = [r.getMessage() for r in records if "cfg_parallel_size" in r.getMessage()]
    return (results[0].metadata if pipe.is_returning_rank else None), logged


def test_cfg_parallel_without_true_cfg_warns_once_per_request(worker_pool, tiny_checkpoints):
    pool = worker_pool(2)
    idle_runs = pool.run(run_cfg_parallel, tiny_checkpoints["t2i"], None)
    used_runs = pool.run(run_cfg_parallel, tiny_checkpoints["t2i"], "")
    idle = [m for m, _ in idle_runs if m]
    used = [m for m, _ in used_runs if m]
    assert len(idle) == 1 and len(used) == 1  # the returning rank's metadata
    assert sum(len(logged) for _, logged in idle_runs) == 1  # one line, one rank
    assert "request r1:" in next(line for _, logged in idle_runs for line in logged)
    assert sum(len(logged) for _, logged in used_runs) == 0
    assert idle[0]["true_cfg_scale"] is None
    (warning,) = idle[0]["warnings"]
    assert "cfg_parallel_size=2" in warning and "negative_prompt" in warning
    assert used[0]["true_cfg_scale"] == 4.0 and "warnings" not in used[0]
