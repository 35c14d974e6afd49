"""Shared fixtures of the whole suite.

- ``worker_pool(n)``: multi-rank tests borrow a pool of spawned gloo ranks per world
  size, started once per session (see ithaca.testing.distributed).
- ``tiny_checkpoint(recipe, *args, **kwargs)``: every tiny checkpoint is built once per
  run, keyed by its recipe and arguments, and shared by every test module and every
  xdist worker (tests read checkpoints, they never write into them); ``tiny_family``,
  ``tiny_checkpoints`` and ``tiny_wan`` are views of it; ``with_defaults(path,
  **defaults)`` is a checkpoint with other ``_ithaca_defaults`` (e.g. a small edit area),
  its weights linked, not copied.
- ``serve(*cli_args)``: the one real ``ithaca serve`` fixture (tests/server/harness.py;
  each server forked from one preloaded interpreter, tests/server/preload.py).

The test process and every process it starts compute with one intra-op thread: the
models are tiny, and on 2 cores shared with pool ranks, servers and other jobs a second
OpenMP thread only spin-waits (a tiny diffusers run took 36 s with 2 threads against 2.3 s
with 1 on a loaded machine). ``ITHACA_TEST_WORKERS=2 bash scripts/test`` runs the suite on
2 xdist workers and then the tests marked ``serial`` alone (docs/testing.md).
"""

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import pathlib
import shutil

import pytest
import torch

from ithaca.testing.distributed import WorkerPool

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by ithaca serve / generate subprocesses
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def worker_pool():
    """``worker_pool(n)`` -> a live :class:`WorkerPool` of n ranks (restarted if broken)."""
    pools: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        pool = pools.get(world_size)
        if pool is None or not pool.alive:
            pool = pools[world_size] = WorkerPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        pool.stop()  # every rank of every pool exits at once; then wait for each
    for pool in pools.values():
        pool.close()


def shared_directory(config: pytest.Config, tmp_path_factory) -> pathlib.Path:
    """The directory every process of this test run shares: ``$ITHACA_TEST_SHARED``
    (scripts/test: one for its parallel and its serial pytest run), else the run's basetemp
    (that of the xdist controller, the parent of each worker's, when run with ``-n``)."""
    if os.environ.get("ITHACA_TEST_SHARED"):
        return pathlib.Path(os.environ["ITHACA_TEST_SHARED"])
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def tiny_checkpoint(request, tmp_path_factory):
    """``tiny_checkpoint(recipe, *args, **kwargs)`` -> the path (str) of the checkpoint
    ``recipe(directory, *args, **kwargs)`` builds, built once per test run for each recipe
    and set of arguments (defaults filled in, so ``seed=0`` and no seed are one build):
    the first process to need it builds it under a file lock in the shared directory,
    the other xdist workers (and scripts/test's serial run) wait and read it."""
    from filelock import FileLock

    shared = shared_directory(request.config, tmp_path_factory) / "checkpoints"
    shared.mkdir(parents=True, exist_ok=True)
    built: dict[tuple, str] = {}

    def build(recipe, *args, **kwargs) -> str:
        bound = inspect.signature(recipe).bind(None, *args, **kwargs)
        bound.apply_defaults()
        key = (recipe.__module__, recipe.__qualname__, repr(bound.arguments))
        if key not in built:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            root = shared / f"{recipe.__name__.removeprefix('build_tiny_')}-{digest}"
            done = root / "built"  # the recipe's returned path, written last
            with FileLock(f"{root}.lock"):
                if not done.exists():
                    shutil.rmtree(root, ignore_errors=True)  # a build that died half-way
                    root.mkdir()
                    done.write_text(str(recipe(root / "ckpt", *args, **kwargs)))
            built[key] = done.read_text()
        return built[key]

    return build


