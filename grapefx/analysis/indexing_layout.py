"""Batch layouts through advanced indexing: `index.Tensor` (x[idx]) and its backward `index_put`.

Four forms are per-sample, everything else stays UNKNOWN (refused):

- the batch dim is not indexed and every index tensor is batch-free: a constant gather along other
  dims (Falcon's `qkv[..., [-2], :]`);
- the batch dim is indexed by `arange(B)` and every batched index tensor lines up with it in the
  broadcast: `h[arange(B), last_token]`, the pooling of transformers' decoder
  `*ForSequenceClassification` and CLIP. Output row j then reads sample j only;
- batch-free data (a parameter used as a lookup table) indexed by per-sample ids: `table[ids]`.
  Its backward sums every sample's rows into the table, a grad site (rules/gather.py).
- a boolean mask over x's leading dims, the batch leading both: x[mask] (BART's EOS pooling,
  `h[ids == eos].view(B, -1, d)`). Its rows [n, ...] come sample by sample; they are per sample only
  if every sample selects the same number c of them, so n = B·c and sample i owns rows i·c..i·c+c-1.
  A run-time check enforces that (passes/equal_count_checks.py); the layout is dim 0 with inner c,
  c a symbol standing for n // B (layout_types.equal_count_rows).

`arange(B)` is batch-free (it has no sample data), so it is tracked as a *batch index*: the nodes
whose values are 0..B-1 along one dim, recorded with that dim's position counted from the right (the
broadcast aligns index tensors from the right). Saved for the backward, it is carried in the seeds as
a `BatchIndex` seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from grapefx.analysis.layout_types import UNKNOWN, BatchLayout, shape_of, to_sym
from grapefx.passes import masked_rows_op  # noqa: F401 - registers grapefx::pad_masked_rows

aten = torch.ops.aten


@dataclass(frozen=True)
class BatchIndex:
    """Seed value for a saved batch index (a batch-free tensor whose values are 0..B-1 along the
    dim at `position`, counted from the right)."""

    position: int


_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_KEEP_VALUES = (aten._to_copy, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy)
_RESHAPES = (aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze)


def batch_index_position(node: fx.Node, batch: Any, known: dict[fx.Node, int]) -> int | None:
    """For a batch-free node whose values are 0..B-1 along one dim and that has size 1 elsewhere:
    that dim's position counted from the right; else None."""
    t = node.target
    if t in _ARANGES:
        args = list(node.args)
        start, end, step = (0, args[0], 1) if t is aten.arange.default else (args + [1])[:3]
        end = end.meta.get("val") if isinstance(end, fx.Node) else end  # a SymInt input of the graph
        if isinstance(end, (int, torch.SymInt)) and start == 0 and step == 1 and sympy.expand(to_sym(end) - batch) == 0:
            return 0
        return None
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if src not in known:
        return None
    packet = getattr(t, "overloadpacket", None)
    if packet in _KEEP_VALUES:
        return known[src]
    if packet in _RESHAPES:
        shape = shape_of(node)
        big = [i for i, s in enumerate(shape) if s != 1]
        if len(big) == 1 and sympy.expand(shape[big[0]] - batch) == 0:
            return len(shape) - 1 - big[0]
    return None


def _is_mask(t: Any) -> bool:
    return getattr(getattr(t, "meta", {}).get("val"), "dtype", None) == torch.bool


def masked_selections(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, Any]]:
    """{x[mask] or index_put(x, [mask], v) node: (mask, the unbacked row count n)} for every
    selection by one boolean mask whose row count is a size only the data fixes."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) not in _SELECTIONS:
            continue
        indices = list(node.args[1])
        if len(indices) != 1 or not _is_mask(indices[0]):
            continue
        rows_of = node if node.target.overloadpacket in (aten.index, aten._unsafe_index) else node.args[2]
        val = rows_of.meta.get("val") if isinstance(rows_of, fx.Node) else None
        n = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() else None
        if isinstance(n, torch.SymInt) and free_unbacked_symbols(n):
            expr = sympy.sympify(n.node.expr)
            if isinstance(expr, sympy.Symbol):
                out[node] = (indices[0], expr)
    return out


_SELECTIONS = (aten.index, aten._unsafe_index, aten.index_put, aten._unsafe_index_put)


def masks_by_row_count(gm: fx.GraphModule) -> dict[Any, fx.Node]:
    """{unbacked row count: the one mask whose selections have it}; a count torch proved equal for
    two masks (rows of both combined) names neither."""
    found: dict[Any, set[fx.Node]] = {}
    for mask, rows in masked_selections(gm).values():
        found.setdefault(rows, set()).add(mask)
    return {rows: next(iter(masks)) for rows, masks in found.items() if len(masks) == 1}


def _leading_batch(lay: Any) -> bool:
    """The batch leads dim 0, each sample's part of it a static count: [B, ...] or flattened [B·T, ...]."""
    return isinstance(lay, BatchLayout) and lay.dim == 0 and lay.outer == 1 and sympy.sympify(lay.inner).is_Integer


