"""Tensor parallelism for a diffusion transformer, driven by the model's ``_tp_plan``.

The plan is diffusers' format (``ModelMixin._tp_plan``; diffusers declares it for
Qwen-Image and FLUX.1, ithaca's family modules declare it for the others): module
paths with one ``*`` over a ``ModuleList`` mapped to ``"colwise"``, ``"rowwise"``,
``PackedColwiseParallel(blocks)`` or ``PackedRowwiseParallel(blocks)`` (a fused
Linear whose rows / columns are several projections, each split on its own, e.g.
FLUX's single-block ``proj_out`` over ``cat([attention (H*D), MLP (4*C)])``).

What :func:`apply_tensor_parallel` does, with ``P = tensor_parallel_size`` and ``r``
this rank's tp index (written once here, for every family):

- colwise Linear ``(out, in)``: keeps rows ``[r*out/P, (r+1)*out/P)`` of the weight and
  bias (per block when packed); its output is this rank's slice of features
  ``(..., in) -> (..., out/P)``: for q/k/v that is heads ``[r*H/P, (r+1)*H/P)``;
- rowwise Linear ``(out, in)``: keeps columns ``[r*in/P, ...)`` and no bias; a forward
  hook all-reduces the partial sums over the tp group ``(..., out)`` and adds the bias
  once, after the sum;
- an attention module whose projections are split (it has ``heads``): ``heads`` (and
  ``inner_dim`` / ``inner_kv_dim``) become this rank's, so a processor that reshapes by
  ``attn.heads`` sees ``H/P`` heads; QK norms over ``head_dim`` stay whole (per head);
- ``"colwise_gather"`` (:data:`GATHERED_COLWISE`): a colwise Linear whose output every
  rank needs whole (the AdaLN modulation ``C -> 6C`` of a block, which indexes the full
  hidden size): it keeps its rows like a colwise one and a forward hook all-gathers the
  slices over the tp group along the last dim ``(..., out/P) -> (..., out)`` (torch's
  ``ColwiseParallel(output_layouts=Replicate())``): only a concatenation, so the result
  is one rank's, bit for bit up to the smaller matmul;
- ``"colwise_rmsnorm"`` (:data:`SPLIT_RMS_NORM`): an RMSNorm over the features a colwise
  Linear split (Wan's QK norms span all heads, ``inner_dim``): its weight keeps the same
  rows and it is swapped for :class:`SplitRMSNorm`, which all-reduces the sum of squares
  over the tp group, so every rank normalises its slice by the whole vector's RMS.

Norms, embeddings and the output projection stay replicated (the gathered modulation is
whole again after its hook): every tp rank holds the same full hidden states between
blocks, and the sequence-parallel plan (Ulysses / Ring over the ranks of one tp index)
runs on the local heads unchanged.
The all-reduce changes the order of the sums, so results equal one rank within fp32
rounding, not bit for bit; every tp rank gets the same reduced bits.

Loading: :func:`split_weights` is ``load_streamed``'s ``shard=`` hook, so the module is
split while on ``meta`` and each rank reads only its pieces of the checkpoint
(``safe_open(...).get_slice``): no rank holds more of the transformer than it keeps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ithaca.parallel import comm
from ithaca.parallel.state import ParallelState

HEAD_ATTRS = ("heads", "inner_dim", "inner_kv_dim", "kv_inner_dim")
"""Attention-module attributes that count this rank's heads (or heads x head_dim)."""


SPLIT_RMS_NORM = "colwise_rmsnorm"
"""Plan style of an RMSNorm over a colwise Linear's split output features."""


GATHERED_COLWISE = "colwise_gather"
"""Plan style of a column-parallel Linear whose output is all-gathered (replicated)."""


class DegreeError(ValueError):
    """A tensor-parallel degree the model cannot take (a user's configuration error: the
    loader must not fall back to another way of loading on it)."""


