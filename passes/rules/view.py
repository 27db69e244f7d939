"""Data-movement ops and reductions: the output placement follows the input's.

  view/reshape    a sharded dim must be the leading dim of its merge/split group, and the
                  group's leading output dim must divide by ranks x chunks
  transpose/permute, unsqueeze    the shard moves with its dim
  getitem         on a tuple: that element; on a tensor: a sharded dim must be kept whole
  split/chunk, cat, sum/mean/amax/softmax/topk    along an unsharded dim only
                  (sum over the sharded dim is a partial sum: S(d) -> P), except that a
                  fused projection's S(d)xk splits into its k equal chunks, each S(d)
                  ([q ; k ; v] -> q, k, v), and a slice of exactly one chunk is S(d)
Linear ones (view, transpose, getitem, split, cat, sum, mean) pass P through.
"""
from __future__ import annotations

import sympy
from torch import fx

from tscompile.annotations import Partial, Replicate, Shard
from tscompile.passes.ir import S, T, tensor_args
from tscompile.passes.rules import R, Ctx, Reject, Strategy, follow, rule

P = Partial()
_AT = {T: 1009, S: 1013}       # large primes: a product equality at this point is exact


def _num(e: sympy.Expr) -> int:
    return int(sympy.sympify(e).subs(_AT))


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def _groups(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims with equal products: [T, 576] -> [T, 9, 64] gives
    ([0], [0]), ([1], [1, 2]). Size-1 dims join the run they sit in."""
    a, b = [_num(x) for x in src], [_num(x) for x in dst]
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, dj, pa, pb = [], [], 1, 1
        while True:
            if pa <= pb and i < len(a) and (not si or pa < pb or a[i] == 1):
                pa *= a[i]; si.append(i); i += 1
            elif j < len(b) and (not dj or pb < pa or b[j] == 1):
                pb *= b[j]; dj.append(j); j += 1
            else:
                break
        out.append((si, dj))
    return out


def _view(node: fx.Node, ctx: Ctx, p):
    if not isinstance(p, Shard):
        return p
    src = node.args[0].meta["val"].shape
    dst = node.meta["val"].shape
    for si, dj in _groups(src, dst):
        if p.dim not in si:
            continue
        lead_in = next(d for d in si if _num(src[d]) != 1)
        if p.dim != lead_in:
            raise Reject(f"dim {p.dim} is merged into a larger dim behind dim {lead_in}")
        lead_out = next((d for d in dj if _num(dst[d]) != 1), None)
        if lead_out is None:
            raise Reject("the sharded dim disappears")
        size = dst[lead_out]
        if size.free_symbols or _num(size) % (ctx.world * p.chunks):
            per = f"{p.chunks} chunks x {ctx.world}" if p.chunks > 1 else str(ctx.world)
            raise Reject(f"view {list(src)} -> {list(dst)}: dim {lead_out} (size {size}) does "
                         f"not split over {per} ranks")
        return Shard(lead_out, p.chunks)
    raise Reject("no matching dims")


@rule("method:view", "method:reshape", "reshape", "method:flatten", "flatten")
def view(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return follow(node, ctx, node.args[0], lambda p: _view(node, ctx, p))


def _norm(d: int, n: int) -> int:
    return d % n if n else d


def _moved(node: fx.Node, ctx: Ctx, perm: list[int]) -> list[Strategy]:
    """The output's dim i is the input's dim perm[i]: a shard moves with its dim."""
    def fn(p):
        return Shard(perm.index(p.dim), p.chunks) if isinstance(p, Shard) else p
    return follow(node, ctx, node.args[0], fn)


@rule("method:permute", "permute")
def permute(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    # torch.permute(x, dims) and x.permute(dims) take one sequence, x.permute(*dims) many.
    dims = node.kwargs.get("dims", node.args[1] if len(node.args) == 2 else node.args[1:])
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    n = node.args[0].meta["val"].ndim
    return _moved(node, ctx, [_norm(d, n) for d in dims])


@rule("method:transpose", "transpose", "method:t")
def transpose(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    n = node.args[0].meta["val"].ndim
    d0, d1 = (0, 1) if node.target == "t" else (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
    perm = list(range(n))
    perm[_norm(d0, n)], perm[_norm(d1, n)] = perm[_norm(d1, n)], perm[_norm(d0, n)]
    return _moved(node, ctx, perm)


@rule("method:unsqueeze", "unsqueeze")
def unsqueeze(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    d = _norm(_arg(node, 1, "dim"), node.meta["val"].ndim)

    def fn(p):
        return Shard(p.dim + (p.dim >= d), p.chunks) if isinstance(p, Shard) else p
    return follow(node, ctx, node.args[0], fn)


def chunk_of(i: object, size: sympy.Expr, chunks: int) -> int | None:
    """Which chunk a basic slice of a dim of `size` (cut in `chunks` equal chunks) is
    exactly, or None (qkv[..., H:2H] of a [q ; k ; v] is chunk 1)."""
    if chunks == 1 or not isinstance(i, slice) or i.step not in (None, 1) or \
            sympy.sympify(size).free_symbols or \
            not all(isinstance(x, (int, type(None))) for x in (i.start, i.stop)):
        return None
    n = int(size)
    start, stop, _ = i.indices(n)
    width = n // chunks
    if n % chunks or stop - start != width or start % width:
        return None
    return start // width


def _getitem_tensor(node: fx.Node, p, idx) -> object:
    if not isinstance(p, Shard):
        return p
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_in = node.args[0].meta["val"].ndim
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (n_in - used)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (n_in - sum(1 for i in expanded if i is not None))
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if d_in == p.dim:
            if isinstance(i, slice) and i == slice(None):
                return Shard(d_out, p.chunks)
            if chunk_of(i, node.args[0].meta["val"].shape[p.dim], p.chunks) is not None:
                return Shard(d_out)
            raise Reject(f"indexing the sharded dim {p.dim} with {i!r}")
        d_in += 1
        if not isinstance(i, int):
            d_out += 1 if not isinstance(i, fx.Node) else i.meta["val"].ndim
    raise Reject("index out of range")


@rule("getitem", "method:__getitem__")
def getitem(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    src, idx = node.args
    if isinstance(src.meta["val"], tuple):
        return follow(node, ctx, src, lambda p: p[idx])
    extra = tuple(a for a in tensor_args(node)[1:])
    return follow(node, ctx, src, lambda p: _getitem_tensor(node, p, idx), extra)


def _along(node: fx.Node, ctx: Ctx, dim_pos: int, linear: bool, tuple_out: int = 0,
           drop: bool = False, sum_partial: bool = False) -> list[Strategy]:
    src = tensor_args(node)[0]
    n = src.meta["val"].ndim
    raw = _arg(node, dim_pos, "dim", None)
    dims = set(range(n)) if raw is None else {_norm(d, n) for d in
                                              (raw if isinstance(raw, (list, tuple)) else [raw])}
    keep = _arg(node, dim_pos + 1, "keepdim", False) if drop else True

    def fn(p):
        if isinstance(p, Partial) and not linear:
            raise Reject("not linear: needs the full sum")
        if isinstance(p, Shard):
            if p.dim in dims:
                if sum_partial:
                    return P
                if tuple_out and p.chunks == tuple_out and _equal_pieces(node, p.dim):
                    return tuple(Shard(p.dim) for _ in range(tuple_out))   # one per chunk
                raise Reject(f"works along the sharded dim {p.dim}")
            p = Shard(p.dim - sum(1 for d in dims if d < p.dim and not keep), p.chunks)
        return tuple(p for _ in range(tuple_out)) if tuple_out else p
    return follow(node, ctx, src, fn)


def _equal_pieces(node: fx.Node, dim: int) -> bool:
    sizes = {str(v.shape[dim]) for v in node.meta["val"]}
    return len(sizes) == 1


@rule("method:split", "split", "method:chunk", "chunk")
def split(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 2, True, tuple_out=len(node.meta["val"]))


@rule("method:softmax", "softmax", "log_softmax", "method:log_softmax")
def softmax(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 1, False)


@rule("method:sum", "sum")
def reduce_sum(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 1, True, drop=True, sum_partial=True)


@rule("method:mean", "mean")
def reduce_mean(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 1, True, drop=True)


@rule("method:amax", "amax", "method:argmax", "argmax")
def reduce_max(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 1, False, drop=True)


@rule("method:topk", "topk")
def topk(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    return _along(node, ctx, 2, False, tuple_out=2)


@rule("cat", "concat", "concatenate")
def cat(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    args = tensor_args(node)
    n = node.meta["val"].ndim
    d = _norm(_arg(node, 1, "dim", 0), n)
    found = [Strategy(tuple(Shard(k) for _ in args), Shard(k)) for k in range(n) if k != d]
    return found + [Strategy(tuple(R for _ in args), R), Strategy(tuple(P for _ in args), P)]


@rule("getattr")
def attribute(node: fx.Node, ctx: Ctx) -> list[Strategy]:
    # A field of the step metadata (always replicated) or a tensor attribute.
    return [Strategy(tuple(Replicate() for _ in tensor_args(node)), R)]
