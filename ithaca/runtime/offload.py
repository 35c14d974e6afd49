"""Where a pipeline's large components live: on the device, or on the host until they run.

``--enable-cpu-offload`` (:class:`Offload`): each offloaded component (text encoders,
VAE, and the transformer between requests) keeps its parameters and buffers in ONE host
buffer (page-locked on CUDA at its exact size, :func:`_alloc_host`; Wan2.2's expert
offload, :class:`ExpertPlacement`, uses the same) and gets device copies only
while it runs: the first forward of the component (or of any of its submodules:
``vae.decode`` calls its ``decoder``, not ``forward``) moves it in with one
host-to-device copy, and evicts the component that was on the device before; the
pipeline evicts the last one at the end of each phase (:meth:`Offload.evict`). Weights
never change during inference, so eviction just points the parameters back at their host
views (nothing copied back).

``--enable-layerwise-offload`` (:class:`LayerwiseOffload`): the transformer's blocks
live on the host; each block's forward brings it in and starts the copy of the next
block (on a side CUDA stream, so it overlaps the current block's compute), and drops
every other block. At most two blocks are on the device at a time; everything outside
the blocks (embedders, final norm, projections) stays resident.

Both run on the CPU too (the "device" copy is then a second host buffer), so the tests
check the mechanism here: a parameter's storage lies in the host buffer outside the
component's use and in the device buffer inside (:meth:`HostCopy.resident`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

import torch
import torch.nn as nn

from ithaca.parallel.hsdp import parameter_bytes  # the one counter (re-exported)

logger = logging.getLogger(__name__)


class HostCopy:
    """One module's tensors in one host buffer, with device copies on demand."""

    def __init__(self, module: nn.Module, device: torch.device | str, name: str = ""):
        self.module = module
        self.name = name or type(module).__name__
        self.device = torch.device(device)
        tensors = list(_tensors(module))
        self.tensors = [tensor for _, tensor in tensors]
        """The module's parameters and buffers at placement, kept by identity: peft
        renames a layer's weight when it wraps the layer with a LoRA adapter (the tensor
        stays the same object) and adds the adapter's own tensors beside it."""
        self._placed = {id(tensor) for tensor in self.tensors}
        self.layout, offset = [], 0
        for key, tensor in tensors:
            self.layout.append((key, offset, tensor.dtype, tensor.shape))
            offset += _aligned(tensor.numel() * tensor.element_size())
        self.flat = _alloc_host(offset, pin=self.device.type == "cuda")
        self.host = []
        for tensor, view in zip(self.tensors, _views(self.flat, self.layout), strict=True):
            view.copy_(tensor.detach())
            self.host.append(view)
        self._device_flat: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self.loads = 0
        """How many times the module was brought to the device (what tests count)."""
        self._point(self.host, self.flat.device)  # the original (device) storage is freed here

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def _point(self, views: Iterable[torch.Tensor], device: torch.device) -> None:
        """The placed tensors onto ``views``; tensors added since (LoRA adapters: small,
        not in the buffer) follow them to ``device``."""
        for tensor, view in zip(self.tensors, views, strict=True):
            tensor.data = view
        for _, tensor in _tensors(self.module):
            if id(tensor) not in self._placed and tensor.device != device:
                tensor.data = tensor.data.to(device)

    def prefetch(self, stream: torch.cuda.Stream | None = None) -> None:
        """Start the host-to-device copy (on ``stream`` when given, CUDA only)."""
        if self._device_flat is not None:
            return
        if stream is None:
            self._device_flat = self.flat.to(self.device, copy=True)
            return
        with torch.cuda.stream(stream):  # pragma: no cover - needs a GPU
            self._device_flat = self.flat.to(self.device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(stream)

    def load(self) -> None:
        """The module's tensors on the device (waits for a prefetch in flight)."""
        if self.resident():
            return
        self.prefetch()
        if self._ready is not None:  # pragma: no cover - needs a GPU
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._ready)
            self._device_flat.record_stream(current)
            self._ready = None
        self._point(_views(self._device_flat, self.layout), self.device)
        self.loads += 1

    def evict(self) -> None:
        """Back to the host views; the device copy is freed."""
        if self._device_flat is None:
            return
        self._point(self.host, self.flat.device)
        self._device_flat, self._ready = None, None

    def resident(self) -> bool:
        """Whether the module's tensors are the device copy (not the host buffer)."""
        if not self.tensors or self._device_flat is None:
            return False
        start = self._device_flat.data_ptr()
        return start <= self.tensors[0].data_ptr() < start + self._device_flat.numel()


