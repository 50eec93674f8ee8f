"""Batch-layout analysis: for every tensor of an fx graph, where the batch lives.

A tensor either carries no batch (`None`), carries it in one dim (`BatchLayout`), or could not be
analysed (`UNKNOWN`). Inside a dim the batch may be merged with other factors: a dim of size
`outer * B * inner` indexes sample `b` at `(o * B + b) * inner + i`. `nn.MultiheadAttention`, for
example, flattens `[T, B, E]` to `[T*B, E]`, which is `outer=T, inner=1` (t-major), while a Linear on
`[B, T, E]` flattens b-major (`outer=1, inner=T`). The symbol of B alone cannot tell these apart, so
layouts are propagated op by op from the batch inputs. Anything not understood becomes `UNKNOWN`,
and a parameter gradient that depends on an `UNKNOWN` tensor is refused rather than guessed.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.bag_layout import RULES as _BAG_RULES
from grapefx.analysis.bag_layout import BagOffsets, bag_length
from grapefx.analysis.indexing_layout import RULES as _INDEXING_RULES
from grapefx.analysis.indexing_layout import BatchIndex, batch_index_position, masked_selections
from grapefx.analysis.layout_types import UNKNOWN, BatchLayout, equal_count_rows, shape_of, to_sym
from grapefx.analysis.rng_replay import wrapped_op
from grapefx.analysis.selection_layout import RULES as _SELECTION_RULES

aten = torch.ops.aten


@dataclass
class LayoutResult:
    """Layouts of every node, plus the nodes that reduce over the batch."""

    layouts: dict[fx.Node, Any] = field(default_factory=dict)
    batch_reductions: dict[fx.Node, str] = field(default_factory=dict)  # node -> kind
    unknown_ops: dict[fx.Node, str] = field(default_factory=dict)  # first UNKNOWN producers
    batch_index: dict[fx.Node, int] = field(default_factory=dict)  # arange(B)s: see indexing_layout
    bag_offsets: dict[fx.Node, int] = field(default_factory=dict)  # EmbeddingBag offsets: see bag_layout
    # x[mask] / index_put(x, [mask], v) read as per sample on the condition that every sample selects
    # as many rows: node -> (mask, row count n) (the forward checks it at run time); n read as B·c
    masked_rows: dict[fx.Node, tuple[fx.Node, Any]] = field(default_factory=dict)
    row_counts: dict[Any, Any] = field(default_factory=dict)
    # mask node -> the per-sample count c of every selection by it (grad sites over its rows read
    # them padded back through it: passes/pad_masked_rows.py)
    mask_counts: dict[fx.Node, Any] = field(default_factory=dict)


# unknown_ops' reason for a gradient contraction over the rows of x[mask]
MASKED_ROWS_SITE = "a contraction over rows selected with a boolean mask"


def _prod(xs: list[Any]) -> Any:
    return sympy.Mul(*xs) if xs else sympy.Integer(1)


def _pos_int(x: Any, batch: Any) -> bool:
    x = sympy.simplify(x)
    if batch.free_symbols & x.free_symbols:
        return False
    return bool(x.is_integer) and bool(x.is_positive)


def reshape_layout(lay: BatchLayout, in_shape: list[Any], out_shape: list[Any], batch: Any) -> Any:
    """Where the batch lands after a row-major reshape (view, squeeze, unsqueeze, flatten)."""
    # A model repeats the same reshapes in every layer, and sympy's simplify is slow (~15 s of a
    # 16-layer Llama's compile): the answer depends on the sizes only, so it is cached.
    return _reshape_layout(lay, tuple(in_shape), tuple(out_shape), batch)


@functools.lru_cache(maxsize=4096)
def _reshape_layout(lay: BatchLayout, in_shape: tuple[Any, ...], out_shape: tuple[Any, ...], batch: Any) -> Any:
    pre = _prod(in_shape[: lay.dim]) * lay.outer
    post = lay.inner * _prod(in_shape[lay.dim + 1 :])
    found = []
    for j in range(len(out_shape)):
        o = sympy.simplify(pre / _prod(out_shape[:j]))
        i = sympy.simplify(post / _prod(out_shape[j + 1 :]))
        if not (_pos_int(o, batch) and _pos_int(i, batch)):
            continue
        if sympy.expand(out_shape[j] - o * batch * i) == 0:
            found.append(BatchLayout(j, o, i))
    if not found:
        return UNKNOWN
    # Several fit only when B is 1 (a graph specialised to one sample): then the view that splits a
    # [k·B] dim as [k, B] is read as such (plain), not as the batch staying inside the first dim.
    return min(found, key=lambda lay: 0 if lay.plain else 1)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Propagator:
    def __init__(
        self,
        gm: fx.GraphModule,
        batch: Any,
        seeds: dict[str, Any],
        checked_rows: Mapping[Any, Any] | None = None,
        forward: bool = False,
    ) -> None:
        self.gm = gm
        self.forward = forward
        self.batch = batch
        self.seeds = seeds
        self.res = LayoutResult()
        # boolean-mask selections whose row count may be read as B·c: all of them in a forward graph
        # (it gets a run-time check for each one accepted), those the forward accepted in a backward
        # (`checked_rows`: their counts -> per-sample count symbols). Selections by one mask node
        # select mask.sum() rows whatever they select from, so they share one per-sample count,
        # though torch gives each its own unbacked symbol (the backward of a masked write,
        # v = grad[mask], a fresh one)
        selections = masked_selections(gm)
        owners: dict[Any, set[fx.Node]] = {}
        for mask, rows in selections.values():
            owners.setdefault(rows, set()).add(mask)
        per_mask = self.res.mask_counts
        for mask, rows in selections.values():
            if len(owners[rows]) > 1:
                continue  # torch proved two masks' counts equal: neither mask is known through it
            if checked_rows is None:
                per_mask.setdefault(mask, sympy.Symbol(f"{rows}_per_sample", integer=True, positive=True))
            elif rows in checked_rows:
                per_mask.setdefault(mask, checked_rows[rows])
        # a backward also takes the fresh counts of selections by a mask the forward accepted
        aliased = {rows for mask, rows in selections.values() if len(owners[rows]) == 1 and mask in per_mask}
        self.masked = {
            n: (mask, rows)
            for n, (mask, rows) in selections.items()
            if checked_rows is None or rows in checked_rows or not forward and rows in aliased
        }
        for mask, rows in self.masked.values():
            if checked_rows is not None and rows in checked_rows:
                count = checked_rows[rows]
            elif len(owners[rows]) == 1:
                count = per_mask[mask]
            else:
                count = sympy.Symbol(f"{rows}_per_sample", integer=True, positive=True)
            self.res.row_counts[rows] = batch * count
        self.batch_index: dict[fx.Node, int] = {}  # arange(B) and its reshapes: see indexing_layout
        self.bag_offsets: dict[fx.Node, int] = {}  # arange(0, B·L, L) of nn.EmbeddingBag: see bag_layout

    # -- helpers -------------------------------------------------------------------------------
    def lay(self, arg: Any) -> Any:
        return self.res.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        out = []
        for a in node.args:
            if isinstance(a, fx.Node):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, fx.Node))
        out.extend(v for v in node.kwargs.values() if isinstance(v, fx.Node))
        return out

    def broadcast(self, node: fx.Node, args: list[Any]) -> Any:
        out_shape = shape_of(node)
        if out_shape is None:
            return UNKNOWN
        result = None
        for a in args:
            la = self.lay(a)
            if la is None:
                continue
            if la is UNKNOWN:
                return UNKNOWN
            a_shape = shape_of(a)
            d = la.dim + len(out_shape) - len(a_shape)
            if sympy.expand(out_shape[d] - a_shape[la.dim]) != 0:
                return UNKNOWN  # the batch dim itself was broadcast: not a per-sample op
            cand = la.moved(d)
            if result is None:
                result = cand
            elif result != cand:
                return UNKNOWN
        return result

    def reduction(self, node: fx.Node, x: Any, dims: Any, keepdim: bool) -> Any:
        lx = self.lay(x)
        if lx is None or lx is UNKNOWN:
            return lx
        ndim = len(shape_of(x))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(ndim))
        if isinstance(dims, int):
            dims = [dims]
        dims = [_norm_dim(d, ndim) for d in dims]
        if lx.dim in dims:
            self.res.batch_reductions[node] = "reduce"
            return None
        if keepdim:
            return lx
        return lx.moved(lx.dim - sum(1 for d in dims if d < lx.dim))

    def _reads_masked_rows(self, node: fx.Node) -> bool:
        """Whether an input's batch shares its dim with a data-dependent count (x[mask]'s rows)."""
        for a in self.tensor_args(node):
            la = self.lay(a)
            if isinstance(la, BatchLayout) and not sympy.sympify(la.outer * la.inner).is_number:
                return True
        return False

    # -- per-op rules --------------------------------------------------------------------------
    def rule(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        if t is operator.getitem:
            src = self.lay(args[0])
            if isinstance(src, (tuple, list)):
                return src[args[1]]
            return UNKNOWN if src is not None else None
        wrapped = wrapped_op(node)
        if wrapped is not None:  # a random op replayed by activation checkpointing: the op itself
            call, returns_state = wrapped
            if call.meta["val"] is None:  # no value to read the op's output shapes from
                return UNKNOWN
            lay = self.rule(call)  # type: ignore[arg-type]
            return (None, lay) if returns_state else lay
        if not isinstance(t, torch._ops.OpOverload):
            ins = [self.lay(a) for a in self.tensor_args(node)]
            return None if all(i is None for i in ins) else UNKNOWN
        ins = self.tensor_args(node)
        if all(self.lay(a) is None for a in ins):
            # No batch input: batch-free (creation ops included, even when a size is B).
            position = batch_index_position(node, self.batch, self.batch_index)
            if position is not None:
                self.batch_index[node] = position
                self.res.batch_index[node] = position
            length = bag_length(node, self.batch)
            if length is not None:
                self.bag_offsets[node] = self.res.bag_offsets[node] = length
            return None
        packet = t.overloadpacket
        handler = _RULES.get(packet)
        if handler is not None:
            return handler(self, node)
        if torch.Tag.pointwise in t.tags:
            return self.broadcast(node, ins)
        return UNKNOWN

    def run(self) -> LayoutResult:
        with equal_count_rows(self.res.row_counts):
            return self._run()

    def _run(self) -> LayoutResult:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                seed = self.seeds.get(node.name)
                if isinstance(seed, BatchIndex):
                    self.batch_index[node] = self.res.batch_index[node] = seed.position
                    seed = None
                elif isinstance(seed, BagOffsets):
                    self.bag_offsets[node] = self.res.bag_offsets[node] = seed.length
                    seed = None
                self.res.layouts[node] = seed
            elif node.op == "call_function":
                try:
                    lay = self.rule(node)
                except (IndexError, TypeError, ValueError):
                    lay = UNKNOWN
                if not self.forward and node in self.res.batch_reductions and self._reads_masked_rows(node):
                    # a grad site over rows counted per sample by the data: the rules need a per-sample
                    # size they can compute with (in a forward graph, such a reduction is the loss)
                    del self.res.batch_reductions[node]
                    lay = UNKNOWN
                    self.res.unknown_ops[node] = MASKED_ROWS_SITE
                self.res.layouts[node] = lay
                if lay is UNKNOWN and not any(self.lay(a) is UNKNOWN for a in self.tensor_args(node)):
                    self.res.unknown_ops.setdefault(node, str(node.target))
            elif node.op in ("output", "get_attr"):  # get_attr: a tensor constant, batch-free
                self.res.layouts[node] = None
            else:
                self.res.layouts[node] = UNKNOWN
        return self.res


def _same(p: _Propagator, n: fx.Node) -> Any:
    return p.lay(n.args[0])


def _reshape(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    out = shape_of(n)
    if not out:
        return UNKNOWN
    return reshape_layout(lx, shape_of(n.args[0]), out, p.batch)


def _permute(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    ndim = len(shape_of(n.args[0]))
    dims = [_norm_dim(d, ndim) for d in n.args[1]]
    return lx.moved(dims.index(lx.dim))


def _transpose(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    ndim = len(shape_of(n.args[0]))
    if n.target == aten.t.default:
        d0, d1 = 0, 1
    else:
        d0, d1 = _norm_dim(n.args[1], ndim), _norm_dim(n.args[2], ndim)
    swap = {d0: d1, d1: d0}
    return lx.moved(swap.get(lx.dim, lx.dim))


def _expand(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    in_shape, out_shape = shape_of(n.args[0]), shape_of(n)
    d = lx.dim + len(out_shape) - len(in_shape)
    if sympy.expand(out_shape[d] - in_shape[lx.dim]) != 0:
        return UNKNOWN
    return lx.moved(d)


def _repeat(p: _Propagator, n: fx.Node) -> Any:
    """x.repeat(r0, r1, ...): new leading dims, then each dim tiled r times. Tiling the batch dim
    (ViT-MAE's index repeats are 1 there) puts a copy of every sample in each tile: outer grows."""
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    repeats = list(n.args[1])
    d = lx.dim + len(repeats) - len(shape_of(n.args[0]))
    r = to_sym(repeats[d])
    return lx.moved(d) if r == 1 else BatchLayout(d, r * lx.outer, lx.inner)


def _select(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    d = _norm_dim(n.args[1], len(shape_of(n.args[0])))
    if d == lx.dim:
        return UNKNOWN  # picks one sample out of the batch
    return lx.moved(lx.dim - (1 if d < lx.dim else 0))


def _slice(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    d = _norm_dim(n.args[1] if len(n.args) > 1 else 0, len(shape_of(n.args[0])))
    if d != lx.dim:
        return lx
    return lx if sympy.expand(shape_of(n)[d] - shape_of(n.args[0])[d]) == 0 else UNKNOWN


def _cat(p: _Propagator, n: fx.Node) -> Any:
    tensors = n.args[0]
    out_shape = shape_of(n)
    d = _norm_dim(n.args[1] if len(n.args) > 1 else 0, len(out_shape))
    layouts = [p.lay(t) for t in tensors]
    if any(lt is UNKNOWN for lt in layouts):
        return UNKNOWN
    batched = [lt for lt in layouts if lt is not None]
    if not batched:
        return None
    if any(lt.dim == d for lt in batched):
        # Along the batch dim: whole batches side by side (a decomposed `stack` of q/k/v gradients
        # is cat([gq, gk, gv], 0) then a view to [3, B, ...]). Dim d is then (Σ outer, B, inner);
        # a batch-free piece, or pieces that split the batch differently, would mix samples.
        if len(batched) < len(layouts) or any(lt.dim != d or lt.inner != batched[0].inner for lt in batched):
            return UNKNOWN
        return BatchLayout(d, sympy.expand(sum(lt.outer for lt in batched)), batched[0].inner)
    if any(lt != batched[0] for lt in batched):
        return UNKNOWN
    return batched[0]


def _split(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[0])
    val = n.meta.get("val")
    if lx is UNKNOWN or not isinstance(val, (list, tuple)):
        return UNKNOWN
    ndim = len(shape_of(n.args[0]))
    d = _norm_dim(n.args[2] if len(n.args) > 2 else 0, ndim)
    if n.target.overloadpacket is aten.unbind:
        d = _norm_dim(n.args[1] if len(n.args) > 1 else 0, ndim)
        if d == lx.dim:
            return UNKNOWN
        return tuple(lx.moved(lx.dim - (1 if d < lx.dim else 0)) for _ in val)
    if d == lx.dim:
        return UNKNOWN
    return tuple(lx for _ in val)


def _reduce_dims(p: _Propagator, n: fx.Node) -> Any:
    x = n.args[0]
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if n.target in (aten.sum.default, aten.mean.default, aten.any.default):  # amax.default takes dims
        dims, keep = None, False
    return p.reduction(n, x, dims, bool(keep))


def _var(p: _Propagator, n: fx.Node) -> Any:
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return p.reduction(n, n.args[0], dims, bool(n.kwargs.get("keepdim", False)))


def _mm(p: _Propagator, n: fx.Node) -> Any:
    if n.target.overloadpacket is aten.addmm:
        bias, a, b = n.args[:3]
    else:
        bias, (a, b) = None, n.args[:2]
    la, lb = p.lay(a), p.lay(b)
    if UNKNOWN in (la, lb):
        return UNKNOWN
    if (la is not None and la.dim == 1) or (lb is not None and lb.dim == 0):
        if (la is not None and la.dim != 1) or (lb is not None and lb.dim != 0):
            return UNKNOWN  # batch in the contraction and in an output dim: samples would mix
        if la is not None and lb is not None and la != lb.moved(1):
            return UNKNOWN
        if bias is not None and p.lay(bias) is not None:
            return UNKNOWN
        p.res.batch_reductions[n] = "mm"
        return None
    if la is not None and lb is not None:
        return UNKNOWN  # batch on both sides of the product: samples would mix
    out = la.moved(0) if la is not None else lb.moved(1)
    if bias is not None and p.lay(bias) is not None:
        lbias = p.lay(bias)
        bshape = shape_of(bias)
        if lbias is UNKNOWN or lbias.moved(lbias.dim + 2 - len(bshape)) != out:
            return UNKNOWN
    return out


def _bmm(p: _Propagator, n: fx.Node) -> Any:
    if n.target.overloadpacket is aten.baddbmm:
        return UNKNOWN
    a, b = n.args[:2]
    la, lb = p.lay(a), p.lay(b)
    if UNKNOWN in (la, lb):
        return UNKNOWN
    if la is not None and lb is not None:
        if la.dim == 0 and lb == la:
            return la
        if la.dim == 2 and lb.dim == 1 and la.outer == lb.outer and la.inner == lb.inner:
            p.res.batch_reductions[n] = "bmm"
            return None
        return UNKNOWN
    if la is not None:
        if la.dim == 2:
            p.res.batch_reductions[n] = "bmm"
            return None
        return la
    if lb.dim == 1:
        p.res.batch_reductions[n] = "bmm"
        return None
    return lb


def _embedding(p: _Propagator, n: fx.Node) -> Any:
    weight, idx = n.args[:2]
    if p.lay(weight) is not None:
        return UNKNOWN
    return p.lay(idx)


def _convolution(p: _Propagator, n: fx.Node) -> Any:
    x, w = n.args[:2]
    bias = n.args[2] if len(n.args) > 2 else None
    lx = p.lay(x)
    if lx is UNKNOWN or p.lay(w) is not None or p.lay(bias) is not None:
        return UNKNOWN
    return lx if _leading_images(lx) else UNKNOWN


def _leading_images(lay: Any) -> bool:
    """The batch leads dim 0 of a convolution's input, each sample one image or a static number of
    consecutive ones ([B·T, C, *S]: a video's frames through a Conv2d, sample-major)."""
    return lay.dim == 0 and lay.outer == 1 and sympy.sympify(lay.inner).is_Integer


def _conv_backward(p: _Propagator, n: fx.Node) -> Any:
    grad, x, w = n.args[:3]
    lg, lx = p.lay(grad), p.lay(x)
    if p.lay(w) is not None:
        return UNKNOWN
    for lay in (lg, lx):
        if lay is not None and (lay is UNKNOWN or not _leading_images(lay)):
            return UNKNOWN
    if lg is not None and lx is not None and lg != lx:
        return UNKNOWN
    if _sums_parameter_grads(n):
        p.res.batch_reductions[n] = "convolution_backward"
    return (lg if lg is not None else lx, None, None)


def _embedding_backward(p: _Propagator, n: fx.Node) -> Any:
    grad, idx = n.args[:2]
    lg, li = p.lay(grad), p.lay(idx)
    # ids without a batch layout are the same for every sample (BERT's default token_type_ids: a
    # buffer expanded to [B, T]); they have the grad's leading shape, so the grad's layout fits them
    if li is None and isinstance(lg, BatchLayout):
        li = lg
    if UNKNOWN in (lg, li) or li is None or (lg is not None and lg != li):
        return UNKNOWN
    p.res.batch_reductions[n] = "embedding_dense_backward"
    return None


def _layer_norm(p: _Propagator, n: fx.Node) -> Any:
    x, normalized_shape = n.args[:2]
    lx = p.lay(x)
    if lx is UNKNOWN or any(p.lay(a) is not None for a in n.args[2:4] if isinstance(a, fx.Node)):
        return UNKNOWN
    ndim = len(shape_of(x))
    if lx.dim >= ndim - len(normalized_shape):
        return UNKNOWN  # normalizing over the batch
    return (lx, lx, lx)


def _group_norm(p: _Propagator, n: fx.Node) -> Any:
    # each row of dim 0 is normalized on its own: per sample also when the rows are the batch merged
    # with the positions ([B·T, C], LeViT's and PatchTST's norms after replace_batch_norm)
    lx = p.lay(n.args[0])
    if lx is None:
        return (None, None, None)
    if lx is UNKNOWN or lx.dim != 0 or lx.outer != 1:
        return UNKNOWN
    return (lx, lx, lx)


def _layer_norm_backward(p: _Propagator, n: fx.Node) -> Any:
    grad, x, normalized_shape, mean, rstd, *affine = n.args[:7]
    lx = p.lay(grad)
    # x and its statistics are per-sample like the gradient, or batch-free: a parameter expanded
    # over the batch and normalized (PEGASUS-X's global tokens), the same rows for every sample
    stats = [p.lay(a) for a in (x, mean, rstd)]
    if lx is None or lx is UNKNOWN or not (all(s == lx for s in stats) or all(s is None for s in stats)):
        return UNKNOWN
    if any(p.lay(a) is not None for a in affine) or lx.dim >= len(shape_of(x)) - len(normalized_shape):
        return UNKNOWN
    if _sums_parameter_grads(n):  # the weight / bias gradients sum over the batch
        p.res.batch_reductions[n] = "norm_backward"
    return (lx, None, None)


def _group_norm_backward(p: _Propagator, n: fx.Node) -> Any:
    grad, x, mean, rstd, weight = n.args[:5]
    lx = p.lay(x)
    if lx is None or lx is UNKNOWN or lx.dim != 0 or lx.outer != 1:
        return UNKNOWN
    if any(p.lay(a) != lx for a in (grad, mean, rstd)) or p.lay(weight) is not None:
        return UNKNOWN
    if _sums_parameter_grads(n):
        p.res.batch_reductions[n] = "norm_backward"
    return (lx, None, None)


def _sums_parameter_grads(n: fx.Node) -> bool:
    """A convolution / norm backward asked for its weight or bias gradient (output_mask, the last
    argument): a batch sum. One asked for the input gradient alone keeps the batch."""
    mask = n.args[-1]
    return not isinstance(mask, (list, tuple)) or any(mask[1:])


def _batch_norm(p: _Propagator, n: fx.Node) -> Any:
    if n.target is aten._native_batch_norm_legit.no_stats:
        training = n.args[3]
    else:
        training = n.args[5] if n.target.overloadpacket is not aten._native_batch_norm_legit_no_training else False
    lx = p.lay(n.args[0])
    vals = n.meta.get("val")
    if _instance_norm(p, lx, training, n.args[1:3]) and len(vals) == 3:
        stats = BatchLayout(0, lx.outer, lx.inner)
        return (lx, stats, stats)
    if p.batch == 1 and _single_sample_instance_norm(n):
        return (lx, None, None)
    if lx is UNKNOWN or lx.dim != 0 or not lx.plain:
        return UNKNOWN
    if training:  # refused by check_forward; the rest of the graph is read as if per sample, so
        # that one error names every BatchNorm layer
        p.res.batch_reductions[n] = "batch_norm"
    return tuple(lx if i == 0 else None for i in range(len(vals)))


def _instance_norm(p: _Propagator, lx: Any, training: Any, affine: Any) -> bool:
    """InstanceNorm runs batch norm on x viewed as [1, B·C, ...]: the batch is in the channel dim, so
    each normalized channel belongs to one sample (the per-channel weight is repeated B times)."""
    return (
        bool(training)
        and isinstance(lx, BatchLayout)
        and lx.dim == 1
        and all(p.lay(a) is None for a in affine if isinstance(a, fx.Node))
    )


def _single_sample_instance_norm(n: fx.Node) -> bool:
    """In a graph specialized to B=1 the [1, 1·C, ...] view cannot tell where the batch is; an
    instance norm is recognized by its op (no running statistics) and its weight (absent, or
    repeated over the batch). Over one sample it is per-sample anyway."""
    weight = n.args[1]
    return n.target is aten._native_batch_norm_legit.no_stats and (
        weight is None or getattr(weight.target, "overloadpacket", None) is aten.repeat
    )


def _batch_norm_backward(p: _Propagator, n: fx.Node) -> Any:
    """native_batch_norm_backward of an instance norm (see `_instance_norm`): the weight and bias
    gradients are per channel of [B·C], i.e. per sample; any other batch norm backward is refused."""
    grad, x, weight, _, _, mean, invstd, train = n.args[:8]
    lx = p.lay(x)
    if not _instance_norm(p, lx, train, [weight]):
        return UNKNOWN
    stats = BatchLayout(0, lx.outer, lx.inner)
    if p.lay(grad) != lx or p.lay(mean) != stats or p.lay(invstd) != stats:
        return UNKNOWN
    return (lx, stats, stats)


def _softmax(p: _Propagator, n: fx.Node) -> Any:
    lays = [p.lay(a) for a in n.args[:2] if isinstance(a, fx.Node)]
    res = p.broadcast(n, [a for a in n.args[:2] if isinstance(a, fx.Node)])
    if res is None or res is UNKNOWN:
        return res
    dim_arg = n.args[1] if n.target.overloadpacket in (aten._softmax, aten._log_softmax) else n.args[2]
    d = _norm_dim(dim_arg, len(shape_of(n)))
    del lays
    return UNKNOWN if d == res.dim else res


def _index_along(p: _Propagator, n: fx.Node) -> Any:
    # gather / scatter / index_select / index_add (roll decomposes to index_select): per-sample when
    # every batch operand shares the layout and the indexed dim is not the batch dim.
    x, d = n.args[0], n.args[1]
    dim = _norm_dim(d, len(shape_of(x)))
    if n.target.overloadpacket is aten.index_select and p.lay(x) is None:
        # a batch-free table read with per-sample ids flattened to 1-D (Speech2Text's sinusoidal
        # positions): entry j of dim `dim` belongs to the sample index entry j does
        li = p.lay(n.args[2])
        return li if li is None or li is UNKNOWN else li.moved(dim)
    res = p.broadcast(n, [a for a in p.tensor_args(n)])
    if res is None or res is UNKNOWN:
        return res
    if dim == res.dim:
        return UNKNOWN
    for a in p.tensor_args(n):
        la = p.lay(a)
        if la is not None and la != res:
            return UNKNOWN
    return res


def _scatter_into(p: _Propagator, n: fx.Node) -> Any:
    base, src = n.args[:2]
    lb, ls = p.lay(base), p.lay(src)
    if UNKNOWN in (lb, ls):
        return UNKNOWN
    ndim = len(shape_of(base))
    d = _norm_dim(n.args[2] if len(n.args) > 2 else 0, ndim)
    is_select = n.target.overloadpacket is aten.select_scatter
    if ls is not None:
        mapped = ls.moved(ls.dim + (1 if is_select and d <= ls.dim else 0))
        full_cover = not is_select and sympy.expand(shape_of(src)[d] - shape_of(base)[d]) == 0
        if (mapped.dim == d and not full_cover) or (lb is not None and lb != mapped):
            return UNKNOWN  # scattering into part of the batch dim would move samples around
        return mapped
    return UNKNOWN if lb.dim == d else lb


def _per_sample_op(p: _Propagator, n: fx.Node) -> Any:
    """Ops that act on each item of leading dims independently (attention kernels, dropout)."""
    res = None
    for a in p.tensor_args(n):
        la = p.lay(a)
        if la is None:
            continue
        if la is UNKNOWN or (res is not None and la != res):
            return UNKNOWN
        res = la
    val = n.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    outs = []
    for v in vals:
        if isinstance(v, torch.Tensor) and v.dim() > res.dim:
            outs.append(res)
        else:
            outs.append(None)
    return tuple(outs) if isinstance(val, (list, tuple)) else outs[0]


def _batched_matrices(p: _Propagator, n: fx.Node) -> Any:
    """Ops on the last two dims, batched over the leading ones (attention kernels and their
    backward, triangular solves): per sample when the batch sits in a leading dim of every
    per-sample operand. A batch-free one is the same for every sample: a learned query expanded
    over the batch (AIMv2's / V-JEPA 2's attention-pooling heads), a shared mask."""
    args = p.tensor_args(n)
    batched = [(a, p.lay(a)) for a in args if p.lay(a) is not None]
    if not batched or any(la is UNKNOWN or la.dim >= len(shape_of(a)) - 2 for a, la in batched):
        return UNKNOWN
    return _per_sample_op(p, n)


def _spatial(k: int) -> Any:
    """Pooling / upsampling over the last k dims: each item of the leading dims is independent."""

    def rule(p: _Propagator, n: fx.Node) -> Any:
        x = n.args[0]
        lx = p.lay(x)
        if lx is UNKNOWN or lx is None or lx.dim >= len(shape_of(x)) - k:
            return UNKNOWN
        return _per_sample_op(p, n)

    return rule


def _nll_forward(p: _Propagator, n: fx.Node) -> Any:
    x, target = n.args[:2]
    reduction = n.args[3] if len(n.args) > 3 else 1
    lx = p.lay(x)
    if lx is UNKNOWN or lx.dim != 0:
        return UNKNOWN
    if reduction == 0:
        return (lx, None)
    p.res.batch_reductions[n] = "loss"
    return (None, None)


def _nll_backward(p: _Propagator, n: fx.Node) -> Any:
    lx = p.lay(n.args[1])
    return lx if lx is not UNKNOWN and lx is not None and lx.dim == 0 else UNKNOWN


def _data_free(p: _Propagator, n: fx.Node) -> Any:
    """`*_like` creation ops read only the shape of their input: the result carries no sample data."""
    return None


def _pointwise_with_dim(p: _Propagator, n: fx.Node) -> Any:
    return p.broadcast(n, p.tensor_args(n))


def _along_dims(p: _Propagator, n: fx.Node) -> Any:
    """Scans and flips along given dims (cumsum, cumprod, logcumsumexp, cummax/cummin, flip, roll):
    per-sample unless a dim is the batch dim. RoBERTa's position ids are a cumsum over tokens."""
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    ndim = len(shape_of(n.args[0]))
    packet = n.target.overloadpacket
    if packet is aten.flip:
        dims = list(n.args[1])
    elif packet is aten.roll:
        dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dims", [])
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:
            return UNKNOWN  # roll of the flattened tensor moves elements across samples
    else:
        dims = [n.args[1]]
    if any(_norm_dim(d, ndim) == lx.dim for d in dims):
        return UNKNOWN
    if packet in (aten.cummax, aten.cummin):
        return (lx, lx)
    return lx


def _pad(p: _Propagator, n: fx.Node) -> Any:
    """constant_pad_nd (F.pad; Swin pads its windows): `pad` holds (before, after) pairs for the last
    dims, last dim first. Per-sample unless the batch dim gets padding."""
    lx = p.lay(n.args[0])
    if lx is UNKNOWN:
        return UNKNOWN
    pad, ndim = list(n.args[1]), len(shape_of(n.args[0]))
    for k in range(len(pad) // 2):
        if ndim - 1 - k == lx.dim and (pad[2 * k] != 0 or pad[2 * k + 1] != 0):
            return UNKNOWN
    return lx


def _strided_as(x: Any, sizes: Any, strides: Any, offset: Any) -> str | None:
    """How as_strided(x, sizes, strides, offset) relates to x: "same" (x itself, re-strided: same
    sizes and strides on every dim of size > 1), "reshape" (x contiguous, read whole in row-major
    order as `sizes`), or None (some other walk through the storage)."""
    if not isinstance(x, torch.Tensor) or offset not in (None, 0) or x.storage_offset() != 0:
        return None
    sizes, strides = [_arg_sym(v) for v in sizes], [_arg_sym(v) for v in strides]
    if len(sizes) != len(strides):
        return None
    in_sizes, in_strides = [to_sym(v) for v in x.shape], [to_sym(v) for v in x.stride()]

    def same_where_not_1(a: list[Any], b: list[Any]) -> bool:
        return all(size == 1 or sympy.expand(u - v) == 0 for size, u, v in zip(sizes, a, b))

    if len(sizes) == x.dim() and all(sympy.expand(a - b) == 0 for a, b in zip(sizes, in_sizes)):
        if same_where_not_1(strides, in_strides):
            return "same"
    row_major = [_prod(sizes[i + 1 :]) for i in range(len(sizes))]
    contiguous = all(
        size == 1 or sympy.expand(st - _prod(in_sizes[i + 1 :])) == 0
        for i, (size, st) in enumerate(zip(in_sizes, in_strides))
    )
    if contiguous and same_where_not_1(strides, row_major) and sympy.expand(_prod(sizes) - _prod(in_sizes)) == 0:
        return "reshape"
    return None


def _arg_sym(v: Any) -> Any:
    return to_sym(v.meta["val"]) if isinstance(v, fx.Node) else to_sym(v)


def _as_strided(p: _Propagator, n: fx.Node) -> Any:
    """as_strided / as_strided_scatter only where they re-stride a tensor in place of itself or read /
    write a contiguous one whole in row-major order, i.e. are a view / reshape in disguise (ATen's
    adaptive_avg_pool2d to 1x1 restores a channels-last input's strides so, and its backward
    scatters the gradient into a flat buffer; torchvision's Swin pools a permuted tensor). Any other
    walks the storage in an order no layout rule can follow."""
    scatter = n.target.overloadpacket is aten.as_strided_scatter
    x = n.args[0]
    sizes, strides = n.args[2:4] if scatter else n.args[1:3]
    offset_at = 4 if scatter else 3
    offset = n.args[offset_at] if len(n.args) > offset_at else n.kwargs.get("storage_offset")
    kind = _strided_as(x.meta.get("val"), sizes, strides, offset)
    if kind is None:
        return UNKNOWN
    if not scatter:
        lx = p.lay(x)
        return lx if kind == "same" or lx in (None, UNKNOWN) else reshape_layout(lx, shape_of(x), shape_of(n), p.batch)
    src, ls = n.args[1], p.lay(n.args[1])  # src is written over all of x: x's values do not matter
    if ls in (None, UNKNOWN):
        return ls
    return ls.moved(ls.dim) if kind == "same" else reshape_layout(ls, shape_of(src), shape_of(n), p.batch)


_RULES: dict[Any, Any] = {}


def _register(packets: list[Any], fn: Any) -> None:
    for pk in packets:
        if pk in _RULES:
            raise RuntimeError(f"duplicate layout rule for {pk}")
        _RULES[pk] = fn


_register(
    [
        aten.clone,
        aten.alias,
        aten.detach,
        aten._to_copy,
        aten.lift_fresh_copy,
        aten.contiguous,
        aten._conj,
        aten.lift_fresh,
    ],
    _same,
)
_register(
    [aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze, aten.flatten, aten.view_as],
    _reshape,
)
_register([aten.permute], _permute)
_register([aten.t, aten.transpose], _transpose)
_register([aten.expand], _expand)
_register([aten.repeat], _repeat)
_register([aten.select], _select)
_register([aten.slice], _slice)
_register([aten.cat], _cat)
_register([aten.constant_pad_nd], _pad)
_register([aten.as_strided, aten.as_strided_scatter], _as_strided)
# functional copy(self, src): src's values in self's shape (src broadcast), as the backward of the
# re-striding as_strided above writes them into a fresh buffer
_register([aten.copy], lambda p, n: p.broadcast(n, [n.args[0], n.args[1]]))
_register([aten.split, aten.split_with_sizes, aten.unbind, aten.chunk], _split)
_register(
    [
        aten.sum,
        aten.mean,
        aten.amax,
        aten.amin,
        aten.any,
        aten.all,
        aten.prod,
        aten.logsumexp,
        aten.argmax,
        aten.argmin,
    ],
    _reduce_dims,
)
_register([aten.var, aten.var_mean, aten.std], _var)
_register([aten.mm, aten.addmm], _mm)
_register([aten.bmm, aten.baddbmm], _bmm)
_register([aten.embedding], _embedding)
_register([aten.convolution], _convolution)
_register([aten.convolution_backward], _conv_backward)
_register([aten.embedding_dense_backward], _embedding_backward)
_register([aten.native_layer_norm], _layer_norm)
_register([aten.native_group_norm], _group_norm)
_register([aten.native_layer_norm_backward], _layer_norm_backward)
_register([aten.native_group_norm_backward], _group_norm_backward)
_register(
    [
        aten._native_batch_norm_legit_functional,
        aten.native_batch_norm,
        aten._native_batch_norm_legit,
        aten._native_batch_norm_legit_no_training,
    ],
    _batch_norm,
)
_register([aten.native_batch_norm_backward], _batch_norm_backward)
_register(
    [aten._softmax, aten._log_softmax, aten._softmax_backward_data, aten._log_softmax_backward_data],
    _softmax,
)
_register([aten.gather, aten.scatter, aten.scatter_add, aten.index_select, aten.index_add], _index_along)
_register([aten.slice_scatter, aten.select_scatter], _scatter_into)
_register(
    [
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_cudnn_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_cudnn_attention_backward,
        aten.linalg_solve_triangular,
    ],
    _batched_matrices,
)
_register([aten.native_dropout], _per_sample_op)
_register(
    [
        aten.max_pool2d_with_indices,
        aten.max_pool2d_with_indices_backward,
        aten.avg_pool2d,
        aten.avg_pool2d_backward,
        aten._adaptive_avg_pool2d,
        aten._adaptive_avg_pool2d_backward,
        aten.adaptive_max_pool2d,
        aten.adaptive_max_pool2d_backward,
        aten.upsample_nearest2d,
        aten.upsample_bilinear2d,
        aten.reflection_pad2d,
        aten.replication_pad2d,
    ],
    _spatial(2),
)
_register(
    [
        aten.max_pool3d_with_indices,
        aten.max_pool3d_with_indices_backward,
        aten.avg_pool3d,
        aten.avg_pool3d_backward,
        aten._adaptive_avg_pool3d,
        aten._adaptive_avg_pool3d_backward,
        aten.adaptive_max_pool3d,
        aten.adaptive_max_pool3d_backward,
    ],
    _spatial(3),
)
_register([aten.reflection_pad1d, aten.replication_pad1d, aten.upsample_nearest1d], _spatial(1))
_register([aten.nll_loss_forward], _nll_forward)
_register([aten.nll_loss_backward], _nll_backward)
_register(
    [
        aten.full_like,
        aten.zeros_like,
        aten.ones_like,
        aten.empty_like,
        aten.rand_like,
        aten.randn_like,
        aten.new_zeros,
        aten.new_ones,
        aten.new_empty,
        aten.new_empty_strided,
        aten.new_full,
        aten.sym_size,
        aten.sym_numel,
        aten.sym_stride,
    ],
    _data_free,
)
_register([aten.where, aten.masked_fill, aten.clamp, aten.native_dropout_backward], _pointwise_with_dim)
_register([aten.cumsum, aten.cumprod, aten.logcumsumexp, aten.cummax, aten.cummin, aten.flip, aten.roll], _along_dims)


# advanced indexing (x[idx], index_put), ops along one dim (sort, topk, norms, unfold, FFT) and
# nn.EmbeddingBag: rules in their own modules
for _packet, _rule in {**_INDEXING_RULES, **_SELECTION_RULES, **_BAG_RULES}.items():
    _register([_packet], _rule)


def analyze_layouts(
    gm: fx.GraphModule, batch: Any, seeds: dict[str, Any], checked_rows: Mapping[Any, Any] | None = None
) -> LayoutResult:
    """Propagate batch layouts from `seeds` (placeholder name -> layout) through `gm`.
    `checked_rows`: the forward's accepted boolean-mask selections (`accepted_row_counts`) for a
    backward graph; None for a forward graph, whose accepted selections are then to be checked."""
    if checked_rows is not None:
        return _Propagator(gm, batch, seeds, checked_rows).run()
    # A forward graph: read the row counts of the selections the rules accept as B·c, and only those
    # (a refused one's count must not make anything downstream look per sample): drop the refused
    # ones until none is left (each round can only refuse more).
    propagator = _Propagator(gm, batch, seeds, forward=True)
    while True:
        result = propagator.run()
        accepted = accepted_row_counts(result, batch)
        if accepted.keys() == {rows for _, rows in propagator.masked.values()}:
            return result
        propagator = _Propagator(gm, batch, seeds, accepted, forward=True)


def accepted_row_counts(result: LayoutResult, batch: Any) -> dict[Any, Any]:
    """{unbacked row count of an accepted x[mask] selection: its per-sample count symbol}."""
    return {rows: sympy.simplify(result.row_counts[rows] / batch) for _, rows in result.masked_rows.values()}


def numel_sym(shape: list[Any]) -> Any:
    return _prod(shape)


__all__ = [
    "BatchLayout",
    "LayoutResult",
    "UNKNOWN",
    "analyze_layouts",
    "reshape_layout",
    "shape_of",
    "to_sym",
]
