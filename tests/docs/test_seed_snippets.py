"""Every Python snippet of the seed documents runs here (one test per snippet).

The snippets are read from ``../shared/seeds/*.md`` at test time (skipped, saying so,
when the folder is absent). What a user changes, and nothing else: the import lines
(``vllm_omni...`` -> ``ithaca...``, see ``seeds.IMPORTS``). One concession to a 2-core
CPU: ``2048`` (pixels) becomes ``128``; every other number (steps, degrees, scales) is
as written. The hub names the snippets use (``Qwen/Qwen-Image``, ``Qwen/Qwen-Image-Edit``)
resolve to tiny random-weight checkpoints through a Hugging Face cache this module
builds (offline mode), exactly as a pre-downloaded hub cache would on a server.
Free names a snippet assumes its reader has (``nn``, ``torch``, ``input_image``) are
provided, and the imports of the document's earlier snippets. Multi-rank snippets run on
real torchrun worker groups (gloo); snippets with the same model, layout and cache share
one group (``Omni.close`` leaves it to the module's teardown), so five groups start, not
nine.

Pyramid: this is the top (whole engine, subprocess ranks); the parts are tested below it.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from ithaca.parallel import validate_sp_plan
from ithaca.types import GenerationResult
from tests.docs import seeds

# Blocks that are not Python as written (the documents elide with "..."), with why.
FRAGMENTS = {
    "support-sequence-parallel.md#6": "def forward(self, hidden_states, ...) elides parameters",
    "support-sequence-parallel.md#7": "an _sp_plan whose remaining entries are elided (...)",
    "support-sequence-parallel.md#8": "one dict entry of an _sp_plan, not a statement",
    "support-sequence-parallel.md#10": "an _sp_plan whose remaining entries are elided (...)",
    "parallelism-acceleration-guide.md#diff0": "a diff inside a forward with elided parameters",
    "parallelism-acceleration-guide.md#diff1": "a diff inside a forward with elided parameters",
}

HUB = {"Qwen/Qwen-Image": "t2i", "Qwen/Qwen-Image-Edit": "edit"}
SMALL = 128  # stands for 2048 px


def _snippets():
    if not seeds.available():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no seeds at {seeds.SEEDS}"))]
    return [pytest.param(b, id=b.key) for b in seeds.python_snippets()]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_checkpoints, with_defaults):
    """A Hugging Face cache in which the snippets' hub names are tiny checkpoints (the
    session's, stating a SMALL x SMALL default size)."""
    root = tmp_path_factory.mktemp("seed-hub")
    for name, kind in HUB.items():
        path = with_defaults(tiny_checkpoints[kind], width=SMALL, height=SMALL)
        repo = root / "hub" / ("models--" + name.replace("/", "--"))
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots").mkdir()
        (repo / "snapshots" / commit).symlink_to(path, target_is_directory=True)
    return root / "hub"


class _SharedIthaca:
    """An engine several snippets with the same model and layout use in turn."""

    def __init__(self, real):
        self.engine = real.engine
        self.real = real

    def close(self) -> None:  # Omni.close(): the module's teardown stops the engine
        pass


@pytest.fixture(scope="module")
def shared_engines():
    """Worker groups by (model, layout, cache, dtype): starting one costs tens of seconds
    on 2 cores, and several snippets differ only in how they call the same engine."""
    engines: dict = {}
    yield engines
    for shared in engines.values():
        shared.real.close()


@pytest.fixture
def offline_hub(hub_cache, shared_engines, monkeypatch):
    import ithaca.omni as omni_module
    from ithaca.api import Ithaca

    def shared_ithaca(model, **kwargs):
        key = (model, *sorted(kwargs.items()))
        if key not in shared_engines:
            shared_engines[key] = _SharedIthaca(Ithaca(model, **kwargs))
        return shared_engines[key]

    monkeypatch.setattr(omni_module, "Ithaca", shared_ithaca)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _close_engines(namespace: dict) -> None:
    from ithaca.omni import Omni

    for value in namespace.values():
        if isinstance(value, Omni):
            value.close()


def _check_outputs(block, namespace: dict) -> None:
    outputs = namespace["outputs"]
    assert isinstance(outputs, list) and len(outputs) == 1
    result = outputs[0]
    assert isinstance(result, GenerationResult)
    assert len(result.images) == 1
    meta = result.metadata
    steps = re.search(r"num_inference_steps=(\d+)", block.text)
    assert meta["num_inference_steps"] == int(steps.group(1))
    if "width=" in block.text:
        assert result.images[0].size == (SMALL, SMALL)
    if "cache_backend=" in block.text:
        backend = re.search(r'cache_backend="(\w+)"', block.text).group(1)
        assert meta["cache"]["backend"] == backend
        assert meta["cache"]["computed_steps"] + meta["cache"]["cached_steps"] == 50
    # The seeds' CFG-parallel snippet sets true_cfg_scale without a negative prompt:
    # the second cfg rank has nothing to do, and the result says so.
    if "cfg_parallel_size" in block.text:
        assert meta["true_cfg_scale"] is None
        assert any("cfg_parallel_size" in w for w in meta.get("warnings", []))


def _earlier_imports(block) -> str:
    """The top-level import statements of the snippets before ``block`` in its document."""
    doc = block.key.split("#")[0]
    lines = []
    for earlier in seeds.python_snippets():
        if earlier.key == block.key:
            break
        if earlier.key.startswith(doc + "#") and earlier.key not in FRAGMENTS:
            tree = ast.parse(earlier.text)
            lines += [
                ast.unparse(n) for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
            ]
    return "\n".join(lines)


@pytest.mark.parametrize("block", _snippets())
def test_seed_snippet_runs(block, offline_hub, tmp_path, monkeypatch):
    if block.key in FRAGMENTS:
        with pytest.raises(SyntaxError):
            compile(block.text, block.key, "exec")
        return
    monkeypatch.chdir(tmp_path)
    code = re.sub(r"\b2048\b", str(SMALL), block.text)
    namespace = {
        "__name__": "__seed__",
        "nn": nn,
        "torch": torch,
        "input_image": Image.new("RGB", (96, 64), (200, 120, 40)),
    }
    # A snippet continues the ones before it in its document: their imports are in scope.
    exec(_earlier_imports(block), namespace)
    try:
        exec(compile(code, block.key, "exec"), namespace)
    finally:
        _close_engines(namespace)
    if "outputs" in namespace:
        _check_outputs(block, namespace)
    for value in list(namespace.values()):
        if isinstance(value, type) and issubclass(value, nn.Module) and "_sp_plan" in vars(value):
            validate_sp_plan(value._sp_plan)
    if "parallel_config" in namespace:
        degrees = dict(re.findall(r"(\w+_degree)=(\d+)", code))
        for name, value in degrees.items():
            assert getattr(namespace["parallel_config"], name) == int(value)


def test_every_fragment_is_still_in_the_seeds():
    if not seeds.available():
        pytest.skip(f"no seeds at {seeds.SEEDS}")
    keys = {b.key for b in seeds.python_snippets()}
    assert set(FRAGMENTS) <= keys
    assert os.path.isdir(Path(seeds.SEEDS))
