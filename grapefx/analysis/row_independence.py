"""Which boolean-mask selections x[mask] are used row by row only, so that no sample count matters.

The layout analysis reads the N rows of x[mask] as B blocks of c rows (indexing_layout.py), which
holds only when every sample selects the same number of rows; the forward checks that at run time
(passes/equal_count_checks.py). Many uses never look at the blocks, though: a masked-token loss,
`F.cross_entropy(logits[mask], labels[mask], reduction="sum")`, computes one term per row and sums
them all. Each row belongs to one sample, so such a use is per sample whatever the counts are, and
the check would refuse batches that are fine (samples with different numbers of masked tokens).

A selection is row-wise when everything computed from its rows, up to where they leave the rows
dim, is
- an op that works on each row alone: pointwise ops, views / permutes that keep the rows dim whole
  or flatten each row into consecutive entries of it ([N, T, d] -> [N·T, d], a Linear's input),
  softmax / gather / reductions along other dims, a matmul with a batch-free right operand, a
  layer norm, dropout or embedding lookup of each row;
- a float `sum` over all rows (the loss; check_forward verifies it is linear up to the output);
- the scatter back through the same mask (index_put), a size read only as a shape or by torch's
  own assertions, or a tensor saved for the backward (grad sites over rows read them put back
  in their [B·T] places: passes/pad_masked_rows.py);
and no op combines rows of selections made with different masks. A mask over the batch dim alone
(samples routed to per-task layers, `a[task == k] = adapter_k(h[task == k])`) is the case T = 1.
A mean over rows, a count of rows, a view that splits them into samples, rows returned to the
caller or anything else keeps the run-time check.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout_types import BatchLayout

aten = torch.ops.aten

# ops whose output row j reads only input row j when the layout rules keep the rows dim whole
_ROW_BY_ROW = {
    aten.clone,
    aten._to_copy,
    aten.alias,
    aten.detach,
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.unsqueeze,
    aten.squeeze,
    aten.slice,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.expand,
    aten._log_softmax,
    aten._softmax,
    aten.gather,
    aten.where,
    aten.masked_fill,
    aten.clamp,
    aten.sum,
    aten.amax,
    aten.amin,
    aten.mean,
    aten.mm,
    aten.addmm,
    aten.embedding,
}
# ops with several outputs that each keep the rows (a layer norm's output, mean and rstd; the parts of
# a split along another dim, e.g. a gated MLP's gate and up halves)
_ROW_BY_ROW_TUPLES = {aten.native_layer_norm, aten.native_dropout, aten.split, aten.split_with_sizes}
_SPLITS = (aten.split, aten.split_with_sizes)
_SUMS = (aten.sum.dim_IntList, aten.sum.default)
_COMPARISONS = (operator.ge, operator.gt, operator.le, operator.lt, operator.eq, operator.ne)
# not creation ops (zeros / full of the rows' length): their cumsum would number the rows across samples
_SHAPE_TAKERS = {aten.view, aten._unsafe_view, aten.reshape, aten.expand}
_ASSERTS = {aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}


class RowUses(NamedTuple):
    rowwise: set[fx.Node]  # used row by row only: no equal-count check
    returned: set[fx.Node]  # row by row in the graph, but returned to the caller: checked (loss unseen)


def rowwise_selections(
    gm: fx.GraphModule,
    layouts: dict[fx.Node, Any],
    masked_rows: dict[fx.Node, tuple[fx.Node, Any]],
    batch_reductions: dict[fx.Node, str],
    user_outputs: set[fx.Node],
) -> RowUses:
    """The nodes of `masked_rows` (x[mask] selections and index_put writes of their rows; the forward
    layout analysis) whose rows are used row by row only: they need no equal-count check.
    `user_outputs`: the forward outputs the caller sees. Rows returned to it keep the check: the
    loss it computes from them (a mean over all rows?) is out of sight."""
    selections = {n for n in masked_rows if n.target in (aten.index.Tensor, aten._unsafe_index.Tensor)}
    origin: dict[fx.Node, frozenset[fx.Node]] = {s: frozenset([s]) for s in selections}
    bad: set[fx.Node] = set()
    returned: set[fx.Node] = set()
    writes: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in selections or node.op != "call_function" and node.op != "output":
            continue
        row_inputs = [a for a in node.all_input_nodes if a in origin]
        if not row_inputs:
            continue
        if node.op == "output":  # rows saved for the backward end there, each selection on its own
            returned |= frozenset().union(*(origin[a] for a in row_inputs if a in user_outputs))
            continue
        sels = frozenset().union(*(origin[a] for a in row_inputs))
        masks = {masked_rows[s][0] for s in sels}
        if len(masks) != 1:
            bad |= sels
            continue
        unit = layouts[next(iter(sels))].inner  # the selection's rows: one sample's count of them
        verdict = _use(node, row_inputs, layouts, batch_reductions, next(iter(masks)), unit)
        if verdict is None:
            bad |= sels
        elif verdict == "rows":
            origin[node] = sels
        elif verdict == "write":
            writes[node] = sels
    good = selections - bad - returned
    rowwise = good | {w for w, sels in writes.items() if w in masked_rows and sels <= good}
    return RowUses(rowwise, returned - bad)


def _use(
    node: fx.Node,
    row_inputs: list[fx.Node],
    layouts: dict[fx.Node, Any],
    reductions: dict[fx.Node, str],
    mask: fx.Node,
    unit: Any,
) -> str | None:
    """How `node` uses rows: "rows" (its output is rows again), "end" (they stop here, row-wise),
    "write" (index_put back through `mask`), or None (a use that needs equal counts)."""
    target = node.target
    if target is aten.sym_size.int:  # the rows' count: a shape, never a number in the loss
        return "end" if _only_asserted(node) else None
    if target is operator.getitem:  # an output of a row-by-row op with several, checked there (below)
        return "rows" if isinstance(layouts.get(node), BatchLayout) else None
    packet = getattr(target, "overloadpacket", None)
    if packet in _ROW_BY_ROW_TUPLES:
        outs = layouts.get(node)
        ref = layouts.get(row_inputs[0])
        if not isinstance(outs, tuple) or not isinstance(ref, BatchLayout):
            return None
        if packet in _SPLITS and _split_dim(node) == ref.dim:
            return None  # a split of the rows dim regroups rows
        return "rows" if all(o is None or _keeps_rows(o, ref, row_inputs, layouts, unit) for o in outs) else None
    if packet is aten.index_put:
        indices, values = node.args[1], node.args[2]
        same = len(indices) == 1 and indices[0] is mask and values in row_inputs and node.args[0] not in row_inputs
        return "write" if same else None
    if node in reductions:  # over the rows: only a float sum of them all (the loss) is row-wise
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        floating = isinstance(val, torch.Tensor) and val.is_floating_point()
        return "end" if target in _SUMS and floating and layouts.get(node) is None else None
    if packet is None or not (packet in _ROW_BY_ROW or torch.Tag.pointwise in target.tags):
        return None
    if packet in (aten.mm, aten.addmm) and node.args[-1] in row_inputs:
        return None  # rows as the contraction's right operand: a product over rows
    return "rows" if _keeps_rows(layouts.get(node), layouts.get(row_inputs[0]), row_inputs, layouts, unit) else None


def _split_dim(node: fx.Node) -> int:
    rank = len(node.args[0].meta["val"].shape)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return dim % rank


def _keeps_rows(out: Any, ref: Any, row_inputs: list[fx.Node], layouts: dict[fx.Node, Any], unit: Any) -> bool:
    """Output layout `out` holds whole rows of the selection (`unit`: their count per sample), each
    row possibly flattened into k consecutive entries of its dim ([N, T, d] viewed as [N·T, d]:
    entry j reads row j // k alone), and every row input agrees with input layout `ref`."""
    if not (isinstance(out, BatchLayout) and isinstance(ref, BatchLayout)):
        return False
    k = sympy.simplify(out.inner / unit)
    keeps_rows = sympy.expand(out.outer - 1) == 0 and k.is_Integer and k > 0
    return keeps_rows and all(_same_rows(layouts.get(a), ref) for a in row_inputs)


def _same_rows(lay: Any, ref: BatchLayout) -> bool:
    return isinstance(lay, BatchLayout) and lay.outer == ref.outer and lay.inner == ref.inner


def _only_asserted(size: fx.Node) -> bool:
    """A size read only as a shape (a view of the rows, also times a static dim), by torch's own
    range assertions (u0 >= 0), or saved for the backward: not as a number that enters the loss."""
    for user in size.users:
        if user.op == "output":
            continue
        if user.target is operator.mul and any(isinstance(a, int) for a in user.args) and _only_asserted(user):
            continue  # the size of rows flattened with a static dim, [N·T, d], read the same ways
        if user.target in _COMPARISONS and all(u.target in _ASSERTS for u in user.users):
            continue
        packet = getattr(user.target, "overloadpacket", None)
        in_shape = any(isinstance(a, (list, tuple)) and size in a for a in user.args)
        if packet in _SHAPE_TAKERS and in_shape and size not in user.args:
            continue
        return False
    return True
