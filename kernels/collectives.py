"""Collectives: the communication ops of a tensor/expert-parallel (SPMD) program.

What it is: `torch.library` custom ops (`torch.ops.tscompile.*`) that a compiled program
calls where a value's placement changes. Each is out-of-place (a fresh output, the input is
untouched) and runs over torch.distributed's default (world) process group: every rank runs
the same program, and there is exactly one group for now. Each op goes through the registry
(`dispatch`), so a faster backend (a custom all-reduce, a fused kernel) can be swapped in;
the `reference` backend calls torch.distributed with whatever backend the default group was
initialised with (gloo on CPU, NCCL on GPU). Registry queries carry `world_size=W`, so a
backend that only makes sense across ranks can refuse W = 1.
When torch.distributed is not initialised, or the world has one rank, every op is the
identity (a copy; the fused op is plain `fused_add_rms_norm`).

What it is not: the decision where a collective goes (the compiler's insert-collectives
pass does that), process-group setup (the runtime), subgroups, async handles or in-place
variants.

The redistribution table (DESIGN.md, compile step 4). W ranks; a per-rank dim of size n:

    from → to     op                                         per-rank shape on dim d
    P    → R      all_reduce(x)                              unchanged
    P    → S(d)   reduce_scatter(x, d)                       n → n / W
    S(d) → R      all_gather(x, d)                           n → n * W
    R    → S(d)   local slice x.chunk(W, d)[rank]            n → n / W (no communication)
    S(a) → S(b)   all_to_all(x, split_dim=b, concat_dim=a)   b: n → n / W, a: n → n * W
    P + R → R, then RMSNorm: all_reduce_add_rms_norm(x, residual, weight, eps), the fused
    `s = residual + all_reduce(x); y = rms_norm(s, weight, eps)` -> (y, s).
    P + R → R, then LayerNorm: all_reduce_add_layer_norm(x, residual, weight, bias, eps),
    the same with `y = layer_norm(s, weight, bias, eps)`.

Ops:
* `all_reduce(x) -> [..]`: the sum over ranks; every rank gets the same values.
* `all_gather(x, dim) -> [.., n*W, ..]`: the ranks' parts concatenated along dim, in rank order.
* `reduce_scatter(x, dim) -> [.., n/W, ..]`: the sum over ranks, of which rank r keeps the
  r-th equal part of dim.
* `all_to_all(x, split_dim, concat_dim)`: x is split along split_dim into W equal parts,
  part j goes to rank j; the W received parts are concatenated along concat_dim in rank
  order (expert dispatch/combine: S(a) → S(b)).
* `all_reduce_add_rms_norm(x, residual, weight, eps) -> (y, s)`, as above.
* `all_reduce_add_layer_norm(x, residual, weight, bias, eps) -> (y, s)`, as above (bias may
  be None); its "triton" backend (kernels/triton/norm.py) is this all-reduce followed by
  the Triton add + LayerNorm kernel.

Napkin math (ring algorithms, N = bytes of the full unsharded tensor): all-reduce sends
2(W-1)/W * N per rank, reduce-scatter and all-gather (W-1)/W * N each (an all-reduce is the
two back to back), all-to-all (W-1)/W of the local bytes. A decode step's all-reduce is
small (64 tokens x 7168 hidden x bf16 = 0.9 MB), so it is latency bound: hence the fusion
with the residual add and the norm that follows it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .norm import (
    check_layer_norm_params, fused_add_layer_norm_reference, fused_add_rms_norm_reference,
)
from .registry import dispatch, kernel_op, register

# torch >= 2.13 names the tensor (not list) forms `*_single`; older releases only have
# the `*_tensor` names (deprecated from 2.13 on).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or dist.reduce_scatter_tensor)


def _world_size() -> int:
    """Ranks in the default process group; 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _copy(x: torch.Tensor) -> torch.Tensor:
    """The identity of a one-rank world: a fresh contiguous tensor (custom op outputs may
    not alias their inputs)."""
    return x.clone(memory_format=torch.contiguous_format)


def _dim(op: str, x: torch.Tensor, dim: int, name: str = "dim") -> int:
    """dim normalised to [0, x.dim()), or a ValueError naming the op and the shape."""
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: {name}={dim} is out of range for x of shape {list(x.shape)}")
    return dim % x.dim()


def _split_dim(op: str, x: torch.Tensor, dim: int, world: int, name: str = "dim") -> int:
    """Like `_dim`, and x.shape[dim] must split into `world` equal parts."""
    d = _dim(op, x, dim, name)
    if x.shape[d] % world:
        raise ValueError(
            f"{op}: {name} {d} of x {list(x.shape)} has size {x.shape[d]}, which does not split "
            f"over world size {world} ({x.shape[d]} % {world} != 0); pad that dim to a "
            f"multiple of {world} or shard another one")
    return d


# ---------------------------------------------------------------------------------------
# reference backend: torch.distributed on the default group

@register("all_reduce", "reference")
def all_reduce_reference(x: torch.Tensor) -> torch.Tensor:
    out = _copy(x)
    if _world_size() > 1:
        dist.all_reduce(out)                                # P → R, summed in x's dtype
    return out


@register("all_gather", "reference")
def all_gather_reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = _world_size()
    if world == 1:
        return _copy(x)
    part = x.movedim(dim, 0).contiguous()                   # [n, ...] dim first
    out = part.new_empty((world * part.shape[0], *part.shape[1:]))
    _all_gather_single(out, part)                           # [W*n, ...] in rank order
    return out.movedim(0, dim).contiguous()


