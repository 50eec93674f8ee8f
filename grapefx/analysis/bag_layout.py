"""Batch layouts of nn.EmbeddingBag (`_embedding_bag` and its backward) on 2-D ids.

F.embedding_bag on ids [B, L] flattens them and passes offsets arange(0, B·L, L): bag b is sample
b's row. Other offsets (1-D ids with the user's offsets) could put tokens of several samples in one
bag, so only this form is per-sample. The offsets are batch-free; like arange(B) (indexing_layout)
they are recognized where they are made and carried to the backward as a `BagOffsets` seed.
Modes sum and mean; max, per-sample weights and scale_grad_by_freq stay UNKNOWN (refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout_types import UNKNOWN, BatchLayout, shape_of, to_sym

aten = torch.ops.aten
ONE = sympy.Integer(1)


@dataclass(frozen=True)
class BagOffsets:
    """Seed value for saved offsets arange(0, B·L, L): bags of `length` consecutive ids."""

    length: int


def bag_length(node: fx.Node, batch: Any) -> int | None:
    """L when `node` is arange(0, B·L, L), else None."""
    if node.target is not aten.arange.start_step:
        return None
    start, end, step = (list(node.args) + [1])[:3]  # step defaults to 1
    end = end.meta.get("val") if isinstance(end, fx.Node) else end
    if start != 0 or not isinstance(step, int) or step < 1 or not isinstance(end, (int, torch.SymInt)):
        return None
    return step if sympy.expand(to_sym(end) - batch * step) == 0 else None


def _arg(n: fx.Node, pos: int, default: Any) -> Any:
    return n.args[pos] if len(n.args) > pos else default


def _per_sample_bags(p: Any, indices: Any, offsets: Any) -> bool:
    length = p.bag_offsets.get(offsets)
    return length is not None and p.lay(indices) == BatchLayout(0, ONE, sympy.Integer(length))


def embedding_bag(p: Any, n: fx.Node) -> Any:
    """_embedding_bag(weight, ids, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
    include_last_offset, padding_idx) -> (out [B, d], offset2bag, bag_size, max_indices)."""
    weight, indices, offsets = n.args[:3]
    plain = BatchLayout(0, ONE, ONE)
    if (
        p.lay(weight) is not None
        or not _per_sample_bags(p, indices, offsets)
        or _arg(n, 3, False)  # scale_grad_by_freq counts ids over the whole batch
        or _arg(n, 4, 0) not in (0, 1)
        or _arg(n, 6, None) is not None
        or _arg(n, 7, False)
    ):
        return UNKNOWN
    outs = []
    for v in n.meta["val"]:
        if v.dim() > 0 and sympy.expand(to_sym(v.shape[0]) - shape_of(indices)[0]) == 0:
            outs.append(p.lay(indices))  # offset2bag: one entry per id
        elif v.dim() > 0 and sympy.expand(to_sym(v.shape[0]) - p.batch) == 0:
            outs.append(plain)
        else:
            outs.append(None)
    return tuple(outs)


def embedding_bag_backward(p: Any, n: fx.Node) -> Any:
    """_embedding_bag_backward(grad, ids, offsets, offset2bag, bag_size, max_indices, num_weights,
    scale_grad_by_freq, mode, sparse, per_sample_weights, padding_idx): sums over all bags, a grad site."""
    grad, indices, offsets = n.args[:3]
    if (
        p.lay(grad) != BatchLayout(0, ONE, ONE)
        or not _per_sample_bags(p, indices, offsets)
        or n.args[7]
        or n.args[8] not in (0, 1)
        or n.args[9]
        or _arg(n, 10, None) is not None
    ):
        return UNKNOWN
    p.res.batch_reductions[n] = "embedding_bag"
    return None


RULES = {aten._embedding_bag: embedding_bag, aten._embedding_bag_backward: embedding_bag_backward}
