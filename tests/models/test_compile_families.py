"""``--compile`` for Z-Image (the family whose RoPE was complex): every repeated block
(noise refiner, caption refiner, main layers) traces to one graph with no complex
operator left (the RoPE in the real form, :mod:`ithaca.models.rotary`; inductor generates
no code for complex ops), and the compiled images stay within 1/255 of eager. Bagel
refuses ``--compile`` with its reason (its layers do not compile to a bounded set of
graphs).

Cheap on purpose: dynamo + AOT autograd trace the blocks at the ATen level inductor sees
(``fullgraph=True``: a graph break fails), and the traced graphs run on eager kernels, so
no C++ is generated. Inductor itself runs in ``test_compile.py`` (default model, Qwen-Image
on 2 ranks) and ``benchmarks/compile.py``.
"""

import numpy as np
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from ithaca.models.compiled import compile_pipeline
from ithaca.models.registry import load_pipeline
from ithaca.models.z_image.pipeline import ZImagePipeline
from ithaca.parallel import ParallelState
from ithaca.types import GenerationParams

REQUEST = dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=3.0, width=32,
               height=32, num_inference_steps=2, seed=4)  # fmt: skip


def aten_checker(graphs: list, complex_ops: set):
    """A backend that records each ATen graph and the ops computing a complex tensor (a
    complex input is allowed: its ``view_as_real`` is a free real view), then runs it."""

    def check(gm, example_inputs):
        graphs.append(gm)
        for node in gm.graph.nodes:
            value = node.meta.get("val")
            if node.op != "placeholder" and getattr(value, "is_complex", bool)():
                complex_ops.add(str(node.target))
        return gm.forward

    return aot_autograd(fw_compiler=check)


def test_z_image_blocks_compile_whole_without_complex_ops(tiny_family):
    pipe = load_pipeline(tiny_family(ZImagePipeline), ParallelState.single())
    eager = pipe.generate([GenerationParams(**REQUEST)])[0].images[0]
    graphs, complex_ops = [], set()
    torch._dynamo.reset()
    count = compile_pipeline(pipe, backend=aten_checker(graphs, complex_ops), fullgraph=True)
    t = pipe.transformer
    assert count == len(t.noise_refiner) + len(t.context_refiner) + len(t.layers)
    compiled = pipe.generate([GenerationParams(**REQUEST)])[0].images[0]
    assert graphs and complex_ops == set()
    diff = np.abs(np.asarray(compiled, int) - np.asarray(eager, int)).max()
    assert diff <= 1


def test_bagel_refuses_compile_with_its_reason():
    """Bagel's layers compile per layer and segment shape (measured: 8 graphs, the
    recompile limit, for one 2-step request; images equal to eager): refused clearly at
    start-up, before anything is wrapped, instead of a slow start and eager layers."""
    from ithaca.models.bagel.pipeline import BagelPipeline

    pipe = BagelPipeline.__new__(BagelPipeline)  # the refusal needs no weights
    with pytest.raises(ValueError, match=r"not supported for Bagel: .*recompile"):
        compile_pipeline(pipe)
