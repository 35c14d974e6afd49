"""Where Wan2.2's two denoising experts live: both on the device, or only the active one.

Wan2.2 A14B denoises with a high-noise expert while ``t >= boundary`` and a low-noise
expert afterwards. Timesteps decrease, so a request uses expert 0 for its first steps
and expert 1 for the rest: one switch per request, and one more when the next request
starts on expert 0 again.

With ``offload=True`` each expert keeps a host copy of its parameters and buffers in
ONE flat buffer, pinned on CUDA by ``cudaHostRegister`` at its exact size, every
tensor a view into it; only the active expert has device copies. The caching pinned
allocator (``pin_memory()``) rounds every request up to a power of two: pinning ~1,000
tensors one by one cost ~1.5x the weights (43.7 GB instead of 28.6 GB per A14B
expert), and one 28.6 GB request would still take 34.4 GB. Tensors start at 512-byte
offsets (as the CUDA allocator places them), so the flat buffer is the weights plus
< 512 bytes per tensor (~0.5 MB per A14B expert). Deactivating an expert just drops
its device tensors (weights never change during inference, so there is nothing to
copy back); activating one is a single host-to-device copy of the flat buffer, with
the device tensors as views into it. The weights and
the device the math runs on are the same as with both experts resident, so outputs are
identical; the price is one copy of an expert per switch (about 28 GB for A14B in bf16,
~1-2 s over PCIe 4 from pinned memory). See ``docs/video.md``.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def should_offload(expert_bytes: int, device: torch.device, budget: float = 0.6) -> bool:
    """Auto policy: offload when both experts would take more than ``budget`` of the GPU.

    Only the weights are counted; the rest of the budget is left to activations, the
    text encoder and the VAE (on the returning rank). Never on CPU: there is no other
    memory to move to.
    """
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return 2 * expert_bytes > budget * total


class ExpertPlacement:
    """The experts of one pipeline and which of them has its weights on ``device``."""

    def __init__(self, experts: list[nn.Module], device: torch.device, offload: bool):
        self.experts = experts
        self.device = torch.device(device)
        self.offload = offload and len(experts) > 1
        self.active: int | None = None
        self.swaps: list[tuple[int | None, int]] = []
        """(deactivated, activated) per switch; what the tests check."""
        self._params: list[list[torch.Tensor]] = []
        """Each expert's parameters and buffers as placed at start, in layout order: kept
        by identity, not by name (peft renames a layer's weight when it wraps the layer
        with a LoRA adapter; the tensor stays the same object)."""
        self._host: list[list[torch.Tensor]] = []
        """The host copy of each of ``_params``."""
        self._flat: list[torch.Tensor] = []
        """One uint8 host buffer per expert; ``_host`` entries are views into it."""
        self._layout: list[list[tuple[str, int, torch.dtype, torch.Size]]] = []
        if not self.offload:
            for expert in experts:
                expert.to(self.device)
            return
        for expert in experts:
            tensors = list(_tensors(expert))
            self._params.append([t for _, t in tensors])
            if self.device.type == "cpu":
                # Nothing to move: the host copies are the tensors themselves (a copy
                # would also change their alignment, and with it CPU matmul rounding).
                self._host.append([t.data for _, t in tensors])
                continue
            layout, offset = [], 0
            for name, tensor in tensors:
                layout.append((name, offset, tensor.dtype, tensor.shape))
                offset += _aligned(tensor.numel() * tensor.element_size())
            flat = _alloc_host(offset, pin=self.device.type == "cuda")
            host = []
            for (_, tensor), view in zip(tensors, _views(flat, layout), strict=True):
                view.copy_(tensor.detach())
                host.append(view)
                tensor.data = view  # the original storage is freed here
            self._flat.append(flat)
            self._layout.append(layout)
            self._host.append(host)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the host buffers (pinned on CUDA)."""
        return sum(flat.numel() for flat in self._flat)

    def activate(self, index: int) -> nn.Module:
        """Expert ``index`` with its weights on the device (the other one's dropped)."""
        if not self.offload or self.active == index:
            return self.experts[index]
        previous = self.active
        if previous is not None:
            # Drop the device copies first, so that the two experts never coexist there.
            for tensor, host in zip(self._params[previous], self._host[previous], strict=True):
                tensor.data = host
            self._move_added(previous, torch.device("cpu"))
        views = self._host[index]
        if self._flat:
            # One host-to-device copy of the whole flat buffer; parameters become views.
            flat = self._flat[index].to(self.device, non_blocking=True)
            views = list(_views(flat, self._layout[index]))
        for tensor, view in zip(self._params[index], views, strict=True):
            tensor.data = view
        self._move_added(index, self.device)
        self.active = index
        self.swaps.append((previous, index))
        logger.debug("expert %s -> %s on %s", previous, index, self.device)
        return self.experts[index]

    def _move_added(self, index: int, device: torch.device) -> None:
        """Tensors added to expert ``index`` after placement (LoRA adapters: small, not in
        the flat buffer) follow it to ``device``."""
        placed = {id(t) for t in self._params[index]}
        for _, tensor in _tensors(self.experts[index]):
            if id(tensor) not in placed and tensor.device != device:
                tensor.data = tensor.data.to(device)


_ALIGN = 512
"""Offsets of the tensors in the flat buffers: what the CUDA caching allocator gives
each tensor of a resident expert, so kernels see the same pointer alignment."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _alloc_host(nbytes: int, pin: bool) -> torch.Tensor:
    """One uint8 host buffer of exactly ``nbytes`` (page-locked when ``pin``).

    Not ``pin_memory=True``: the caching host allocator rounds each request up to a
    power of two (a 28.6 GB expert would take 34.4 GB). Ordinary memory registered
    with ``cudaHostRegister`` is pinned at its own size.
    """
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin:
        _register(buf)
    return buf


def _register(buf: torch.Tensor) -> None:  # pragma: no cover - needs a GPU
    cudart = torch.cuda.cudart()
    ptr = buf.data_ptr()
    torch.cuda.check_error(int(cudart.cudaHostRegister(ptr, buf.numel(), 1)))
    weakref.finalize(buf, cudart.cudaHostUnregister, ptr)  # 1: cudaHostRegisterPortable


def _views(flat: torch.Tensor, layout):
    """Typed, shaped views into ``flat``, one per ``(name, offset, dtype, shape)``."""
    for _, offset, dtype, shape in layout:
        nbytes = shape.numel() * dtype.itemsize
        yield flat[offset : offset + nbytes].view(dtype).view(shape)


def _tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()
