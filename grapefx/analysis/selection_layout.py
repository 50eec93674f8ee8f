"""Batch layouts of ops that select, order or summarize values along one dim (sort, topk, max/min
over a dim, median, kthvalue, mode, vector norms), of `unfold` (sliding windows) and of the FFT.

Each is per-sample when that dim is not the batch dim; along the batch dim it would compare or
combine samples, so it stays UNKNOWN (refused), or, for full reductions, is recorded as a batch
reduction (which the forward checks refuse unless it is the loss's sum or mean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from grapefx.analysis.layout_types import UNKNOWN, BatchLayout, shape_of

aten = torch.ops.aten


def _arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


def _dim_layout(p: Any, n: fx.Node, dim: int, reduces: bool, keepdim: bool) -> Any:
    """The input's layout after an op along `dim` (removed when `reduces` and not `keepdim`)."""
    lx = p.lay(n.args[0])
    ndim = len(shape_of(n.args[0]))
    if not isinstance(lx, BatchLayout) or ndim == 0:
        return UNKNOWN
    d = dim + ndim if dim < 0 else dim
    if d == lx.dim:
        return UNKNOWN  # orders or picks values across samples
    if reduces and not keepdim and d < lx.dim:
        return lx.moved(lx.dim - 1)
    return lx


def _pair(dim_pos: int, default_dim: int | None, reduces: bool) -> Callable[[Any, fx.Node], Any]:
    """(values, indices) ops: sort, topk, max.dim, median.dim, kthvalue, mode."""

    def rule(p: Any, n: fx.Node) -> Any:
        dim = _arg(n, dim_pos, "dim", default_dim)
        keep = bool(_arg(n, dim_pos + 1, "keepdim", False)) if reduces else True
        out = _dim_layout(p, n, dim, reduces, keep)
        return UNKNOWN if out is UNKNOWN else (out, out)

    return rule


_PAIRS = {
    aten.sort.default: _pair(1, -1, False),
    aten.sort.stable: _pair(99, -1, False),  # dim is keyword-only
    aten.topk.default: _pair(2, -1, False),
    aten.kthvalue.default: _pair(2, -1, True),
    aten.mode.default: _pair(1, -1, True),
    aten.max.dim: _pair(1, None, True),
    aten.min.dim: _pair(1, None, True),
    aten.median.dim: _pair(1, None, True),
    aten.nanmedian.dim: _pair(1, None, True),
}


def values_and_indices(p: Any, n: fx.Node) -> Any:
    rule = _PAIRS.get(n.target)
    if rule is not None:
        return rule(p, n)
    if torch.Tag.pointwise in n.target.tags:  # max.other, min.other: elementwise
        return p.broadcast(n, p.tensor_args(n))
    if n.target in (aten.max.default, aten.min.default, aten.median.default, aten.nanmedian.default):
        return p.reduction(n, n.args[0], None, False)  # over everything, the batch included
    return UNKNOWN


def argsort(p: Any, n: fx.Node) -> Any:
    dim = _arg(n, 1, "dim", -1) if n.target is aten.argsort.default else n.kwargs.get("dim", -1)
    return _dim_layout(p, n, dim, False, True)


def vector_norm(p: Any, n: fx.Node) -> Any:
    """linalg_vector_norm(x, ord, dim, keepdim): F.normalize, torch.norm, cosine_similarity."""
    return p.reduction(n, n.args[0], _arg(n, 2, "dim", None), bool(_arg(n, 3, "keepdim", False)))


def unfold(p: Any, n: fx.Node) -> Any:
    """x.unfold(dim, size, step): windows along `dim`, as a new last dim."""
    return _dim_layout(p, n, n.args[1], False, True)


def unfold_backward(p: Any, n: fx.Node) -> Any:
    """unfold_backward(grad, input_sizes, dim, size, step): windows summed back into `dim`."""
    lg = p.lay(n.args[0])
    rank = len(n.args[1])
    if not isinstance(lg, BatchLayout) or lg.dim >= rank:
        return UNKNOWN  # the batch in the window dim: not what unfold of a batched tensor gives
    d = n.args[2] + rank if n.args[2] < 0 else n.args[2]
    return UNKNOWN if d == lg.dim else lg


def fft(p: Any, n: fx.Node) -> Any:
    """_fft_c2c / _fft_r2c / _fft_c2r(x, dims, ...): torch.fft over `dims` (FNet's fftn over tokens
    and features); sizes change only along `dims`."""
    lx = p.lay(n.args[0])
    ndim = len(shape_of(n.args[0]))
    if not isinstance(lx, BatchLayout) or any((d + ndim if d < 0 else d) == lx.dim for d in n.args[1]):
        return UNKNOWN
    return lx


def complex_view(p: Any, n: fx.Node) -> Any:
    """view_as_real appends a dim of 2 (re, im); view_as_complex removes it."""
    lx = p.lay(n.args[0])
    if not isinstance(lx, BatchLayout):
        return UNKNOWN
    if n.target.overloadpacket is aten.view_as_complex and lx.dim == len(shape_of(n.args[0])) - 1:
        return UNKNOWN
    return lx


RULES = {
    aten.sort: values_and_indices,
    aten.topk: values_and_indices,
    aten.kthvalue: values_and_indices,
    aten.mode: values_and_indices,
    aten.max: values_and_indices,
    aten.min: values_and_indices,
    aten.median: values_and_indices,
    aten.nanmedian: values_and_indices,
    aten.argsort: argsort,
    aten.linalg_vector_norm: vector_norm,
    aten.unfold: unfold,
    aten.unfold_backward: unfold_backward,
    aten._fft_c2c: fft,
    aten._fft_r2c: fft,
    aten._fft_c2r: fft,
    aten.view_as_real: complex_view,
    aten.view_as_complex: complex_view,
}
