"""Apply an ``_sp_plan`` to a model from outside, with forward hooks.

``apply_sequence_parallel(model, plan, state)`` installs pre/post-forward hooks that
shard inputs and outputs and gather outputs as the plan says, and returns a
:class:`SequenceParallelRuntime` that holds the per-forward padding bookkeeping
(``auto_pad``), hands the attention processors a :class:`ParallelAttention` that
masks that padding, and removes the hooks again with ``remove()``.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from ithaca.parallel import comm
from ithaca.parallel.attention import ParallelAttention
from ithaca.parallel.sharding import enter_forward, leave_forward, pad_to_multiple
from ithaca.parallel.sp_plan import (
    SequenceParallelInput,
    SequenceParallelModelPlan,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    check_parameter_names,
    get_sp_plan_from_model,
    resolve_modules,
    validate_sp_plan,
)
from ithaca.parallel.state import ParallelState

logger = logging.getLogger(__name__)


class SequenceParallelRuntime:
    """Hooks of one applied plan, and what they learn during a forward.

    Per forward of the root module it records which sequence lengths were padded
    (``padded -> valid``), what was sharded, gathered or skipped; after the forward it
    raises if a shard was never gathered or (``strict``) a spec was skipped because a
    tensor had an unexpected number of dimensions.
    """

    def __init__(self, model: nn.Module, state: ParallelState, strict: bool = True):
        self.model = model
        self.state = state
        self.strict = strict
        self.attention = ParallelAttention(state, padding=self)
        self._handles: list = []
        self._plan_hooks: list[_ModuleHooks] = []
        self._pads: dict[int, int] = {}
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sharded: list[str] = []
        self.gathered: list[str] = []
        self.skipped: list[str] = []
        self._ambient: list = []  # tokens of the ambient state (sharding.sp_shard & co.)

    # -- what attention asks ---------------------------------------------------
    def valid_length(self, global_len: int) -> int | None:
        """Unpadded length of a sequence padded to ``global_len``, or None."""
        return self._pads.get(global_len)

    # -- lifecycle -------------------------------------------------------------
    def track(self, handle) -> None:
        """Remove ``handle`` (a hook a model's plan added elsewhere) with ``remove()``."""
        self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._plan_hooks = []

    def rebind(self) -> list[str]:
        """Move the plan's hooks onto the modules now at their names, where a module was
        replaced after ``apply_sequence_parallel`` (a LoRA layer wrapping ``proj_out``: a
        gather left on the wrapped Linear would gather only the base output, and the
        adapter's delta would stay one rank's shard). Returns the names moved."""
        moved = []
        for hook in self._plan_hooks:
            current = self.model.get_submodule(hook.name)
            if current is hook.module:
                continue
            for handle in hook.handles:
                handle.remove()
                self._handles.remove(handle)
            hook.module = current  # the wrapper forwards the same arguments
            self._handles.extend(hook.install())
            moved.append(hook.name)
        return moved

    def _begin(self, module, args, kwargs):
        self._pads.clear()
        self._cache.clear()
        self.sharded, self.gathered, self.skipped = [], [], []
        self._ambient.append(enter_forward(self.state))

    def _leave(self, module, args, kwargs, output):
        if self._ambient:  # always_call: also when the forward raised
            leave_forward(self._ambient.pop())

    def _end(self, module, args, kwargs, output):
        self._cache.clear()
        if self.sharded and not self.gathered:
            raise ValueError(
                f"{type(module).__name__} forward sharded {self.sharded} but gathered nothing: "
                f"the output is one rank's shard (add a SequenceParallelOutput)"
            )
        if self.skipped and self.strict:
            raise ValueError(
                "sequence-parallel specs were skipped because of unexpected tensor shapes: "
                f"{self.skipped} (fix expected_dims, or apply with strict=False)"
            )

    # -- sharding --------------------------------------------------------------
    def _dims_ok(self, tensor, expected_dims, where: str) -> bool:
        if expected_dims is None or tensor.dim() == expected_dims:
            return True
        message = (
            f"{where}: expected a {expected_dims}-d tensor, got shape {tuple(tensor.shape)}; "
            f"left unsharded"
        )
        logger.warning(message)
        self.skipped.append(message)
        return False

    def _pad(self, tensor: torch.Tensor, dim: int, auto_pad: bool, where: str) -> torch.Tensor:
        size, world = tensor.shape[dim], self.state.sp.size
        if size % world == 0:
            return tensor
        padded_len = -(-size // world) * world
        known = self._pads.get(padded_len)
        if not auto_pad and known != size:
            raise ValueError(
                f"{where}: sequence length {size} does not divide by the sequence-parallel size "
                f"{world}; set auto_pad=True"
            )
        if known is not None and known != size:
            raise ValueError(
                f"{where}: lengths {known} and {size} both pad to {padded_len}; one forward "
                f"can pad only one sequence per padded length"
            )
        self._pads[padded_len] = size
        return pad_to_multiple(tensor, dim, world)[0]

    def _shard(self, tensor, spec: SequenceParallelInput, where: str):
        if not isinstance(tensor, torch.Tensor) or not self._dims_ok(
            tensor, spec.expected_dims, where
        ):
            return tensor
        dim = spec.split_dim % tensor.dim()
        key = (id(tensor), dim)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is tensor:  # same tensor, e.g. at every block
            return cached[1]
        out = comm.shard(self._pad(tensor, dim, spec.auto_pad, where), self.state.sp, dim)
        self._cache[key] = (tensor, out)
        self.sharded.append(where)
        return out

    def _shard_partial(self, tensor, spec: SequenceParallelPartialInput, text_len: int, where):
        """``[text, image]`` along split_dim: keep the text, shard (and pad) the image."""
        if not isinstance(tensor, torch.Tensor) or not self._dims_ok(
            tensor, spec.expected_dims, where
        ):
            return tensor
        dim = spec.split_dim % tensor.dim()
        text, image = tensor.split([text_len, tensor.shape[dim] - text_len], dim=dim)
        image = self._pad(image, dim, spec.auto_pad, where)
        self.sharded.append(where)
        return torch.cat([text, comm.shard(image, self.state.sp, dim)], dim=dim)

    def _gather(self, tensor, spec: SequenceParallelOutput, where: str):
        if not isinstance(tensor, torch.Tensor) or not self._dims_ok(
            tensor, spec.expected_dims, where
        ):
            return tensor
        dim = spec.gather_dim % tensor.dim()
        out = comm.all_gather(tensor, self.state.sp, dim)
        valid = self._pads.get(out.shape[dim])
        if valid is not None:
            out = out.narrow(dim, 0, valid)  # trim auto_pad padding
        self.gathered.append(where)
        return out


def _text_len(spec: SequenceParallelPartialInput, bound: dict) -> int:
    src = spec.text_len_source
    if isinstance(src, int):
        return src
    value = bound.get(src)
    if isinstance(value, torch.Tensor):
        return value.shape[0]
    if isinstance(value, int):
        return value
    raise ValueError(f"text_len_source {src!r} is {value!r}: expected a tensor or an int")


class _ModuleHooks:
    """The pre/post hooks of one module under one plan entry."""

    def __init__(self, runtime: SequenceParallelRuntime, name: str, module: nn.Module, specs):
        self.runtime, self.name, self.module = runtime, name, module
        self.signature = inspect.signature(module.forward)
        if isinstance(specs, SequenceParallelOutput):
            specs = {0: specs}
        self.inputs = {k: s for k, s in specs.items() if isinstance(k, str)}
        self.outputs = {k: s for k, s in specs.items() if isinstance(k, int)}
        self.handles: list = []
        check_parameter_names(module, name, list(self.inputs))

    def install(self) -> list:
        self.handles = handles = []
        if self.inputs:
            handles.append(self.module.register_forward_pre_hook(self.pre, with_kwargs=True))
        if self.outputs:
            handles.append(self.module.register_forward_hook(self.post, with_kwargs=True))
        return handles

    def _bind(self, args, kwargs) -> inspect.BoundArguments:
        return self.signature.bind_partial(*args, **kwargs)

    def pre(self, module, args, kwargs):
        if not self.inputs:
            return None
        bound = self._bind(args, kwargs)
        for param, spec in self.inputs.items():
            if param not in bound.arguments:
                continue
            where = f"{self.name}.{param}"
            value = bound.arguments[param]
            if isinstance(spec, SequenceParallelPartialInput):
                text_len = _text_len(spec, bound.arguments)
                bound.arguments[param] = self.runtime._shard_partial(value, spec, text_len, where)
            else:
                bound.arguments[param] = self.runtime._shard(value, spec, where)
        return bound.args, bound.kwargs

    def post(self, module, args, kwargs, output):
        is_seq = isinstance(output, tuple | list)
        items = list(output) if is_seq else [output]
        for index, spec in self.outputs.items():
            if index >= len(items):
                raise ValueError(
                    f"_sp_plan[{self.name!r}] indexes output {index}, module returned {len(items)}"
                )
            where = f"{self.name}[{index}]"
            if isinstance(spec, SequenceParallelOutput):
                items[index] = self.runtime._gather(items[index], spec, where)
            elif isinstance(spec, SequenceParallelPartialInput):
                text_len = _text_len(spec, self._bind(args, kwargs).arguments)
                items[index] = self.runtime._shard_partial(items[index], spec, text_len, where)
            else:
                items[index] = self.runtime._shard(items[index], spec, where)
        if not is_seq:
            return items[0]
        return type(output)(items) if isinstance(output, tuple) else items


def apply_sequence_parallel(
    model: nn.Module,
    plan: SequenceParallelModelPlan | None = None,
    state: ParallelState | None = None,
    strict: bool = True,
) -> SequenceParallelRuntime:
    """Install the hooks of ``plan`` (default: ``model._sp_plan``) for ``state``.

    With a sequence-parallel size of 1 nothing is installed and the runtime is inert.
    """
    if state is None:
        raise ValueError("apply_sequence_parallel needs the ParallelState to shard over")
    plan = plan if plan is not None else get_sp_plan_from_model(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__} declares no _sp_plan and none was given")
    validate_sp_plan(plan)
    runtime = SequenceParallelRuntime(model, state, strict)
    # Resolve everything before installing anything, so a bad plan installs nothing
    # (and is rejected on one rank as on many).
    hooks = [
        _ModuleHooks(runtime, name, module, specs)
        for key, specs in plan.items()
        for name, module in resolve_modules(model, key)
    ]
    if state.sp.size == 1:
        return runtime
    # The root's bookkeeping hooks wrap every plan hook: begin first, end last.
    runtime._handles.append(model.register_forward_pre_hook(runtime._begin, with_kwargs=True))
    for hook in hooks:
        runtime._handles.extend(hook.install())
    runtime._plan_hooks = hooks
    runtime._handles.append(model.register_forward_hook(runtime._end, with_kwargs=True))
    leave = model.register_forward_hook(runtime._leave, with_kwargs=True, always_call=True)
    runtime._handles.append(leave)
    return runtime