@dataclass
class TensorParallelRuntime:
    """What :func:`apply_tensor_parallel` did: the split parameters and the hooks."""

    size: int
    specs: dict = field(default_factory=dict)
    """Parameter name -> diffusers ``TPShardSpec`` (dim, block sizes) of the full tensor."""
    hooks: list = field(default_factory=list)
    state: ParallelState | None = None
    """The layout whose tp group the hooks all-reduce over (for :meth:`rebind`)."""
    gathered: list = field(default_factory=list)
    """Paths of the :data:`GATHERED_COLWISE` Linears (their outputs are all-gathered)."""

    def remove(self) -> None:
        """Take the all-reduce and all-gather hooks out (the weights stay split)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def rebind(self, transformer: nn.Module) -> None:
        """Put the all-reduce and all-gather hooks on the modules now at the rowwise and
        gathered layers' names: a LoRA wrapper (peft) around a rowwise Linear adds its
        partial ``x_r A_r^T B^T`` to the Linear's partial output, so the one all-reduce
        must sum the wrapper's output (a hook left on the wrapped Linear would reduce the
        base part only, and the adapter's part would stay one rank's). The bias is added
        once, after the sum. Around a gathered Linear the wrapper's output is this rank's
        rows of base plus adapter (``lora_B`` split by rows): the gather must follow it."""
        self.remove()
        for name, spec in sorted(self.specs.items()):
            if name.endswith(".weight") and spec.dim == 1:
                module = transformer.get_submodule(name.rpartition(".")[0])
                self.hooks.append(module.register_forward_hook(_reduce(self.state)))
        for path in self.gathered:
            module = transformer.get_submodule(path)
            self.hooks.append(module.register_forward_hook(_gather(self.state)))


def tp_plan(transformer: nn.Module) -> dict | None:
    """The transformer's ``_tp_plan`` (a dict, or a function of its config), or None."""
    plan = getattr(transformer, "_tp_plan", None)
    if callable(plan):
        plan = plan(transformer.config)
    return plan or None


def _attention_modules(transformer: nn.Module, linears: set[str]) -> dict[str, nn.Module]:
    """Modules with a ``heads`` count whose projections the plan splits."""
    return {
        path: module
        for path, module in transformer.named_modules()
        if isinstance(getattr(module, "heads", None), int)
        and any(p.startswith(f"{path}.") for p in linears)
    }


def valid_degrees(transformer: nn.Module, plan: dict) -> tuple[int, list[int]]:
    """``(heads, degrees)``: the fewest heads of a split attention module, and every
    tensor-parallel degree that divides the heads of every such module and every split
    block of the plan."""
    specs = shard_specs(transformer, plan, 1)
    linears = {name.rpartition(".")[0] for name in specs}
    heads = [m.heads for m in _attention_modules(transformer, linears).values()]
    local = [getattr(m, attr) for m, attr in _local_sizes(transformer)]  # e.g. GQA's KV heads
    sizes = heads + local + [b for spec in specs.values() for b in spec.block_sizes or []]
    g = math.gcd(*sizes)
    return min(heads, default=0), [d for d in range(1, g + 1) if g % d == 0]


def check_degree(transformer: nn.Module, size: int, family: str) -> dict:
    """The plan, or ``ValueError`` naming the valid degrees when ``size`` cannot split
    the heads and every block of it (call before any weight is split)."""
    plan = tp_plan(transformer)
    if plan is None:
        raise _no_plan(size, family)
    heads, valid = valid_degrees(transformer, plan)
    if size not in valid:
        also = "".join(  # Bagel: its GQA's KV heads, the ViT's heads
            f", {pattern} ({min(getattr(m, a) for m, a in _local_sizes(transformer, pattern))})"
            for pattern in getattr(transformer, "_tp_local_sizes", ())
        )
        raise DegreeError(
            f"tensor_parallel_size ({size}) must divide num_attention_heads ({heads}){also} "
            f"and every split MLP / projection block of {family}; valid degrees: {valid}"
        )
    return plan


def take(tensor, pieces: list[tuple[int, int, int]]) -> torch.Tensor:
    """The ``(dim, start, length)`` pieces of ``tensor`` concatenated along their dim: a
    copy (the full tensor can be freed). ``tensor`` may be a safetensors slice
    (``safe_open(...).get_slice(name)``): only the pieces are read from the file."""
    parts = [tensor[(slice(None),) * dim + (slice(start, start + n),)] for dim, start, n in pieces]
    if len(parts) > 1:
        return torch.cat(parts, pieces[0][0])
    return parts[0].clone() if isinstance(tensor, torch.Tensor) else parts[0]


