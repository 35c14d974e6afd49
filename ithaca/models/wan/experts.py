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

import torch
import torch.nn as nn

from ithaca.runtime.offload import HostCopy, parameter_bytes

logger = logging.getLogger(__name__)


def should_offload(expert: nn.Module, device: torch.device, budget: float = 0.6) -> bool:
    """Auto policy: offload when both experts would take more than ``budget`` of the GPU.

    Only the weights are counted; the rest of the budget is left to activations, the
    text encoder and the VAE (on the returning rank). Never on CPU: there is no other
    memory to move to.
    """
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    return 2 * parameter_bytes(expert) > budget * total


class ExpertPlacement:
    """The experts of one pipeline and which of them has its weights on ``device``."""

    def __init__(self, experts: list[nn.Module], device: torch.device, offload: bool):
        self.experts = experts
        self.device = torch.device(device)
        self.offload = offload and len(experts) > 1
        self.active: int | None = None
        self.swaps: list[tuple[int | None, int]] = []
        """(deactivated, activated) per switch; what the tests check."""
        self.copies: list[HostCopy] = []
        """Each expert's one host buffer (:class:`ithaca.runtime.offload.HostCopy`); none on
        a CPU device: nothing to move (a copy would also change the tensors' alignment, and
        with it CPU matmul rounding)."""
        if not self.offload:
            for expert in experts:
                expert.to(self.device)
        elif self.device.type != "cpu":
            self.copies = [HostCopy(e, self.device, f"expert {i}") for i, e in enumerate(experts)]

    def activate(self, index: int) -> nn.Module:
        """Expert ``index`` with its weights on the device (the other one's dropped)."""
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
