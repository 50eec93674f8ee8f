"""Apply a parameter's post nodes (batch-free, linear) to per-sample values with a leading B dim.

vmap would do this generically, but some of its batching rules (slice_scatter) specialize a
symbolic batch size; the post nodes of real backward graphs come from a short list of ops, so they
are batched by hand here, and vmap is only the fallback for anything else — node by node, so that one
op without a hand rule does not send the ops after it (a `copy` with no batching rule) through vmap.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from grapefx.errors import UnsupportedOpError, describe_node
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


def _is_zero(arg: Any) -> bool:
    """A literal 0 or a batch-free constant zero (the masked-out branch of a backward `where`)."""
    if isinstance(arg, (int, float)):
        return arg == 0
    if isinstance(arg, fx.Node) and arg.target is aten.scalar_tensor.default:
        return arg.args[0] == 0
    return _is_zero_fill(arg)


def _aligned(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A [B, *s] value with len(s) <= rank, padded to [B, 1, ..., *s]: torch broadcasts from the right,
    so without the padding a per-sample value of lower rank would meet the other operand's leading dims
    with its batch dim."""
    missing = rank - (x.dim() - 1)
    return x.reshape([x.shape[0]] + [1] * missing + list(x.shape[1:])) if missing > 0 else x


def _elementwise(node: fx.Node, lookup: Any, batched: set[fx.Node]) -> torch.Tensor | None:
    """add / sub / mul / div / where with a leading batch dim on the batched operands. Only forms that are
    linear in the batched values: the post map of a gradient is linear, and the clipped sum is
    computed by applying the same nodes to Σ c_i g_i."""
    packet = node.target.overloadpacket
    rank = node.meta["val"].dim()
    is_batched = [isinstance(a, fx.Node) and a in batched for a in node.args]

    def value(i: int) -> Any:
        arg = node.args[i]
        if is_batched[i]:
            return _aligned(lookup(arg), rank)
        return lookup(arg) if isinstance(arg, fx.Node) else arg

    if packet in (aten.add, aten.sub) and all(is_batched[:2]):
        alpha = node.kwargs.get("alpha", 1)
        return value(0) + alpha * value(1) if packet is aten.add else value(0) - alpha * value(1)
    if packet is aten.mul and sum(is_batched[:2]) == 1:
        return value(0) * value(1)
    if packet is aten.div and is_batched[0] and not is_batched[1] and node.kwargs.get("rounding_mode") is None:
        return value(0) / value(1)
    if packet is aten.where and not is_batched[0] and any(is_batched[1:3]):
        if all(is_batched[i] or _is_zero(node.args[i]) for i in (1, 2)):
            return torch.where(value(0), value(1), value(2))
    return None


def _index_put(node: fx.Node, lookup: Any, batched: set[fx.Node], b: Any) -> torch.Tensor | None:
    """index_put(zeros, indices, values, accumulate) with batch-free indices and batched values: the
    backward of indexing a batch-free tensor (a parameter gathered by constant ids, BEiT's relative
    position bias). Only contiguous indices: the batch dim then stays in front of the indexed dims."""
    base, indices, values = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    positions = [i for i, t in enumerate(indices) if t is not None]
    if (
        not _is_zero_fill(base)
        or values not in batched
        or any(isinstance(t, fx.Node) and t in batched for t in indices)
        or not positions
        or positions != list(range(positions[0], positions[-1] + 1))
    ):
        return None
    v = lookup(values)
    out = v.new_zeros([b] + list(node.meta["val"].shape))
    shifted = [None] + [lookup(t) if isinstance(t, fx.Node) else t for t in indices]
    index_rank = max(shifted[i + 1].dim() for i in positions)
    indexed_rank = node.meta["val"].dim() - len(positions) + index_rank  # of base[indices], per sample
    return aten.index_put(out, shifted, _aligned(v, indexed_rank), accumulate)


