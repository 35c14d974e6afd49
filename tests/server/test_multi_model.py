"""One server, two models (issue 22): the shipped image model and a tiny Wan2.2 video model
in one ``ithaca serve`` process (in-process executors, one per model), driven by the
official SDK: both APIs, both models listed, default routing by task, a wrong-task model
-> 400 naming ``model``, and honest prompts (unknown words named in a warning)."""

import io
import time

import av
import openai
import pytest

from ithaca.models.shapes import shipped_checkpoint_path
from ithaca.server.serve import ModelEntry

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


@pytest.fixture(scope="module")
def server(serve, tiny_wan):
    wan = tiny_wan["t2v_a14b"]
    return serve(shipped_checkpoint_path() + "@name=shapes", "--model", f"{wan}@name=tiny-wan",
                 "--executor", "inprocess", timeout=300)  # fmt: skip


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_models_are_listed_with_their_tasks(server, client):
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == ["shapes", "tiny-wan"]
    assert listed["shapes"].model_extra["tasks"] == ["image"]
    assert listed["tiny-wan"].model_extra["tasks"] == ["video"]
    card = server.client.get("/v1/models/shapes").json()
    assert {"red", "circle", "triangle", "left", "background"} <= set(card["vocabulary"])
    assert card["defaults"] == {"width": 128, "height": 128, "num_inference_steps": 20}
    assert "vocabulary" not in server.client.get("/v1/models/tiny-wan").json()
    groups = server.client.get("/health").json()["groups"]  # each group names its model
    assert [g["model"] for g in groups] == ["shapes", "tiny-wan"], groups


def test_images_route_to_the_image_model_and_warn_on_unknown_words(server, client):
    image = client.images.generate(
        prompt="a red circle on a blue background", size="64x64",
        extra_body={"num_inference_steps": 2, "seed": 0},
    )  # fmt: skip
    assert image.data[0].b64_json and not (image.model_extra or {}).get("warnings")
    r = server.client.post(
        "/v1/images/generations",
        json={"model": "shapes", "prompt": "a red fox in the snow", "size": "64x64",
              "num_inference_steps": 2},
    )  # fmt: skip
    assert r.status_code == 200
    (warning,) = r.json()["warnings"]
    assert "fox, snow" in warning and "shapes" in warning
    assert "unknown words for model 'shapes': fox, snow" in server.log()


def test_videos_route_to_the_video_model(client):
    video = client.videos.create(
        prompt="a cat walks on the beach", size="32x32", seconds="1",
        extra_body={"num_frames": 5, "fps": 4, "num_inference_steps": 2, "seed": 0},
    )  # fmt: skip
    assert video.model == "tiny-wan"
    deadline = time.monotonic() + 180
    while video.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video.error
    blob = client.videos.download_content(video.id).read()
    with av.open(io.BytesIO(blob)) as c:
        frames = list(c.decode(c.streams.video[0]))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (32, 32)


def test_a_model_that_cannot_do_the_task_is_a_400_naming_model(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="tiny-wan", prompt="a red circle", size="64x64")
    assert err.value.body["param"] == "model" and "not images" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(model="shapes", prompt="a red circle")
    assert err.value.body["param"] == "model" and "'tiny-wan'" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="nope", prompt="a red circle")
    assert err.value.body["param"] == "model"


def test_model_arguments_carry_their_own_layout():
    from ithaca.cli import build_parser, parse_model
    from ithaca.config import ParallelConfig

    default = ParallelConfig(ulysses_degree=2)
    entry = parse_model("Wan-AI/Wan2.2-TI2V-5B-Diffusers@usp=1,ring=2,dp=2,name=wan", default)
    assert entry == ModelEntry(
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "wan",
        ParallelConfig(ulysses_degree=1, ring_degree=2, data_parallel_size=2),
    )
    assert parse_model("Qwen/Qwen-Image", default) == ModelEntry("Qwen/Qwen-Image", None, default)
    with pytest.raises(ValueError, match="'ulysses=2' must be name=NAME or one of usp=N"):
        parse_model("Qwen/Qwen-Image@ulysses=2", default)
    args = build_parser().parse_args(["serve", "a", "--model", "b@usp=2", "--usp", "2"])
    assert (args.models, args.more_models, args.ulysses_degree) == (["a"], ["b@usp=2"], 2)