def _masked_layout(p: Any, node: fx.Node, x_lay: Any, x_shape: list[Any], mask: fx.Node, rows: Any) -> Any:
    """x[mask] (rows `rows`, read through the equal-count substitution as B·c) when the batch leads
    dim 0 of x and of the mask alike ([B, T] masks, or flattened [B·T] ones) and the mask covers x's
    leading dims: the rows are sample-major, dim 0 with inner c."""
    m_shape = shape_of(mask)
    if not _leading_batch(x_lay) or p.lay(mask) != x_lay or node not in p.masked or len(m_shape) > len(x_shape):
        return UNKNOWN
    if any(sympy.expand(a - b) != 0 for a, b in zip(m_shape, x_shape)):
        return UNKNOWN
    per_sample = sympy.simplify(rows / p.batch)
    batch_symbols = getattr(p.batch, "free_symbols", set())
    if per_sample.free_symbols & batch_symbols or not (per_sample.is_integer and per_sample.is_positive):
        return UNKNOWN  # the row count was not read as B·c: not a checked selection
    p.res.masked_rows[node] = p.masked[node]
    return BatchLayout(0, sympy.Integer(1), per_sample)


def _indexed_layout(p: Any, x_lay: Any, x_rank: int, indices: list[Any]) -> Any:
    """Layout of x[indices] for x with layout `x_lay` (None: batch-free), given the layouts of the
    index tensors; UNKNOWN where samples could mix."""
    adv = [i for i, t in enumerate(indices) if t is not None]
    tensors = [indices[i] for i in adv]
    if not adv or any(not isinstance(t, fx.Node) for t in tensors):
        return UNKNOWN
    if any(_is_mask(t) for t in tensors):
        return UNKNOWN  # a boolean mask other than the one `_masked_layout` accepts
    rank_b = max(len(shape_of(t)) for t in tensors)
    contiguous = adv == list(range(adv[0], adv[-1] + 1))
    first = adv[0] if contiguous else 0  # where the broadcast dims land in the output
    batched = [t for t in tensors if p.lay(t) is not None]
    if any(p.lay(t) is UNKNOWN for t in tensors) or x_lay is UNKNOWN:
        return UNKNOWN

    if x_lay is not None and x_lay.dim not in adv:  # a gather along other dims
        if batched:
            return UNKNOWN  # per-sample indices into every sample's data mix samples
        j = x_lay.dim - sum(1 for a in adv if a < x_lay.dim)
        out = j if contiguous and x_lay.dim < adv[0] else j + rank_b
        return x_lay.moved(out)

    if x_lay is None:  # per-sample indices into batch-free data: a lookup table (param[ids])
        return _gathered_layout(p, batched, first + rank_b)
    if not x_lay.plain:
        return UNKNOWN  # the batch shares its dim with other factors
    r = p.batch_index.get(indices[x_lay.dim])
    if r is None:
        return UNKNOWN  # the batch dim is indexed by something other than arange(B)
    for t in batched:
        lt = p.lay(t)
        if not lt.plain or len(shape_of(t)) - 1 - lt.dim != r:
            return UNKNOWN  # index row j must come from sample j
    return BatchLayout(first + rank_b - 1 - r, sympy.Integer(1), sympy.Integer(1))


def _gathered_layout(p: Any, batched: list[fx.Node], end: int) -> Any:
    """x[idx] for a batch-free x: per-sample when every batched index tensor has the same layout at
    the same place in the broadcast (element j then reads the table at sample j's ids only)."""
    if not batched:  # batch-free ids into batch-free data
        return None
    lays = {p.lay(t) for t in batched}
    from_right = {len(shape_of(t)) - p.lay(t).dim for t in batched}
    if len(lays) != 1 or len(from_right) != 1:
        return UNKNOWN
    return lays.pop().moved(end - from_right.pop())


def index_rule(p: Any, n: fx.Node) -> Any:
    x, indices = n.args[0], list(n.args[1])
    if len(indices) == 1 and _is_mask(indices[0]):
        return _masked_layout(p, n, p.lay(x), shape_of(x), indices[0], shape_of(n)[0])
    return _indexed_layout(p, p.lay(x), len(shape_of(x)), indices)


def _masked_put_rule(p: Any, n: fx.Node) -> Any:
    """index_put(base, [mask], values): the backward of x[mask] (values laid out as x[mask]'s rows,
    base the zeros it scatters into) or a masked write; per sample where x[mask] would be."""
    base, mask, values = n.args[0], n.args[1][0], n.args[2]
    lb, lv, lm = p.lay(base), p.lay(values), p.lay(mask)
    base_shape, v_shape = shape_of(base), shape_of(values)
    if lb is None and _leading_batch(lm) and base_shape and sympy.expand(base_shape[0] - p.batch * lm.inner) == 0:
        lb = lm  # zeros shaped like x: the batch sits where the mask puts it
    if not _leading_batch(lb) or lm != lb:
        return UNKNOWN
    if lv is None:  # batch-free values written where each sample's own mask says
        return lb
    if len(v_shape) != len(base_shape) - len(shape_of(mask)) + 1:
        return UNKNOWN
    want = _masked_layout(p, n, lb, base_shape, mask, v_shape[0])
    return lb if want is not UNKNOWN and lv == want else UNKNOWN


