"""Which fx nodes share storage with an input (views and in-place / out= ops, by schema), and which
noise nodes codegen will run in place."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_VIEW_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "permute",
        "expand",
        "alias",
        "slice",
        "select",
        "squeeze",
        "unsqueeze",
        "t",
        "transpose",
        "as_strided",
        "unfold",
        "narrow",
        "diagonal",
        "detach",
        "view_as",
        "expand_as",
        "_reshape_alias",
        "movedim",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "tensor_split",
    }
)


def is_alias(node: fx.Node) -> bool:
    """True when `node`'s outputs share storage with an input (views, in-place / out= ops)."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t._opname in _VIEW_OPS:
        return True
    returns = t._schema.returns
    return bool(returns) and all(r.alias_info is not None for r in returns)


def is_noise(node: fx.Node) -> bool:
    """The functional noise op `grapefx::add_gaussian_noise` (what the passes build)."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "grapefx" and t._opname == "add_gaussian_noise"


def _owns_storage(node: fx.Node) -> bool:
    """`node`'s tensor is the whole of a buffer no other node reads: made by an op (not a graph
    input), possibly seen through views that nothing else reads and that cover all of it."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # one output of a multi-output op, e.g. convolution_backward
        source = node.args[0]
        return isinstance(source, fx.Node) and source.op == "call_function" and not is_alias(source)
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if not is_alias(node):
        return True
    base = node.args[0] if node.args else None
    if t._schema.is_mutable or not isinstance(base, fx.Node) or len(base.users) != 1:
        return False
    val, base_val = node.meta.get("val"), base.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(base_val, torch.Tensor):
        return False
    return statically_known_true(val.numel() == base_val.numel()) and _owns_storage(base)


def reuses_input_storage(node: fx.Node) -> bool:
    """True for a noise node that codegen makes in place (`grapefx.passes.noise_in_place`): its input
    is read by it alone and owns its storage, so the noise can be added into that buffer."""
    if not is_noise(node):
        return False
    grad = node.args[0]
    if not isinstance(grad, fx.Node) or len(grad.users) != 1 or not _owns_storage(grad):
        return False
    val, out = grad.meta.get("val"), node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return val.dtype == out.dtype and val.shape == out.shape and bool(val.is_contiguous())