def _cat(node: fx.Node, lookup: Any, batched: set[fx.Node], b: Any) -> torch.Tensor | None:
    """cat of per-sample values: the gradient of a parameter chunked in the forward (nn.MultiheadAttention's
    in_proj_bias with separate q / k / v weights, i.e. kdim / vdim set). A part that is not per-sample
    must be a zero fill (a chunk no sample reached)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = []
    for t in node.args[0]:
        if t in batched:
            parts.append(lookup(t))
        elif _is_zero_fill(t):
            zero = lookup(t)
            parts.append(zero.new_zeros([b] + list(zero.shape)))
        else:
            return None
    return torch.cat(parts, dim % node.meta["val"].dim() + 1)


def _weight_norm_backward(node: fx.Node, lookup: Any, batched: set[fx.Node]) -> tuple | None:
    """(grad_v, grad_g) of w = g·v/‖v‖ (weight_norm), for a batched grad_w: linear in grad_w, with
    v, g and the norms batch-free. The op has no vmap batching rule (vmap would loop over the
    samples and fix the batch size)."""
    grad_w, v, g, norms, dim = node.args
    if grad_w not in batched or any(isinstance(a, fx.Node) and a in batched for a in (v, g, norms)):
        return None
    x, v, g, norms = lookup(grad_w), lookup(v), lookup(g), lookup(norms)
    dim = dim % v.dim()
    per_direction = (x * v).sum([d + 1 for d in range(v.dim()) if d != dim], keepdim=True)
    grad_v = g / norms * (x - v * (per_direction / (norms * norms)))
    return grad_v, per_direction / norms


def _batched(node: fx.Node, lookup: Any, batched: set[fx.Node], b: Any) -> Any:
    """The node's value for all samples ([B, *shape]); None when no hand rule applies."""
    if node.target is operator.getitem and node.args[0] in batched:
        return lookup(node.args[0])[node.args[1]]
    packet = getattr(node.target, "overloadpacket", None)
    args = node.args
    x = lookup(args[0]) if args and isinstance(args[0], fx.Node) else None
    if packet in (aten.view, aten._unsafe_view, aten.reshape):
        return x.reshape([b] + list(node.meta["val"].shape))
    if packet in (aten.alias, aten.clone, aten.contiguous, aten.detach):
        return x
    if packet is aten.neg:
        return -x
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
    if packet is aten.slice:
        rest = list(args[1:]) or [0]
        return aten.slice.Tensor(x, rest[0] % (x.dim() - 1) + 1, *rest[1:])
    if packet is aten.select:
        return x.select(args[1] % (x.dim() - 1) + 1, args[2])
    # an in-place update of a batch-free tensor (`pos_query /= scale` in DeBERTa), functionalized in
    # the backward: copy(new_empty_strided(g, ...), g), i.e. src's values in dst's shape and dtype
    if packet is aten.new_empty_strided:
        return x.new_empty([b] + list(node.meta["val"].shape))
    if packet is aten.copy and args[1] in batched:
        val = node.meta["val"]
        src = _aligned(lookup(args[1]), val.dim())
        return src.to(val.dtype).expand([b] + list(val.shape))
    if packet is aten.index_put:
        return _index_put(node, lookup, batched, b)
    if packet in (aten.slice_scatter, aten.select_scatter) and _is_zero_fill(args[0]):
        src = lookup(args[1])
        base = src.new_zeros([b] + list(node.meta["val"].shape))
        rest = list(args[2:])
        dim = (rest[0] if rest else 0) % (base.dim() - 1) + 1
        return getattr(aten, packet._qualified_op_name.split("::")[1])(base, src, dim, *rest[1:])
    if packet in (aten.add, aten.sub, aten.mul, aten.div, aten.where):
        return _elementwise(node, lookup, batched)
    if packet is aten.cat:
        return _cat(node, lookup, batched, b)
    if packet is aten.sum and len(args) > 1 and args[1]:
        dims = [d % (x.dim() - 1) + 1 for d in args[1]]
        keepdim = bool(args[2]) if len(args) > 2 else node.kwargs.get("keepdim", False)
        return x.sum(dims, keepdim=keepdim, dtype=node.kwargs.get("dtype"))
    if packet is aten.native_layer_norm_backward and args[0] in batched and not batched & set(node.all_input_nodes[1:]):
        return _layer_norm_backward(node, lookup, x)
    if packet is aten.mm and (args[0] in batched) != (args[1] in batched):
        # a per-sample value times a batch-free matrix (SEW-D's relative-position projections);
        # vmap's rule for mm fixes a symbolic batch size, matmul broadcasts over it
        return torch.matmul(x, lookup(args[1]))
    if packet is aten._weight_norm_interface_backward:
        return _weight_norm_backward(node, lookup, batched)
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
    param: str,
) -> torch.Tensor:
    local: dict[fx.Node, Any] = dict(site_values)
    lookup = make_lookup(gm, env, local)

    for node in gm.graph.nodes:
        if node in post_nodes and node not in local:
            if not any(a in local for a in node.all_input_nodes):
                continue  # batch-free: computed on demand by `lookup`
            value = _batched(node, lookup, set(local), b)
            if value is None:  # no hand rule: this node alone per sample under vmap
                _check_vmappable({node}, b, param)
                value = _vmap_node(node, lookup, local)
            local[node] = value
    return local[out_node]