@register("reduce_scatter", "reference")
def reduce_scatter_reference(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = _world_size()
    if world == 1:
        return _copy(x)
    full = x.movedim(dim, 0).contiguous()                   # [n, ...] dim first
    out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
    _reduce_scatter_single(out, full)                       # rank r: sum of rows r*n/W..
    return out.movedim(0, dim).contiguous()


@register("all_to_all", "reference")
def all_to_all_reference(x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
    world = _world_size()
    if world == 1:
        return _copy(x)
    send = torch.stack(x.chunk(world, split_dim))           # [W, part]: send[j] to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)                      # recv[i]: rank i's part for us
    return torch.cat(recv.unbind(0), dim=concat_dim)


@register("all_reduce_add_rms_norm", "reference")
def all_reduce_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Exactly the unfused sequence, so the two agree bitwise: all_reduce, then the
    # fused_add_rms_norm reference (x + residual == residual + x in IEEE arithmetic).
    return fused_add_rms_norm_reference(all_reduce_reference(x), residual, weight, eps)


@register("all_reduce_add_layer_norm", "reference")
def all_reduce_add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The unfused sequence, as for RMSNorm above.
    return fused_add_layer_norm_reference(all_reduce_reference(x), residual, weight, bias, eps)


# ---------------------------------------------------------------------------------------
# Public ops

@kernel_op("all_reduce")
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """P → R: x [...] summed over ranks -> [...]"""
    return dispatch("all_reduce", x, world_size=_world_size()).contiguous()


@all_reduce.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@kernel_op("all_gather")
def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """S(dim) → R: x [.., n, ..] -> [.., n*W, ..], rank parts in rank order."""
    d = _dim("all_gather", x, dim)
    return dispatch("all_gather", x, d, world_size=_world_size()).contiguous()


@all_gather.register_fake
def _(x, dim):
    d = _dim("all_gather", x, dim)
    shape = list(x.shape)
    shape[d] = shape[d] * _world_size()
    return x.new_empty(shape)


@kernel_op("reduce_scatter")
def reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    """P → S(dim): x [.., n, ..] summed over ranks, rank r keeps part r -> [.., n/W, ..]"""
    world = _world_size()
    d = _split_dim("reduce_scatter", x, dim, world)
    return dispatch("reduce_scatter", x, d, world_size=world).contiguous()


@reduce_scatter.register_fake
def _(x, dim):
    world = _world_size()
    d = _split_dim("reduce_scatter", x, dim, world)
    shape = list(x.shape)
    shape[d] = shape[d] // world
    return x.new_empty(shape)


@kernel_op("all_to_all")
def all_to_all(x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
    """S(concat_dim) → S(split_dim): split_dim n → n/W, concat_dim m → m*W."""
    world = _world_size()
    s = _split_dim("all_to_all", x, split_dim, world, "split_dim")
    c = _dim("all_to_all", x, concat_dim, "concat_dim")
    return dispatch("all_to_all", x, s, c, world_size=world).contiguous()


@all_to_all.register_fake
def _(x, split_dim, concat_dim):
    world = _world_size()
    s = _split_dim("all_to_all", x, split_dim, world, "split_dim")
    c = _dim("all_to_all", x, concat_dim, "concat_dim")
    shape = list(x.shape)
    shape[s] = shape[s] // world
    shape[c] = shape[c] * world
    return x.new_empty(shape)


def _check_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if residual.shape != x.shape or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"all_reduce_add_rms_norm: x {list(x.shape)}, residual "
                         f"{list(residual.shape)} and weight {list(weight.shape)} disagree "
                         f"(expected residual {list(x.shape)} and weight [{x.shape[-1]}])")


@kernel_op("all_reduce_add_rms_norm")
def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [.., H] partial (P), residual [.., H] replicated (R), weight [H] ->
    (rms_norm(s, weight, eps), s) with s = residual + all_reduce(x), both R."""
    _check_add_norm(x, residual, weight)
    normed, summed = dispatch("all_reduce_add_rms_norm", x, residual, weight, eps,
                              world_size=_world_size())
    return normed.contiguous(), summed.contiguous()


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    _check_add_norm(x, residual, weight)
    return torch.empty_like(x), torch.empty_like(x)


def _check_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> None:
    if residual.shape != x.shape:
        raise ValueError(f"all_reduce_add_layer_norm: residual {list(residual.shape)} must "
                         f"have x's shape {list(x.shape)}")
    check_layer_norm_params("all_reduce_add_layer_norm", x, weight, bias)


@kernel_op("all_reduce_add_layer_norm")
def all_reduce_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [.., H] partial (P), residual [.., H] replicated (R), weight/bias [H] (R; bias may
    be None) -> (layer_norm(s, weight, bias, eps), s) with s = residual + all_reduce(x),
    both R."""
    _check_add_layer_norm(x, residual, weight, bias)
    normed, summed = dispatch("all_reduce_add_layer_norm", x, residual, weight, bias, eps,
                              world_size=_world_size())
    return normed.contiguous(), summed.contiguous()


@all_reduce_add_layer_norm.register_fake
def _(x, residual, weight, bias, eps):
    _check_add_layer_norm(x, residual, weight, bias)
    return torch.empty_like(x), torch.empty_like(x)
