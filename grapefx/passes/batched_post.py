"""Apply a parameter's post nodes (batch-free, linear) to per-sample values with a leading B dim.

vmap would do this generically, but some of its batching rules (slice_scatter) specialize a
symbolic batch size; the post nodes of real backward graphs come from a short list of ops, so they
are batched by hand here, and vmap is only the fallback for anything else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from grapefx.passes.interp import call_node, make_lookup

aten = torch.ops.aten


def _is_zero_fill(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.full, aten.new_full, aten.full_like):
        value = node.args[1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        return value == 0
    return packet in (aten.zeros, aten.new_zeros, aten.zeros_like)


def is_isometric_post(node: fx.Node) -> bool:
    """True for post nodes that preserve the Frobenius norm of the (single) site value."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _ISOMETRIC:
        return True
    if packet in (aten.slice_scatter, aten.select_scatter):
        return _is_zero_fill(node.args[0])
    return False


_ISOMETRIC = {
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.permute,
    aten.t,
    aten.transpose,
    aten.alias,
    aten.clone,
    aten.squeeze,
    aten.unsqueeze,
    aten.contiguous,
    aten.detach,
}


def _batched(node: fx.Node, lookup: Any, batched: set[fx.Node], b: Any) -> torch.Tensor | None:
    """The node's value for all samples ([B, *shape]); None when no hand rule applies."""
    packet = getattr(node.target, "overloadpacket", None)
    args = node.args
    x = lookup(args[0]) if args and isinstance(args[0], fx.Node) else None
    if packet in (aten.view, aten._unsafe_view, aten.reshape):
        return x.reshape([b] + list(node.meta["val"].shape))
    if packet in (aten.alias, aten.clone, aten.contiguous, aten.detach):
        return x
    if packet is aten.permute:
        return x.permute([0] + [d % (x.dim() - 1) + 1 for d in args[1]])
    if packet is aten.t:
        return x.transpose(1, 2)
    if packet is aten.transpose:
        nd = x.dim() - 1
        return x.transpose(args[1] % nd + 1, args[2] % nd + 1)
    if packet in (aten.squeeze, aten.unsqueeze):
        return x.reshape([b] + list(node.meta["val"].shape))
    if packet is aten._to_copy and set(node.kwargs) <= {"dtype"}:
        return x.to(node.kwargs.get("dtype", x.dtype))
    if packet in (aten.slice_scatter, aten.select_scatter) and _is_zero_fill(args[0]):
        src = lookup(args[1])
        base = src.new_zeros([b] + list(node.meta["val"].shape))
        rest = list(args[2:])
        dim = (rest[0] if rest else 0) % (base.dim() - 1) + 1
        return getattr(aten, packet._qualified_op_name.split("::")[1])(base, src, dim, *rest[1:])
    if packet in (aten.add, aten.sub) and all(isinstance(a, fx.Node) and a in batched for a in args[:2]):
        alpha = node.kwargs.get("alpha", 1)
        return lookup(args[0]) + alpha * lookup(args[1]) if packet is aten.add else lookup(args[0]) - lookup(args[1])
    if packet is aten.mul and sum(isinstance(a, fx.Node) and a in batched for a in args[:2]) == 1:
        other = [a for a in args[:2] if not (isinstance(a, fx.Node) and a in batched)][0]
        bx = [lookup(a) for a in args[:2] if isinstance(a, fx.Node) and a in batched][0]
        return bx * (lookup(other) if isinstance(other, fx.Node) else other)
    if packet is aten.embedding_dense_backward and not node.args[4]:
        # a batch-free index (positions: nn.Embedding(arange(T))) gathered a per-sample sum
        ids = lookup(args[1]).reshape(-1)
        g = x.reshape(b, ids.shape[0], x.shape[-1])
        padding_idx = args[3]
        if padding_idx is not None and padding_idx >= 0:
            g = g * (ids != padding_idx).to(g.dtype)[None, :, None]
        out = g.new_zeros(b, args[2], g.shape[-1])
        return out.index_add_(1, ids, g)  # in place: the out-of-place op would copy the zeros
    return None


def apply_post_batched(
    post_nodes: set[fx.Node],
    out_node: fx.Node,
    site_values: dict[fx.Node, torch.Tensor],
    gm: fx.GraphModule,
    env: dict,
    b: Any,
) -> torch.Tensor:
    local: dict[fx.Node, Any] = dict(site_values)
    lookup = make_lookup(gm, env, local)

    for node in gm.graph.nodes:
        if node in post_nodes and node not in local:
            value = _batched(node, lookup, set(local), b)
            if value is None:
                return _vmap_fallback(post_nodes, out_node, site_values, gm, env)
            local[node] = value
    return local[out_node]


def _vmap_fallback(
    post_nodes: set[fx.Node],
    out_node: fx.Node,
    site_values: dict[fx.Node, torch.Tensor],
    gm: fx.GraphModule,
    env: dict,
) -> torch.Tensor:
    nodes = list(site_values)

    def one(*vals: Any) -> Any:
        local = dict(zip(nodes, vals))
        lookup = make_lookup(gm, env, local)
        for node in gm.graph.nodes:
            if node in post_nodes and node not in local:
                local[node] = call_node(node, lookup)
        return local[out_node]

    return torch.vmap(one)(*site_values.values())
