"""Fold out the tangents that are zero: of inputs mutated where autograd cannot see it, and of
batch-free outputs nothing differentiates.

A forward that changes a parameter in place through `.data` or under `torch.no_grad()` (Gemma-3n's
AltUp clamps `prediction_coefs.weight.data` on every training step) becomes, after AOTAutograd's
functionalization, a forward that returns the parameter's new value, and a backward that takes a
tangent for that value and adds it to the parameter's gradient. At run time AOTAutograd copies the
new value into the parameter out of autograd's sight, so nothing ever flows into that tangent: it is
zero. Left in, it reads as a batch-free term of the gradient and the parameter is refused. This pass
replaces `tangent + g` by `g` (and views or scalings of the tangent by nothing); any other use is
left alone, so the analysis still refuses what it cannot prove.

A batch-free forward output computed from parameters alone that nothing should differentiate (the
weight the deprecated `torch.nn.utils.weight_norm` / `spectral_norm` hooks store on their module)
gets the same fold where its tangent adds straight into a gradient of its own shape, but its zero is
not proved: the backward checks it on every step (`checking_zero_tangents`) and raises if the user
differentiated that tensor after all (a regularizer on it outside the model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from grapefx.errors import UnsupportedOpError

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


def fold_zero_tangents(
    gm: fx.GraphModule, zero_tangents: set[str], checked_tangents: set[str] = frozenset()
) -> set[str]:
    """Drop the uses of the placeholders named in `zero_tangents` that add a zero. Those named in
    `checked_tangents` (batch-free tangents of outputs nothing may differentiate, to be checked zero
    at run time) too, where they add to a gradient of their own shape, never through an expand
    (that adds a term to every sample's rows, e.g. the loss gradient of `h.sum()`). Returns the
    checked tangents that were dropped somewhere: the caller must check them at run time."""
    root = {
        n: n.name
        for n in gm.graph.nodes
        if n.op == "placeholder" and (n.name in zero_tangents or n.name in checked_tangents)
    }
    folded: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not any(a in root for a in node.all_input_nodes):
            continue
        packet = getattr(node.target, "overloadpacket", None)
        first = node.args[0] if node.args else None
        if packet in _ZERO_PRESERVING and first in root:
            if packet is not aten.expand or root[first] in zero_tangents:
                root[node] = root[first]
        elif packet is aten.mul and len(node.args) == 2 and not _other_is_nonfinite(node, root):
            root[node] = root[first] if first in root else root[node.args[1]]
        elif packet in (aten.add, aten.sub) and node.target._overloadname == "Tensor":
            kept, dropped = _kept_operand(node, root)
            if kept is not None:
                node.replace_all_uses_with(kept)
                folded.add(root[dropped])
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded - set(zero_tangents)


def _kept_operand(node: fx.Node, zero: dict[fx.Node, str]) -> tuple[fx.Node | None, fx.Node | None]:
    """(the operand `node` equals when its other operand is zero, that other operand), if the kept
    one has the node's shape and dtype."""
    a, b = node.args[:2]
    if b in zero:
        kept, dropped = a, b
    elif a in zero and node.target.overloadpacket is aten.add and node.kwargs.get("alpha", 1) == 1:
        kept, dropped = b, a
    else:
        return None, None
    if not isinstance(kept, fx.Node) or kept in zero:
        return None, None
    val, kept_val = node.meta.get("val"), kept.meta.get("val")
    if val is None or kept_val is None or val.shape != kept_val.shape or val.dtype != kept_val.dtype:
        return None, None
    return kept, dropped


def _other_is_nonfinite(node: fx.Node, zero: dict[fx.Node, str]) -> bool:
    """0·x is zero only for a finite x: a tensor operand cannot be proved finite, a number can."""
    other = node.args[1] if node.args[0] in zero else node.args[0]
    if isinstance(other, fx.Node):
        return True
    return not isinstance(other, (int, float)) or other != other or abs(other) == float("inf")


def checking_zero_tangents(fn: Callable[[list[Any]], Any], positions: dict[int, str]) -> Callable[[list[Any]], Any]:
    """`fn` (a boxed backward) that first checks that the tangents at `positions` (argument index ->
    the forward op that computed the output, described), folded out as never differentiated, are
    zero; raises otherwise. One host synchronization per step, only for graphs that have such
    tangents."""

    def run(args: list[Any]) -> Any:
        for index, where in positions.items():
            t = args[index]
            if isinstance(t, torch.Tensor) and bool(t.ne(0).any()):
                raise UnsupportedOpError(
                    f"A tensor the forward computes from parameters alone ({where}) and returns or stores (e.g. on "
                    "a module attribute, as the deprecated torch.nn.utils.weight_norm / spectral_norm "
                    "hooks do) received a gradient in this backward: that part of the parameters' "
                    "gradient does not depend on any sample, and per-sample clipping cannot attribute "
                    "it. Do not differentiate that tensor outside the model (e.g. a regularizer on "
                    "it: add such terms to the gradient outside), or use torch.nn.utils.parametrizations."
                )
        return fn(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
