"""``ithaca serve MODEL --tensor-parallel-size 2 --vae-patch-parallel-size 2``: the
OpenAI API through a torchrun group of two tensor-parallel ranks that also split the
VAE decode by rows gives the picture of one in-process rank (within 1/255: the
all-reduce sums in another order; the split decode is exact)."""

import base64
import io

import numpy as np
import openai
from PIL import Image

from ithaca.models.registry import load_pipeline
from ithaca.parallel import ParallelState
from ithaca.testing.tiny import build_tiny_qwen_image
from ithaca.types import GenerationParams


def test_serve_tensor_parallel_2_with_split_vae_equals_one_rank(serve, tmp_path_factory):
    model = str(build_tiny_qwen_image(tmp_path_factory.mktemp("tp") / "ckpt", "t2i"))
    server = serve(model, "--tensor-parallel-size", "2", "--vae-patch-parallel-size", "2",
                   "--served-model-name", "tiny")  # fmt: skip
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    res = client.images.generate(model="tiny", prompt="a red cat", size="64x64",
                                 extra_body={"num_inference_steps": 2, "seed": 5})  # fmt: skip
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))), int)

    pipe = load_pipeline(model, ParallelState.single())
    params = GenerationParams(prompt="a red cat", width=64, height=64, num_inference_steps=2,
                              seed=5)  # fmt: skip
    [result] = pipe.generate([params])
    one_rank = np.asarray(result.images[0], int)
    assert served.shape == one_rank.shape
    assert np.abs(served - one_rank).max() <= 1