def _layer_norm_backward(node: fx.Node, lookup: Any, g: torch.Tensor) -> tuple[Any, Any, Any]:
    """native_layer_norm_backward for per-sample output gradients g [B, *S] of a layer norm applied to
    a batch-free input (DeBERTa's / SEW-D's normalized relative-position table): linear in g, so
    each sample's (grad_input, grad_weight, grad_bias) with the input's saved mean and rstd."""
    inp, shape, mean, rstd, weight = (lookup(a) if isinstance(a, fx.Node) else a for a in node.args[1:6])
    wanted = node.args[7]
    norm_dims = list(range(-len(shape), 0))
    outer = list(range(1, g.dim() - len(shape)))  # per-sample dims summed for weight and bias
    xhat = (inp - mean) * rstd
    gw = g * weight if weight is not None else g
    grad_input = grad_weight = grad_bias = None
    if wanted[0]:
        centred = gw - gw.mean(norm_dims, keepdim=True)
        grad_input = rstd * (centred - xhat * (gw * xhat).mean(norm_dims, keepdim=True))
    if wanted[1] and weight is not None:
        grad_weight = (g * xhat).sum(outer) if outer else g * xhat
    if wanted[2] and node.args[6] is not None:
        grad_bias = g.sum(outer) if outer else g
    return grad_input, grad_weight, grad_bias


def _check_vmappable(nodes: set[fx.Node], b: Any, param: str) -> None:
    """vmap runs an op without a batching rule once per sample, which fixes a symbolic batch size:
    torch would then fail the compile with a shape-constraint error that names no op."""
    if not isinstance(b, torch.SymInt):
        return
    for node in nodes:
        if isinstance(node.target, torch._ops.OpOverload) and not any(
            torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(), key)
            for key in ("FuncTorchBatched", "CompositeImplicitAutograd")
        ):
            raise UnsupportedOpError(
                f"The gradient of parameter `{param}` passes through {describe_node(node)} after its "
                "batch contraction; grapefx has no per-sample rule for it and torch has no vmap batching "
                "rule. Please report this model; as a workaround, express the layer with standard ops."
            )


def _vmap_node(node: fx.Node, lookup: Any, local: dict) -> Any:
    """One post node applied per sample: vmap over its batched inputs (`local`), the others shared."""
    batched = [a for a in node.all_input_nodes if a in local]

    def one(*vals: Any) -> Any:
        own = dict(zip(batched, vals))
        return call_node(node, lambda n: own[n] if n in own else lookup(n))

    return torch.vmap(one)(*[local[a] for a in batched])
