"""``--compile``: the real-form RoPE equals diffusers' complex one; compiled blocks give
the eager images (within 1/255) on the default model and on a 2-rank Ulysses layout,
with the collectives kept out of the graphs; step caches keep the compiled forward.

Compiling is slow on 2 cores: the default model compiles once with inductor (64x64, 2
steps; ``compile_threads=1``: no worker pool to start); the 2-rank run traces the same
graphs with ``aot_eager`` (no code generation).
"""

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ithaca.config import CacheConfig, ParallelConfig
from ithaca.models.registry import load_pipeline
from ithaca.models.rotary import apply_rope, real_freqs
from ithaca.models.shapes import shipped_checkpoint_path
from ithaca.parallel import ParallelState
from ithaca.runtime.compiled import compile_pipeline, repeated_blocks, use_cache_dir
from ithaca.testing.distributed import parallel_state
from ithaca.types import GenerationParams


def test_real_rope_equals_complex_rope():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 4, 32, generator=gen)  # (B, S, H, D)
    angles = torch.randn(37, 16, generator=gen) * 20
    freqs = torch.polar(torch.ones_like(angles), angles)  # (S, D/2) complex
    want = apply_rotary_emb_qwen(x, freqs, use_real=False)
    got = apply_rope(x, real_freqs(freqs))
    assert real_freqs(freqs).shape == (37, 16, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (apply_rope(x, freqs) - want).abs().max() <= 1e-6  # complex input accepted
    half = apply_rope(x.to(torch.bfloat16), real_freqs(freqs))
    assert half.dtype == torch.bfloat16  # computed in fp32, returned in x's dtype


def _images(pipe, batch: list[dict]) -> list[np.ndarray]:
    results = pipe.generate([GenerationParams(**b) for b in batch])
    return [np.asarray(im, dtype=np.int16) for r in results for im in r.images]


def _eager_then_compiled(pipe, batch, tmp_dir, backend="inductor"):
    eager = _images(pipe, batch)
    use_cache_dir(tmp_dir)
    with torch._inductor.config.patch(compile_threads=1):
        count = compile_pipeline(pipe, backend=backend)
        compiled = _images(pipe, batch)
    return eager, compiled, count


BATCH = [dict(prompt="a red circle", width=64, height=64, num_inference_steps=2, seed=3)]


def test_compiled_default_model_matches_eager(tmp_path):
    pipe = load_pipeline(shipped_checkpoint_path(), ParallelState.single())
    eager, compiled, count = _eager_then_compiled(pipe, BATCH, str(tmp_path / "inductor"))
    assert count == len(pipe.transformer.transformer_blocks) == 4
    for x, y in zip(eager, compiled, strict=True):
        assert np.abs(x - y).max() <= 1
    assert any((tmp_path / "inductor").iterdir())  # artefacts kept for a restart
    # A step cache wraps the compiled forward and puts it back when removed.
    compiled_forwards = [b.forward for b in repeated_blocks(pipe.transformer)]
    pipe.install_cache(CacheConfig.from_dict("tea_cache", {}))
    assert [b.forward for b in pipe.transformer.transformer_blocks] != compiled_forwards
    pipe.install_cache(None)
    assert [b.forward for b in pipe.transformer.transformer_blocks] == compiled_forwards


def compiled_vs_eager(layout: dict, path: str, cache_dir: str):
    """On every rank: eager images, then compiled (rank 0 returns them)."""
    with parallel_state(ParallelConfig(**layout)) as state:
        pipe = load_pipeline(path, state)
        batch = [dict(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=4.0,
                      width=32, height=32, num_inference_steps=2, seed=5)]  # fmt: skip
        # aot_eager: the same graphs and graph breaks as inductor, without its code
        # generation (the 1-rank test covers inductor's numbers; two ranks compiling at
        # once on 2 cores would cost minutes).
        eager, compiled, _ = _eager_then_compiled(
            pipe, batch, f"{cache_dir}/{state.rank}", backend="aot_eager"
        )
        eager_attention = pipe.runtime.attention is not pipe.runtime._eager_attention
        pipe.runtime.remove()
        return eager, compiled, eager_attention


@pytest.mark.parametrize("layout", [{"ulysses_degree": 2}], ids=["ulysses2"])
def test_compiled_multi_rank_matches_eager(worker_pool, tiny_checkpoints, tmp_path, layout):
    ranks = worker_pool(2).run(compiled_vs_eager, layout, tiny_checkpoints["t2i"], str(tmp_path))
    eager, compiled, wrapped = ranks[0]
    assert wrapped and ranks[1][2]  # the collectives run outside the graphs on every rank
    assert len(eager) == 1 and ranks[1][0] == []  # images on the returning rank only
    for x, y in zip(eager, compiled, strict=True):
        assert np.abs(x - y).max() <= 1


def test_flags_reach_every_rank_and_bad_values_name_the_field():
    from ithaca.cli import _sizes
    from ithaca.config import ServerConfig
    from ithaca.engine.executor import PipelineSpec, spec_from_json, spec_to_json

    assert _sizes("128x128, 256x192") == ((128, 128), (256, 192)) and _sizes("") == ()
    with pytest.raises(ValueError, match="--compile-sizes"):
        _sizes("128")
    with pytest.raises(ValueError, match=r"compile_sizes \(0x64\)"):
        ServerConfig(compile_sizes=((0, 64),))
    with pytest.raises(ValueError, match=r"checkpoint_every \(0\)"):
        ServerConfig(checkpoint_every=0)
    assert ServerConfig.compile_cache_dir("/srv/state") == "/srv/state/compile"
    spec = PipelineSpec(compile_cache_dir="/srv/state/compile", compile_sizes=((64, 32),))
    back, _ = spec_from_json(spec_to_json(spec, 1.0))
    assert back.compile_cache_dir == spec.compile_cache_dir
    assert back.compile_sizes == ((64, 32),)
