"""Scratch memory an op allocates and frees inside itself, which fake-tensor metadata cannot show.

On CPU, `convolution_backward` (and the forward `convolution` a recompute may replay) goes through
oneDNN or im2col, whose workspaces are several times the op's inputs: without them the estimate of a
non-private conv backward was 27% of the measured peak. There is no closed form (the algorithm, and
so the scratch, changes with the shapes, and B=1 takes another path than B=2), so the workspace is
calibrated: the op runs once on random tensors of the node's concrete shapes under torch.profiler,
and the bytes above its outputs are remembered per signature. `MemoryModel.sizes(batch)` calibrates
again at another batch size; symbolic expressions (peak envelopes) scale the calibrated bytes with
the op's first input, an approximation. tests/test_schedule.py checks estimates against measured
peaks at the compiled batch and at two others.

Calibration is skipped (workspace 0, the old lower bound) off CPU and when a profiler is already
running (profilers do not nest).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.profiler import ProfilerActivity, profile

import grapefx.rules.conv  # noqa: F401 - registers grapefx::conv_per_sample_weight_grad
from grapefx.inspect.graphs import concrete

aten = torch.ops.aten
log = logging.getLogger(__name__)

WORKSPACE_OPS = frozenset(
    {
        aten.convolution_backward.default,
        aten.convolution.default,
        torch.ops.grapefx.conv_per_sample_weight_grad.default,  # grouped convolution_backward inside
    }
)


@dataclass
class Workspace:
    """The scratch of one node. `bytes_at(subs)` calibrates at the batch the substitution gives
    (default: the compiled example batch); `expr` is the symbolic stand-in for envelopes — the
    calibrated bytes scaled with the op's first input, an approximation (the scratch is not linear
    in the batch at small sizes), which is why `MemoryModel.sizes` asks `bytes_at` instead."""

    node: fx.Node
    expr: sympy.Expr

    def bytes_at(self, subs: dict[sympy.Symbol, sympy.Integer] | None = None) -> int:
        signature = tuple(_signature(a, subs or {}) for a in self.node.args)
        return _calibrated(self.node.target, signature)


def workspace_of(node: fx.Node, nbytes_expr: Callable[[torch.Tensor], sympy.Expr]) -> Workspace | None:
    """The scratch `node` needs while it runs, or None when its op has none we know of or it cannot
    be calibrated here. `nbytes_expr(tensor)` gives a tensor's symbolic size."""
    if node.op != "call_function" or node.target not in WORKSPACE_OPS:
        return None
    first = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(first, torch.Tensor) or first.device.type != "cpu":
        return None
    if torch.autograd.profiler._is_profiler_enabled:
        return None
    ws = Workspace(node, sympy.Integer(0))
    scratch = ws.bytes_at()
    if scratch <= 0:
        return None
    size, hint = nbytes_expr(first), _concrete_nbytes(first)
    ws.expr = sympy.Integer(scratch) * size / hint if size.free_symbols and hint else sympy.Integer(scratch)
    return ws


def _concrete_nbytes(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= concrete(s)
    return n * t.element_size()


def _size(s: Any, subs: dict) -> int:
    if subs and isinstance(s, torch.SymInt):
        e = sympy.sympify(s.node.expr).xreplace(subs)
        if not e.free_symbols:
            return int(e)
    return concrete(s)


@dataclass(frozen=True)
class _TensorSig:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        # Fill a flat buffer, then view it with the strides (they may overlap: expanded tensors).
        extent = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride)) if all(self.shape) else 0
        flat = torch.empty(extent, dtype=self.dtype)
        flat = flat.normal_() if self.dtype.is_floating_point else flat.zero_()
        return flat.as_strided(self.shape, self.stride)


def _signature(a: Any, subs: dict) -> Any:
    """A hashable stand-in for an argument: tensors by shape/stride/dtype, sizes made concrete."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            shape = tuple(_size(x, subs) for x in v.shape)
            return _TensorSig(shape, tuple(_size(x, subs) for x in v.stride()), v.dtype)
        return _size(v, subs) if isinstance(v, torch.SymInt) else v
    if isinstance(a, (list, tuple)):
        return tuple(_signature(x, subs) for x in a)
    return _size(a, subs) if isinstance(a, torch.SymInt) else a


def _materialize(sig: Any) -> Any:
    if isinstance(sig, _TensorSig):
        return sig.make()
    if isinstance(sig, tuple):
        return [_materialize(x) for x in sig]
    return sig


@functools.lru_cache(maxsize=512)
def _calibrated(target: Any, signature: tuple) -> int:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from grapefx.schedule.measure import peak_of_profile, quiet_native_stderr

    try:
        with unset_fake_temporarily(), torch.no_grad():
            args = [_materialize(s) for s in signature]
            with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = target(*args)
            outs = out if isinstance(out, (list, tuple)) else [out]
            out_bytes = sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor))
    except (RuntimeError, ValueError) as e:  # an estimate must never break compilation
        log.debug("workspace calibration of %s failed: %s", target, e)
        return 0
    return max(0, peak_of_profile(prof) - out_bytes)
