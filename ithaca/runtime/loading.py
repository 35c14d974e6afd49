"""Load a diffusers component straight to its device and dtype, one tensor at a time.

``cls.from_pretrained(path, torch_dtype=bf16).to("cuda:3")`` on every rank of a node
holds, per rank and at the same time, the checkpoint shard being read plus the whole
model in host RAM before the copy to the GPU: 8 ranks x 41 GB (Qwen-Image) or
8 x 57 GB (Wan2.2 A14B) in flight. :func:`load_streamed` instead

1. builds the module on the ``meta`` device (parameters take no memory; buffers, which
   checkpoints may not hold, are built for real: they are small);
2. reads the safetensors files tensor by tensor, casts each to the target dtype on
   the target device, and puts it in place; the files are re-opened every
   ``window_bytes`` so that the memory map never keeps more than that resident;
3. fails naming the parameters the checkpoint lacks (a model never runs with
   uninitialised weights).

A rank's host memory at peak is then about one tensor plus the map window, not the
model in its stored dtype plus a copy; ``tests/models/test_loading.py`` measures it.
With HSDP or tensor parallelism (``shard=``) the module is sharded while still on
``meta`` and each rank allocates and reads only the rows or columns it keeps: its peak
is its shard plus one tensor.
Checkpoints whose keys need a diffusers conversion (single-file, legacy names) are
not streamed: the loader raises on unexpected keys and :func:`load_frozen` falls back to
``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from ithaca.parallel.hsdp import local_rows
from ithaca.parallel.tensor import DegreeError, take

log = logging.getLogger(__name__)

WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def component_dir(model: str, subfolder: str | None) -> str:
    """Local directory of ``model/subfolder`` (a hub id is fetched into the HF cache)."""
    if not os.path.isdir(model):
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        model = snapshot_download(model, allow_patterns=[pattern])
    return os.path.join(model, subfolder) if subfolder else model


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a diffusers component directory, in index order."""
    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, n) for n in names]
    single = os.path.join(directory, WEIGHTS)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS} or {WEIGHTS_INDEX} in {directory}")


def load_frozen(cls, model: str, subfolder: str, device, dtype: torch.dtype, shard=None):
    """``cls`` from ``model/subfolder`` on ``device``, frozen for inference: streamed
    (:func:`load_streamed`), else through diffusers' ``from_pretrained`` (key conversion),
    then split by ``shard``. A tensor-parallel degree that does not fit the model
    (``DegreeError``) is raised as it is: no whole-model fallback load."""
    try:
        module = load_streamed(cls, model, subfolder, device=device, dtype=dtype, shard=shard)
    except DegreeError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        log.info("%s: loading through from_pretrained (%s)", model, exc)
        module = cls.from_pretrained(model, subfolder=subfolder, torch_dtype=dtype).to(device)
        if shard is not None:
            module = shard(module)
    return module.eval().requires_grad_(False)