class Offload:
    """``--enable-cpu-offload``: components on the host, one at a time on the device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.copies: dict[str, HostCopy] = {}
        self._hooks: list = []

    def add(self, name: str, module: nn.Module | None) -> None:
        """Put ``module`` on the host; its forward (or a direct child's) brings it in."""
        if module is None or not isinstance(module, nn.Module) or name in self.copies:
            return
        copy = HostCopy(module, self.device, name)
        self.copies[name] = copy

        def bring_in(*_args) -> None:
            if copy._device_flat is None:  # a flag check: this runs for every submodule
                self.evict(keep=name)
                copy.load()

        # Every submodule: a component's entry point need not be ``forward``
        # (``vae.decode``, an encoder's embedding table called directly).
        for target in module.modules():
            self._hooks.append(target.register_forward_pre_hook(bring_in))

    def evict(self, keep: str | None = None) -> None:
        """Every component but ``keep`` back to the host."""
        for name, copy in self.copies.items():
            if name != keep:
                copy.evict()

    @property
    def host_bytes(self) -> int:
        """Bytes of the host buffers (pinned on CUDA)."""
        return sum(c.nbytes for c in self.copies.values())


class LayerwiseOffload:
    """``--enable-layerwise-offload``: ``blocks`` stream through the device in order."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str):
        self.device = torch.device(device)
        self.copies = [HostCopy(b, device, f"block {i}") for i, b in enumerate(blocks)]
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._hook(i))

    def _hook(self, index: int):
        def before(*_args) -> None:
            # Keep this block and the one prefetched for the next forward; drop the rest.
            following = (index + 1) % len(self.copies)
            for j, copy in enumerate(self.copies):
                if j not in (index, following):
                    copy.evict()
            self.copies[index].load()
            self.copies[following].prefetch(self.stream)

        return before

    def on_device(self) -> list[int]:
        """Blocks with a device copy (the running one and the one prefetched)."""
        return [i for i, c in enumerate(self.copies) if c._device_flat is not None]

    @property
    def host_bytes(self) -> int:
        return sum(c.nbytes for c in self.copies)


class ExpertPlacement:
    """Modules of which one runs at a time (Wan2.2's two denoising experts): all on
    ``device``, or with ``offload`` only the one in use.

    Offloaded, each keeps its tensors in ONE :class:`HostCopy` buffer (pinning an A14B
    expert's ~1,000 tensors one by one took 43.7 GB instead of 28.6 GB); :meth:`activate`
    drops the active one's device copy (weights never change: nothing is copied back)
    and brings the other in with one host-to-device copy. The weights and the device the
    math runs on are the resident run's, so outputs are identical; the price is one
    module's copy per switch (Wan2.2 A14B, bf16: ~28 GB, ~1-2 s over PCIe 4; one switch
    per request, one more when the next starts on the first expert again; docs/video.md).
    """

    def __init__(self, experts: list[nn.Module], device: torch.device | str, offload: bool):
        self.experts = experts
        self.device = torch.device(device)
        self.offload = offload and len(experts) > 1
        self.active: int | None = None
        self.swaps: list[tuple[int | None, int]] = []
        """(deactivated, activated) per switch; what the tests check."""
        self.copies: list[HostCopy] = []
        """Each module's host buffer; none on a CPU device: nothing to move (a copy would
        also change the tensors' alignment, and with it CPU matmul rounding)."""
        if not self.offload:
            for expert in experts:
                expert.to(self.device)
        elif self.device.type != "cpu":
            self.copies = [HostCopy(e, self.device, f"expert {i}") for i, e in enumerate(experts)]

    def activate(self, index: int) -> nn.Module:
        """Module ``index`` with its weights on the device (the other one's dropped)."""
        if not self.offload or self.active == index:
            return self.experts[index]
        previous = self.active
        if self.copies:
            if previous is not None:  # first, so that the two never coexist on the device
                self.copies[previous].evict()
            self.copies[index].load()  # one host-to-device copy; parameters become views
        self.active = index
        self.swaps.append((previous, index))
        logger.debug("expert %s -> %s on %s", previous, index, self.device)
        return self.experts[index]


def should_offload(expert: nn.Module, device: torch.device, budget: float = 0.6) -> bool:
    """Auto policy of :class:`ExpertPlacement`: offload when two experts like ``expert``
    would take more than ``budget`` of the GPU.

    Only the weights are counted; the rest of the budget is left to activations, the
    text encoder and the VAE (on the returning rank). Never on CPU: there is no other
    memory to move to.
    """
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return 2 * parameter_bytes(expert) > budget * total


def transformer_blocks(transformer: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The blocks of the named block lists, in forward order."""
    return [b for name in names for b in getattr(transformer, name, None) or ()]


class Placement:
    """One pipeline's placement (:meth:`ParallelConfig.placement`) and its mechanisms.

    The shared layer calls it for every family: ``load_device(kind)`` says where to load
    a component (the host when it will be offloaded: it never visits the device whole),
    ``place_transformer`` / ``place_components`` install the offload after loading,
    ``evict`` ends a phase (after conditioning, after decoding).
    """

    def __init__(self, config, device: torch.device | str):
        self.config = config
        self.device = torch.device(device)
        self.offload = Offload(device)
        self.layerwise: list[LayerwiseOffload] = []

    @property
    def transformer_on_host(self) -> bool:
        return bool(self.config.cpu_offload or self.config.layerwise_offload)

    def offloaded(self, kind: str) -> bool:
        """``kind``: ``transformer``, ``text_encoder`` or ``vae``."""
        if kind == "transformer":
            return self.transformer_on_host
        return self.config.placement(kind) == "offload"

    def load_device(self, kind: str) -> torch.device:
        return torch.device("cpu") if self.offloaded(kind) else self.device

    def component_device(self, name: str) -> torch.device:
        """Where to load the checkpoint component ``name`` (``vae*``: a VAE, else a text
        or image encoder)."""
        return self.load_device(_kind(name))

    def place_transformer(self, name: str, transformer: nn.Module, block_lists) -> None:
        """Layerwise: blocks streamed, the rest resident; cpu offload: the whole
        transformer on the device only while it runs; else nothing to do."""
        if self.config.layerwise_offload:
            blocks = transformer_blocks(transformer, block_lists)
            inside = {id(t) for b in blocks for _, t in _tensors(b)}
            for module in transformer.modules():
                for tensor in [*module._parameters.values(), *module._buffers.values()]:
                    if tensor is not None and id(tensor) not in inside:
                        tensor.data = tensor.data.to(self.device)
            self.layerwise.append(LayerwiseOffload(blocks, self.device))
        elif self.config.cpu_offload:
            self.offload.add(name, transformer)

    def place_experts(self, experts: dict[str, nn.Module], block_lists, offload: bool | None):
        """An :class:`ExpertPlacement` of ``experts`` (by checkpoint component name, loaded
        on the host unless sharded by ``use_hsdp``), then each placed as a transformer.

        ``offload`` True keeps the idle expert on the host; None decides by
        :func:`should_offload` (never with ``use_hsdp``: each rank then holds a shard of
        each expert). ``--enable-cpu-offload`` / ``--enable-layerwise-offload`` place the
        experts instead (their placement keeps them on the host already)."""
        sharded = self.config.use_hsdp
        if offload and sharded:
            raise ValueError("expert_offload and use_hsdp exclude each other: pick one")
        modules = list(experts.values())
        if offload is None:
            offload = not sharded and should_offload(modules[0], self.device)
        device = self.load_device("transformer")
        placement = ExpertPlacement(modules, device, offload and not self.transformer_on_host)
        for name, expert in experts.items():
            self.place_transformer(name, expert, block_lists)
        return placement

    def place_components(self, components: dict[str, object]) -> None:
        """Offload the modules among ``components`` whose placement says so."""
        for name, module in components.items():
            if isinstance(module, nn.Module) and self.offloaded(_kind(name)):
                self.offload.add(name, module)

    def evict(self) -> None:
        self.offload.evict()

    @property
    def host_bytes(self) -> int:
        """Bytes of weights held on the host for the device (pinned on CUDA)."""
        return self.offload.host_bytes + sum(lw.host_bytes for lw in self.layerwise)


def _kind(component: str) -> str:
    return "vae" if component.startswith("vae") else "text_encoder"


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
