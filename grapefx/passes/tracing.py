"""Trace a Python function over a graph's fake inputs into a new aten GraphModule."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx


def retrace(
    fn: Callable[..., Any],
    example_inputs: list[Any],
    decompositions: dict[Any, Any] | None = None,
    keep_annotations: bool = False,
) -> fx.GraphModule:
    """`keep_annotations`: nodes made inside torch.fx.traceback.annotate(...) carry the dict in
    node.meta["custom"] (provenance of the rewrite)."""
    fake_mode = detect_fake_mode(example_inputs)
    ctx = contextlib.nullcontext()
    old = None
    if fake_mode is not None:
        # Decompositions and graph constants bring small real tensors (e.g. a 0-d zero).
        old = fake_mode.allow_non_fake_inputs
        fake_mode.allow_non_fake_inputs = True
        ctx = fake_mode
    try:
        meta_ctx = fx_traceback.preserve_node_meta() if keep_annotations else contextlib.nullcontext()
        with ctx, meta_ctx:
            gm = make_fx(fn, decompositions, tracing_mode="real")(*example_inputs)
    finally:
        if fake_mode is not None:
            fake_mode.allow_non_fake_inputs = old
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
