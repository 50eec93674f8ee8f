"""Fold out the tangents of inputs mutated where autograd cannot see it.

A forward that changes a parameter in place through `.data` or under `torch.no_grad()` (Gemma-3n's
AltUp clamps `prediction_coefs.weight.data` on every training step) becomes, after AOTAutograd's
functionalization, a forward that returns the parameter's new value, and a backward that takes a
tangent for that value and adds it to the parameter's gradient. At run time AOTAutograd copies the
new value into the parameter out of autograd's sight, so nothing ever flows into that tangent: it is
zero. Left in, it reads as a batch-free term of the gradient and the parameter is refused. This pass
replaces `tangent + g` by `g` (and views or scalings of the tangent by nothing); any other use is
left alone, so the analysis still refuses what it cannot prove.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# ops through which a zero input stays zero (views, copies and scalings by a constant)
_ZERO_PRESERVING = {
    aten.t,
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.permute,
    aten.transpose,
    aten.expand,
    aten.clone,
    aten.detach,
    aten.alias,
    aten.neg,
    aten._to_copy,
    aten.unsqueeze,
    aten.squeeze,
}


def fold_zero_tangents(gm: fx.GraphModule, zero_tangents: set[str]) -> bool:
    """Drop the uses of the placeholders named in `zero_tangents` that add a zero; True if any."""
    zero = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in zero_tangents}
    if not zero:
        return False
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not any(a in zero for a in node.all_input_nodes):
            continue
        packet = getattr(node.target, "overloadpacket", None)
        if packet in _ZERO_PRESERVING and node.args and node.args[0] in zero:
            zero.add(node)
        elif packet is aten.mul and len(node.args) == 2 and not _other_is_nonfinite(node, zero):
            zero.add(node)
        elif packet in (aten.add, aten.sub) and node.target._overloadname == "Tensor":
            kept = _kept_operand(node, zero)
            if kept is not None:
                node.replace_all_uses_with(kept)
                changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _kept_operand(node: fx.Node, zero: set[fx.Node]) -> fx.Node | None:
    """The operand `node` equals when its other operand is zero, if it has the node's shape and dtype."""
    a, b = node.args[:2]
    if b in zero:
        kept = a
    elif a in zero and node.target.overloadpacket is aten.add and node.kwargs.get("alpha", 1) == 1:
        kept = b
    else:
        return None
    if not isinstance(kept, fx.Node) or kept in zero:
        return None
    val, kept_val = node.meta.get("val"), kept.meta.get("val")
    if val is None or kept_val is None or val.shape != kept_val.shape or val.dtype != kept_val.dtype:
        return None
    return kept


def _other_is_nonfinite(node: fx.Node, zero: set[fx.Node]) -> bool:
    """0·x is zero only for a finite x: a tensor operand cannot be proved finite, a number can."""
    other = node.args[1] if node.args[0] in zero else node.args[0]
    if isinstance(other, fx.Node):
        return True
    return not isinstance(other, (int, float)) or other != other or abs(other) == float("inf")