def expand(transformer: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module ``pattern`` names: a dotted path, or one with a
    single ``*`` over a ``ModuleList`` (``"blocks.*.attn1.norm_q"``)."""
    head, star, tail = pattern.partition("*")
    if not star:
        return [(pattern, transformer.get_submodule(pattern))]
    head, tail = head.strip("."), tail.strip(".")
    found = []
    for i, block in enumerate(transformer.get_submodule(head)):
        found.append((f"{head}.{i}.{tail}".rstrip("."), block.get_submodule(tail)))
    return found


_LINEAR_STYLES = {GATHERED_COLWISE: "colwise"}
"""ithaca's Linear styles as diffusers resolves their shards (the hooks differ)."""


def _styled(transformer: nn.Module, plan: dict, style: str) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every entry of ``plan`` with ``style``."""
    patterns = [pattern for pattern, s in plan.items() if s == style]
    return [found for pattern in patterns for found in expand(transformer, pattern)]


def _norms(transformer: nn.Module, plan: dict) -> list[tuple[str, nn.Module]]:
    """``(path, norm)`` of every :data:`SPLIT_RMS_NORM` entry of ``plan``."""
    return _styled(transformer, plan, SPLIT_RMS_NORM)


def shard_specs(transformer: nn.Module, plan: dict, size: int) -> dict:
    """Parameter name -> ``TPShardSpec`` of every tensor ``plan`` splits at degree
    ``size``: diffusers' resolution of the Linear styles, plus the weights of the split
    RMSNorms (rows, like the colwise output they normalise)."""
    from diffusers.hooks.tensor_parallel import TPShardSpec, resolve_tp_shard_specs

    linear_plan = {k: _LINEAR_STYLES.get(s, s) for k, s in plan.items() if s != SPLIT_RMS_NORM}
    specs = resolve_tp_shard_specs(transformer, linear_plan, size)
    for path, norm in _norms(transformer, plan):
        assert norm.weight is not None, f"{path}: a split RMSNorm needs its affine weight"
        specs[f"{path}.weight"] = TPShardSpec(0, [norm.weight.shape[0]])
    return specs


def _no_plan(size: int, family: str) -> DegreeError:
    return DegreeError(
        f"tensor_parallel_size ({size}): {family} declares no tensor-parallel plan "
        f"(_tp_plan); serve it with --tensor-parallel-size 1 (every ithaca family declares "
        f"one: this is a diffusers class without ithaca's subclass, or a new family)"
    )


def _pieces(dim: int, blocks: list[int], rank: int, size: int) -> list[tuple[int, int, int]]:
    """This rank's rows (dim 0) or columns (dim 1), block by block: ``(dim, start, n)``."""
    pieces, start = [], 0
    for block in blocks:
        chunk = block // size
        pieces.append((dim, start + rank * chunk, chunk))
        start += block
    return pieces


def split_weights(transformer: nn.Module, state: ParallelState, family: str = "the model"):
    """Keep this rank's shard of every Linear the plan splits; returns ``transformer``.

    This is :func:`ithaca.runtime.loading.load_streamed`'s ``shard=`` hook: called on the
    ``meta`` module it only shrinks the parameters to their local shapes and records,
    in ``transformer._load_slices``, the pieces of each checkpoint tensor this rank keeps
    (the loader reads just those): no rank ever holds the whole transformer. Called on
    loaded weights (the ``from_pretrained`` fallback) it copies the pieces out. Either
    way the split happens once; :func:`apply_tensor_parallel` does the rest.
    """
    axis = state.tp
    if axis.size == 1 or hasattr(transformer, "_tp_specs"):
        return transformer
    plan = check_degree(transformer, axis.size, family)
    specs = shard_specs(transformer, plan, axis.size)  # shapes only: meta is fine
    modules = dict(transformer.named_modules())
    slices = {}
    for name, spec in specs.items():
        if spec.dim is None:  # a rowwise bias: whole on every rank
            continue
        path, _, attr = name.rpartition(".")
        linear = modules[path]
        slices[name] = _pieces(spec.dim, spec.block_sizes, axis.rank, axis.size)
        # colwise (out, in) -> (out/P, in), bias (out/P,); rowwise (out, in) -> (out, in/P)
        local = take(getattr(linear, attr).data, slices[name])
        setattr(linear, attr, nn.Parameter(local, requires_grad=False))
        if not isinstance(linear, nn.Linear):  # a split RMSNorm: swapped in by apply
            continue
        if attr == "weight" and spec.dim == 0:
            linear.out_features = local.shape[0]
        elif attr == "weight":
            linear.in_features = local.shape[1]
    transformer._tp_specs = specs
    transformer._tp_norms = [path for path, _ in _norms(transformer, plan)]
    transformer._tp_gathered = [path for path, _ in _styled(transformer, plan, GATHERED_COLWISE)]
    transformer._load_slices = slices
    return transformer


def tp_shard(state: ParallelState, cls: type):
    """:func:`split_weights` bound to ``state`` (``load_streamed``'s ``shard=``), or None
    without tensor parallelism. Raises before anything is loaded when the transformer
    class ``cls`` declares no ``_tp_plan`` (diffusers' own classes for families whose
    plan ithaca's subclass declares). Bagel's loader takes it too (its ``Bagel`` module
    declares the plan)."""
    if state.tp.size == 1:
        return None
    if getattr(cls, "_tp_plan", None) is None:
        raise _no_plan(state.tp.size, cls.__name__)
    return functools.partial(split_weights, state=state, family=cls.__name__)


def apply_tensor_parallel(
    transformer: nn.Module, state: ParallelState, family: str = "the model"
) -> TensorParallelRuntime | None:
    """Split ``transformer``'s planned Linears over ``state.tp`` (None when tp size is 1).

    Every rank of the tp group calls it, on the full weights or on the shard
    :func:`split_weights` loaded; each keeps its shard (full tensors are freed), its
    rowwise layers all-reduce, its attention modules count their local heads. Raises
    before touching anything when the degree does not divide the heads and blocks (see
    :func:`check_degree`).
    """
    axis = state.tp
    if axis.size == 1:
        return None
    split_weights(transformer, state, family)  # a no-op when it was loaded split
    specs = transformer._tp_specs
    gathered = transformer._tp_gathered
    runtime = TensorParallelRuntime(axis.size, specs, state=state, gathered=gathered)
    params = dict(transformer.named_parameters())
    for name in transformer._load_slices:
        params[name]._tp_split = True  # counted by parameter_bytes as this rank's shard
    modules = dict(transformer.named_modules())
    linears = {name.rpartition(".")[0] for name in specs} - set(gathered)  # by heads / units
    for path in sorted(linears):
        linear = modules[path]
        if specs[f"{path}.weight"].dim == 1:  # rowwise: the bias is added once, after the sum
            bias = linear.bias
            linear.bias = None
            if bias is not None:
                linear.register_buffer("tp_bias", bias.data, persistent=False)
            runtime.hooks.append(linear.register_forward_hook(_reduce(state)))
    for path in gathered:  # its rows out of P: gathered whole, on every tp rank
        runtime.hooks.append(modules[path].register_forward_hook(_gather(state)))
    for module in _attention_modules(transformer, linears).values():
        for attr in HEAD_ATTRS:  # this rank's heads: H/P (and H/P * D)
            value = getattr(module, attr, None)
            if isinstance(value, int):
                setattr(module, attr, value // axis.size)
    for module, attr in _local_sizes(transformer):
        setattr(module, attr, getattr(module, attr) // axis.size)
    for path in transformer._tp_norms:
        parent, _, name = path.rpartition(".")
        owner = transformer.get_submodule(parent)
        setattr(owner, name, SplitRMSNorm(getattr(owner, name), state, axis.size))
    return runtime


def _local_sizes(transformer: nn.Module, *only: str) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of every ``_tp_local_sizes`` entry: integer sizes a block's
    forward splits a column-parallel output by (``"blocks.*.mlp_hidden_dim"``; Bagel's
    GQA ``kv_heads``), which become this rank's (``size / P``) and which every valid
    degree divides. ``only``: just these patterns."""
    found = []
    for pattern in only or getattr(transformer, "_tp_local_sizes", ()):
        prefix, _, rest = pattern.rpartition(".")
        modules = [m for _, m in expand(transformer, prefix)] if prefix else [transformer]
        found.extend((m, rest) for m in modules if isinstance(getattr(m, rest, None), int))
    if getattr(transformer, "_tp_local_sizes", ()) and not found:
        raise ValueError(f"_tp_local_sizes {transformer._tp_local_sizes} names no int attribute")
    return found


def _reduce(state: ParallelState):
    def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        # (..., out) partial sums over this rank's in/P features -> the full sum on every
        # tp rank; every rank of the tp group reaches this all-reduce in the same order
        # (the same layer of the same forward).
        comm.all_reduce(out, state.tp)
        bias = getattr(getattr(module, "base_layer", module), "tp_bias", None)  # a LoRA wrapper's
        return out if bias is None else out + bias

    return hook


def _gather(state: ParallelState):
    def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        # (..., out/P) this rank's rows -> (..., out) in tp-rank order: a concatenation on
        # the output's device; every tp rank reaches it in the same order.
        return comm.all_gather(out, state.tp, dim=-1)

    return hook


class SplitRMSNorm(nn.Module):
    """An RMSNorm over features split across the tp group (``colwise_rmsnorm``).

    Holds this rank's slice of the weight ``(C/P,)`` (the same Parameter, so placement
    and offload keep it by identity) and normalises ``(..., C/P)`` by the RMS of the
    whole ``(..., C)`` vector: the sum of squares, in fp32 on the input's device, is
    all-reduced over the tp group (no host sync). Like ``torch.nn.RMSNorm``: normalised
    and scaled by the weight in fp32, then cast back.
    """

    def __init__(self, norm: nn.Module, state: ParallelState, size: int):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self.features = self.weight.shape[0] * size  # C: the whole normalised vector
        self.axis = state.tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., C/P) -> (..., 1) this rank's sum of squares -> all-reduced: the whole
        # vector's; every tp rank reaches it in the same order (the same norm of a layer).
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        squares = wide.square().sum(-1, keepdim=True)
        comm.all_reduce(squares, self.axis)
        eps = torch.finfo(wide.dtype).eps if self.eps is None else self.eps
        # Scaled by the weight before the cast back, as torch.nn.RMSNorm does (bf16: the
        # same bits on one rank, tests/models/test_tensor_parallel.py).
        scale = torch.rsqrt(squares / self.features + eps)
        return (wide * scale * self.weight.to(wide.dtype)).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.features}, eps={self.eps}"


def parameter_bytes(module: nn.Module) -> dict[str, int]:
    """This rank's parameter bytes of ``module``: ``split`` (tensor-parallel shards,
    1/P of the full tensors, the gathered modulation's too), ``replicated`` (everything
    else: norms, embeddings, rowwise biases, which every tp rank holds whole) and ``total``.
    Without tensor parallelism everything is ``replicated``."""
    split = replicated = 0
    for p in module.parameters():
        nbytes = p.numel() * p.element_size()
        if getattr(p, "_tp_split", False):
            split += nbytes
        else:
            replicated += nbytes
    for name, b in module.named_buffers():
        if name.endswith("tp_bias"):
            replicated += b.numel() * b.element_size()
    return {"split": split, "replicated": replicated, "total": split + replicated}


def adapter_split(transformer: nn.Module, layer: str) -> tuple[int, list, int] | None:
    """How a LoRA adapter on ``layer`` is split on this rank, derived from the pieces its
    weight was split into: ``(dim, pieces, full)`` where ``dim`` is 0 for a colwise layer
    (``lora_B`` ``(out, r)`` and a ``lora_B`` bias keep the weight's rows, ``lora_A`` stays
    whole; a gathered colwise layer alike, its hook gathers base and adapter together) and
    1 for a rowwise one (``lora_A`` ``(r, in)`` keeps the weight's columns, ``lora_B``
    stays whole, its partial output joins the layer's all-reduce), ``pieces`` are
    :func:`take`'s and ``full`` the unsplit size along ``dim``. None: ``layer`` is not
    split (replicated, or no tensor parallelism)."""
    pieces = getattr(transformer, "_load_slices", {}).get(f"{layer}.weight")
    if pieces is None:
        return None
    spec = transformer._tp_specs[f"{layer}.weight"]
    return spec.dim, pieces, sum(spec.block_sizes)
