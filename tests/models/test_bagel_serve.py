"""``ithaca serve <bagel-golden>/checkpoint`` end to end through the OpenAI SDK.

One real server process (in-process executor): ``images.generate`` and ``images.edit``
with Bagel's extension fields reproduce the official runs' images (cases a and c) within
1 level; a bad extension field is a 400 naming it. Without processes: a layout asking
for sequence or CFG parallelism is refused at load.
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.models._bagel_golden import CHECKPOINT, GOLDEN, image_levels, load_case, requires_golden

pytestmark = requires_golden


@pytest.fixture(scope="module")
def server(serve):
    return serve(CHECKPOINT, "--executor", "inprocess", "--served-model-name", "bagel-tiny")


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)


def _pixels(b64_json: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(b64_json)))))


def _options(case: dict) -> dict:
    return {**case["params"], "seed": case["seed"]}


def test_sdk_generate_reproduces_case_a(server):
    case, ref = load_case("a_t2i_64x64")
    result = _client(server).images.generate(
        model="bagel-tiny", prompt=case["prompt"], size="64x64", extra_body=_options(case)
    )
    levels, share = image_levels(_pixels(result.data[0].b64_json), ref["final.image_uint8"])
    assert levels <= 1 and share <= 0.001


def test_sdk_edit_reproduces_case_c(server):
    case, ref = load_case("c_edit_112x224")
    options = _options(case)
    options["cfg_interval"] = str(options["cfg_interval"])  # multipart: JSON text
    with open(GOLDEN / "cases" / "c_edit_112x224" / "input.png", "rb") as f:
        result = _client(server).images.edit(
            model="bagel-tiny", image=f, prompt=case["prompt"], extra_body=options
        )
    ours = _pixels(result.data[0].b64_json)
    assert tuple(ours.shape) == (112, 224, 3)  # the transformed input's size
    levels, share = image_levels(ours, ref["final.image_uint8"])
    assert levels <= 1 and share <= 0.001


def test_bad_bagel_option_is_a_400_naming_it(server):
    r = server.client.post(
        "/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "cfg_renorm_type": "per_pixel"},
    )
    assert r.status_code == 400 and "cfg_renorm_type" in r.text
    r = server.client.post(
        "/v1/images/generations", json={"prompt": "x", "size": "64x64", "cfg_interval": [0.9, 0.1]}
    )
    assert r.status_code == 400 and "cfg_interval" in r.text


@pytest.mark.parametrize("sp,cfg", [(2, 1), (1, 2)])
def test_sequence_or_cfg_parallel_layout_is_refused(sp, cfg):
    from ithaca.models.bagel.pipeline import BagelPipeline

    state = SimpleNamespace(sp=SimpleNamespace(size=sp), cfg=SimpleNamespace(size=cfg))
    state.tp = SimpleNamespace(size=1)  # TP 2: allowed, redundant (test_bagel_hsdp.py)
    state.config = SimpleNamespace(use_hsdp=False, tensor_parallel_size=1)  # HSDP: allowed
    state.device = torch.device("cpu")
    with pytest.raises(ValueError, match="no sequence or CFG parallelism"):
        BagelPipeline(CHECKPOINT, state, torch.float32)


def test_python_api_reproduces_case_d():
    from ithaca.api import Ithaca

    case, ref = load_case("d_t2i_64x32_interval")
    h, w = case["image_hw"]
    with Ithaca(CHECKPOINT) as gen:
        result = gen.generate(
            case["prompt"], width=w, height=h, seed=case["seed"], model_options=case["params"]
        )
    ours = torch.from_numpy(np.array(result.images[0]))
    levels, share = image_levels(ours, ref["final.image_uint8"])
    assert levels <= 1 and share <= 0.001
    assert result.metadata["num_inference_steps"] == 7  # 8 timesteps, 7 model calls


def test_resolve_rejects_what_bagel_cannot_do_and_n_images_use_consecutive_seeds(tmp_path):
    from ithaca.models.registry import load_pipeline
    from ithaca.parallel import ParallelState
    from ithaca.types import GenerationParams

    pipe = load_pipeline(CHECKPOINT, ParallelState.single())
    quick = {"num_timesteps": 3}
    image = Image.new("RGB", (64, 64))
    bad = {
        "negative_prompt": dict(negative_prompt="blurry"),
        "one input image": dict(images=[image, image]),
        "unknown Bagel option": dict(model_options={"cfg_scale": 2.0}),
        "both sides <= 1024": dict(width=1040, height=64),
        "timestep_shift": dict(model_options={"timestep_shift": 0.0}),
        "cfg_img_scale": dict(model_options={"cfg_img_scale": "high"}),  # a 400, not a TypeError
        "cfg_renorm_type": dict(model_options={"cfg_renorm_type": "per_pixel"}),  # not via HTTP
    }
    for message, fields in bad.items():
        with pytest.raises(ValueError, match=message):
            pipe.resolve(GenerationParams(prompt="a cat", **fields))
    for fields in ({}, {"true_cfg_scale": 2.0}, {"guidance_scale": 5.0}):
        spec = pipe.resolve(GenerationParams(prompt="a cat", **fields)).extra_key[0]
        assert spec.cfg_text_scale == fields.get("true_cfg_scale", fields.get("guidance_scale", 3))
        assert (spec.num_timesteps, spec.cfg_interval, spec.cfg_img_scale) == (50, (0.4, 1), 1.5)
    two = pipe.generate(
        [GenerationParams(prompt="a cat", width=32, height=32, seed=7, num_images=2,
                          model_options=quick)]
    )[0]  # fmt: skip
    second = pipe.generate(
        [GenerationParams(prompt="a cat", width=32, height=32, seed=8, model_options=quick)]
    )[0]
    assert len(two.images) == 2 and two.metadata["seed"] == 7
    pair = pipe.generate(
        [
            GenerationParams(prompt=p, width=32, height=32, seed=s, model_options=quick)
            for p, s in (("a cat", 8), ("a dog", 7))
        ]
    )  # one group, two contexts
    assert np.array_equal(np.array(pair[0].images[0]), np.array(second.images[0]))
    assert pair[1].metadata["seed"] == 7 and len(pair[1].images) == 1
    events, decodes = [], []
    pipe.generate(
        [GenerationParams(prompt="a cat", width=48, height=32, seed=7, partial_images=2,
                          model_options={"num_timesteps": 5})],
        callback=lambda event: events.append(event) and False, on_decode=decodes.append,
    )  # fmt: skip
    previews = [e.previews[0].size for e in events if e.previews]
    assert [e.step for e in events] == [1, 2, 3, 4] and previews == [(48, 32)] * 2
    n = len(pipe.vae.decoder.up_blocks)  # the final decode: one event per up-block
    assert [(e.chunk, e.chunks) for e in decodes] == [(k, n) for k in range(n + 1)]
    assert np.array_equal(np.array(two.images[1]), np.array(second.images[0]))
    assert not np.array_equal(np.array(two.images[0]), np.array(two.images[1]))
    # a step checkpoint (the shared loop's): cancelled after step 1, resumed to the same image
    path = str(tmp_path / "bagel.pt")
    resumable = GenerationParams(prompt="a cat", width=32, height=32, seed=7, model_options=quick,
                                 checkpoint=path, checkpoint_every=1)  # fmt: skip
    cut = pipe.generate([resumable], callback=lambda event: event.step >= 1)[0]
    assert cut.metadata["cancelled"] and cut.metadata["steps_done"] == 1 and not cut.images
    assert (tmp_path / "bagel.pt").exists()  # what the next run resumes from
    resumed = pipe.generate([resumable])[0]
    assert np.array_equal(np.array(resumed.images[0]), np.array(two.images[0]))