def load_streamed(
    cls,
    model: str,
    subfolder: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    window_bytes: int = 256 << 20,
    shard: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """``cls`` (a diffusers ``ModelMixin``) from ``model/subfolder`` on ``device``, in eval.

    Floating-point tensors are cast to ``dtype`` (None: as stored), except in the
    class's ``_keep_in_fp32_modules``; other tensors keep their dtype.

    ``shard`` (e.g. :func:`ithaca.parallel.hsdp.apply_hsdp_to_model` bound to its mesh,
    or :func:`ithaca.parallel.tensor.split_weights`) is applied to the module while it is
    still on ``meta``; each rank then allocates only its shards on ``device`` and reads
    only their parts from the files (``safe_open(...).get_slice``): an HSDP DTensor's
    rows, or the pieces the hook recorded in ``module._load_slices`` (parameter name ->
    ``[(dim, start, length), ...]``, concatenated along dim). Its peak memory is its
    shard plus one tensor's part.
    """
    from accelerate import init_empty_weights

    directory = component_dir(model, subfolder)
    with init_empty_weights(include_buffers=False):
        module = cls.from_config(cls.load_config(directory))
    return stream_weights(
        module,
        weight_files(directory),
        device=device,
        dtype=dtype,
        window_bytes=window_bytes,
        shard=shard,
    )


def stream_weights(
    module: nn.Module,
    paths: list[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    window_bytes: int = 256 << 20,
    shard: Callable[[nn.Module], nn.Module] | None = None,
    skip: frozenset[str] = frozenset(),
) -> nn.Module:
    """The tensors of the safetensors files ``paths`` into ``module``, built on ``meta``
    (buffers may be real: those the files lack keep their values), as
    :func:`load_streamed` says; it is that loader for modules no diffusers config builds
    (Bagel's). Tensors named in ``skip`` are not read; any other tensor that is not in
    ``module``, and any parameter (or ``meta`` buffer) the files lack, is a
    ``ValueError`` naming it."""
    from accelerate.utils import set_module_tensor_to_device

    device, kind = torch.device(device), type(module).__name__  # (before a shard renames it)
    keep_fp32 = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())

    def target(name: str, stored: torch.dtype) -> torch.dtype:
        return _target_dtype(name, stored, dtype, keep_fp32)

    buffers = dict(module.named_buffers())  # built for real (small); not in every file
    if shard is not None:
        for name, param in module.named_parameters():  # on meta: free
            param.data = param.data.to(target(name, param.dtype))
        module = shard(module)
        module.to_empty(device=device)  # this rank's shards only (buffers: restored below)
    expected = dict(module.named_parameters()) | dict(module.named_buffers())
    slices = getattr(module, "_load_slices", {})  # left by a tensor-parallel shard
    loaded: set[str] = set()
    for path, f, name, account in _read_windows(paths, window_bytes):
        if name in skip:
            continue
        if name not in expected:
            raise ValueError(f"{path}: tensor {name!r} is not a parameter or buffer of {kind}")
        param = expected[name]
        tensor = read_part(f, name, param, slices.get(name))
        account(tensor.numel() * tensor.element_size())
        if shard is not None:  # allocated by to_empty: cast on the device, into the shard
            with torch.no_grad():
                (param.to_local() if isinstance(param, DTensor) else param).copy_(tensor)
        else:
            value = tensor.to(device=device, dtype=target(name, tensor.dtype))
            set_module_tensor_to_device(
                module, name, device, value=value, dtype=value.dtype, clear_cache=False
            )
        del tensor
        loaded.add(name)
    missing = [n for n, t in module.named_parameters() if n not in loaded or t.is_meta]
    missing += [n for n, b in buffers.items() if n not in loaded and b.is_meta]
    if missing:
        raise ValueError(
            f"{os.path.dirname(paths[0])}: the checkpoint has no weights for {len(missing)} "
            f"parameter(s) of {kind}, e.g. {missing[:5]}"
        )
    # Buffers the checkpoint does not hold (rotary tables, ...) were built on the CPU.
    for name, buf in buffers.items():
        if name not in loaded:
            value = buf.to(device, target(name, buf.dtype))
            set_module_tensor_to_device(
                module, name, device, value=value, dtype=value.dtype, clear_cache=False
            )
    return module.eval()


def read_part(f, name: str, param: torch.Tensor, pieces: list | None) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``name``: an HSDP shard's rows, the
    ``(dim, start, length)`` pieces a shard hook recorded (tensor parallel), or all of it.
    Only that part is read from the file."""
    if isinstance(param, DTensor):
        rows = local_rows(param)
        pieces = None if rows is None else [rows]
    return take(f.get_slice(name), pieces) if pieces else f.get_tensor(name)


def _read_windows(paths: list[str], window_bytes: int):
    """``(path, open file, tensor name, account)`` for every tensor of ``paths``; the
    caller passes the bytes it read to ``account``. Each file is re-opened once
    ``window_bytes`` were read: tensors read so far are unmapped when its map closes."""
    from safetensors import safe_open

    for path in paths:
        names = _keys(path)
        start = 0
        while start < len(names):
            window = _Window()
            with safe_open(path, framework="pt", device="cpu") as f:
                while start < len(names) and window.read < window_bytes:
                    start += 1
                    yield path, f, names[start - 1], window.account


class _Window:
    """Bytes read through one map of a file."""

    def __init__(self):
        self.read = 0

    def account(self, nbytes: int) -> None:
        self.read += nbytes


def _keys(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


def _target_dtype(name: str, stored: torch.dtype, dtype, keep_fp32: tuple[str, ...]):
    if dtype is None or not stored.is_floating_point:
        return stored
    if any(part in keep_fp32 for part in name.split(".")):
        return torch.float32
    return dtype