@pytest.fixture(scope="session")
def with_defaults(tmp_path_factory):
    """``with_defaults(path, **defaults)`` -> the path of a view of checkpoint ``path`` whose
    ``model_index.json`` states ``_ithaca_defaults`` (width, height, num_inference_steps):
    a Qwen-Image edit checkpoint with ``width=128, height=128`` resizes its input images to
    that area instead of 1024x1024. Its components are symlinks; built once per arguments."""
    built: dict[tuple, str] = {}

    def view(path: str, **defaults) -> str:
        key = (os.path.realpath(path), tuple(sorted(defaults.items())))
        if key not in built:
            root = tmp_path_factory.mktemp("defaults")
            for entry in os.scandir(path):
                if entry.name != "model_index.json":
                    os.symlink(entry.path, root / entry.name)
            with open(os.path.join(path, "model_index.json")) as f:
                index = json.load(f)
            index["_ithaca_defaults"] = {**index.get("_ithaca_defaults", {}), **defaults}
            (root / "model_index.json").write_text(json.dumps(index, indent=2))
            built[key] = str(root)
        return built[key]

    return view


@pytest.fixture(scope="session")
def tiny_family(tiny_checkpoint):
    """``tiny_family(PipelineClass, seed=0, **overrides)`` -> the path of the tiny checkpoint
    its spec's recipe builds (``spec.tiny`` with ``spec.tiny_args`` and the overrides)."""

    def build(pipeline: type, seed: int = 0, **overrides) -> str:
        spec = pipeline.spec
        module, _, name = spec.tiny.partition(":")
        recipe = getattr(importlib.import_module(module), name)
        return tiny_checkpoint(recipe, seed=seed, **{**spec.tiny_args, **overrides})

    return build


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_checkpoint):
    """``{"t2i" | "edit" | "edit_plus": path}`` of tiny Qwen-Image checkpoints (seed 0)."""
    from ithaca.testing.tiny import build_tiny_qwen_image

    kinds = ("t2i", "edit", "edit_plus")
    return {kind: tiny_checkpoint(build_tiny_qwen_image, kind) for kind in kinds}


@pytest.fixture(scope="session")
def tiny_wan(tiny_checkpoint):
    """``{"t2v_a14b" | "i2v_a14b" | "ti2v_5b": path}`` of tiny Wan2.2 checkpoints (seed 0),
    each built on first use."""
    from ithaca.testing.tiny_wan import build_tiny_wan

    class Lazy(dict):
        def __missing__(self, kind: str) -> str:
            return self.setdefault(kind, tiny_checkpoint(build_tiny_wan, kind))

    return Lazy()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """The one real-server fixture: ``serve(*cli_args, env=, api_key=)`` starts ``ithaca
    serve`` and waits for ``/health``; every server it started stops when the module ends."""
    from tests.server.harness import serving

    with contextlib.ExitStack() as stack:

        def start(*args: str, env: dict | None = None, api_key: str | None = None,
                  timeout: float = 240.0):  # fmt: skip
            state = str(tmp_path_factory.mktemp("serve"))
            running = contextlib.contextmanager(serving)
            return stack.enter_context(
                running(*args, state_dir=state, env=env, api_key=api_key, timeout=timeout)
            )

        yield start


@pytest.hookimpl(tryfirst=True)  # before -m deselects the serial tests
def pytest_collection_modifyitems(config, items):
    serial = os.environ.get("ITHACA_TEST_SERIAL")
    if serial and getattr(config, "workerinput", {}).get("workerid", "gw0") == "gw0":
        # scripts/test's serial run collects the files named here, not the whole suite
        # again (every xdist worker collects the same items: the first one writes them).
        files = dict.fromkeys(
            i.nodeid.split("::")[0] for i in items if i.get_closest_marker("serial")
        )
        pathlib.Path(serial).write_text("".join(f"{file}\n" for file in files))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    """scripts/test runs the suite as two pytest runs and states one result: each run (the
    xdist controller, not its workers) appends its counts to ``$ITHACA_TEST_COUNTS``."""
    path = os.environ.get("ITHACA_TEST_COUNTS")
    if path and not hasattr(config, "workerinput"):
        kinds = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        counts = {kind: len(terminalreporter.stats.get(kind, ())) for kind in kinds}
        with open(path, "a") as f:
            f.write(json.dumps(counts) + "\n")