def index_put_rule(p: Any, n: fx.Node) -> Any:
    """index_put(base, indices, values, accumulate): values written at base[indices]. Per-sample
    when base's batch dim (given, or found from where values land) maps onto values' batch dim."""
    base, indices, values = n.args[0], list(n.args[1]), n.args[2]
    lb, lv = p.lay(base), p.lay(values)
    if UNKNOWN in (lb, lv):
        return UNKNOWN
    if len(indices) == 1 and _is_mask(indices[0]):
        return _masked_put_rule(p, n)
    rank = len(shape_of(base))
    candidates = [lb] if lb is not None else _base_layouts(p, n, indices, lv, rank)
    if not candidates and lv is not None:
        return _scatter_into_table(p, n, indices, lv, rank)
    fits = []
    for out in candidates:
        want = _indexed_layout(p, out, rank, indices)
        if want is UNKNOWN or want is None:
            continue
        if lv is None:
            fits.append(out)
            continue
        # values broadcast (from the right) to the shape of base[indices]
        at = lv.dim + _indexed_rank(rank, indices) - len(shape_of(values))
        if lv.moved(at) == want:
            fits.append(out)
    return fits[0] if len(fits) == 1 else UNKNOWN  # none, or ambiguous: refuse rather than guess


def _scatter_into_table(p: Any, n: fx.Node, indices: list[Any], lv: Any, rank: int) -> Any:
    """The backward of a lookup table (param[ids]): every sample's rows summed into zeros shaped like
    the table. A grad site (kind "index_put", rules/gather.py) when the sum is exact: accumulate on,
    zeros underneath, values laid out as the gather's output. The indices must index the leading
    dims (table[ids], table[ids, j]): the rule prepends arange(B), which must stay next to them."""
    base, values = n.args[0], n.args[2]
    accumulate = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
    leading = all(t is not None for t in indices)
    want = _indexed_layout(p, None, rank, indices)
    if want is None and lv.dim == 0 and lv.plain and len(shape_of(values)) == _indexed_rank(rank, indices):
        # ids shared by every sample, expanded to the batch (Whisper's positions: arange(T) repeated
        # B times): each sample's rows are written where its own row of ids says
        want = lv
    if not accumulate or not leading or not _is_zeros(base) or not isinstance(want, BatchLayout):
        return UNKNOWN
    if lv.moved(lv.dim + _indexed_rank(rank, indices) - len(shape_of(values))) != want:
        return UNKNOWN
    p.res.batch_reductions[n] = "index_put"
    return None


def _is_zeros(node: Any) -> bool:
    packet = getattr(getattr(node, "target", None), "overloadpacket", None)
    if packet in (aten.full, aten.new_full, aten.full_like):
        return node.args[1] == 0
    return packet in (aten.zeros, aten.new_zeros, aten.zeros_like)


def _indexed_rank(rank: int, indices: list[Any]) -> int:
    tensors = [t for t in indices if t is not None]
    return rank - len(tensors) + max(len(shape_of(t)) for t in tensors)


def _base_layouts(p: Any, n: fx.Node, indices: list[Any], lv: Any, rank: int) -> list[Any]:
    """Where the batch may sit in a batch-free base (the zeros a backward scatters into)."""
    if lv is None:
        return []
    shape = shape_of(n.args[0])
    out = []
    for d in range(rank):
        if d < len(indices) and indices[d] is not None:
            if p.batch_index.get(indices[d]) is not None and sympy.expand(shape[d] - p.batch) == 0:
                out.append(BatchLayout(d, sympy.Integer(1), sympy.Integer(1)))
        elif sympy.expand(shape[d] - lv.outer * p.batch * lv.inner) == 0:
            out.append(BatchLayout(d, lv.outer, lv.inner))
    return out


def _pad_masked_rows_rule(p: Any, n: fx.Node) -> Any:
    """grapefx::pad_masked_rows(rows, mask, dim, group): x[mask]'s rows back in the mask's
    positions, the mask's dims flattened into `dim` (passes/pad_masked_rows.py). Per sample,
    whatever each sample's row count, when `rows` were selected by this very mask (each row
    flattened into `group` entries along `dim`: `group` times the mask's per-sample count there)."""
    rows, mask, dim, group = n.args
    lr, lm = p.lay(rows), p.lay(mask)
    if not _leading_batch(lm) or not isinstance(lr, BatchLayout) or lr.dim != dim or lr.outer != 1:
        return UNKNOWN
    count = p.res.mask_counts.get(mask)
    if count is None or sympy.expand(lr.inner - group * count) != 0:
        return UNKNOWN
    return BatchLayout(dim, sympy.Integer(1), sympy.simplify(group * sympy.Mul(*shape_of(mask)) / p.batch))


RULES = {
    torch.ops.grapefx.pad_masked_rows: _pad_masked_rows_rule,
    aten.index: index_rule,
    aten._unsafe_index: index_rule,
    aten.index_put: index_put_rule,
    aten._unsafe_index_put: index_put_rule,
}
