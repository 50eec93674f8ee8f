"""Measured peak memory of running one fx graph, to check the static estimate against.

The graph runs eagerly with the boxed calling convention (its argument list is cleared, so inputs
die after their last use, as in AOTAutograd's backward) under torch.profiler with
`profile_memory=True`; the peak is the highest running sum of the allocation / free events, the
inputs' copies included (on CPU there is no caching allocator: events are tensor storages).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.profiler import ProfilerActivity, profile

from grapefx.inspect.graphs import batch_symbols, concrete
from grapefx.passes.noise_in_place import lower_for_execution
from grapefx.schedule.reorder import copy_graph_module


def example_inputs(gm: fx.GraphModule, seed: int = 0, batch: int | None = None) -> list[Any]:
    """Random inputs matching the placeholders' metadata at the compiled batch size, or at `batch`
    where sizes are symbolic in the batch (indices 0/1, valid for any table)."""
    g = torch.Generator().manual_seed(seed)
    subs = {b: sympy.Integer(batch) for b in batch_symbols(gm)} if batch is not None else {}

    def size(s: Any) -> int:
        if subs and isinstance(s, torch.SymInt):
            e = sympy.sympify(s.node.expr).xreplace(subs)
            if not e.free_symbols:
                return int(e)
        return concrete(s)

    args: list[Any] = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt):
            args.append(size(val))
        elif isinstance(val, torch.Tensor):
            shape = [size(s) for s in val.shape]
            if val.dtype.is_floating_point:
                args.append(torch.rand(shape, dtype=val.dtype, generator=g))  # >= 0: rsqrt, log stay finite
            elif val.dtype == torch.bool:
                args.append(torch.randint(0, 2, shape, generator=g).bool())
            else:
                args.append(torch.randint(0, 2, shape, dtype=val.dtype, generator=g))
        else:
            args.append(val)
    return args


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto logs a line each time a profiler starts and stops, from
    C++, so Python's sys.stderr cannot catch it); Python exceptions still surface afterwards."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measured_peak(gm: fx.GraphModule, args: list[Any]) -> int:
    """Peak bytes while running `gm` on `args`, which it consumes (the list is cleared; keep no
    other reference to its tensors, or they cannot be freed)."""
    # what codegen runs (noise in place), taking one list and clearing it
    runner = copy_graph_module(lower_for_execution(gm), torch.fx.graph._BoxedCodeGen())
    with (
        quiet_native_stderr(),
        torch.no_grad(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        # The profiler drops the frees of blocks allocated before it started: copy the inputs
        # inside, so their allocation and their early frees are both events.
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        args.clear()
        out = runner(fresh)
    del out
    return peak_of_profile(prof)


def peak_of_profile(prof: Any) -> int:
    """Highest running sum of a finished profile's allocation events (frees of blocks allocated
    before it started are ignored)."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            size = int(e.extra_fields.alloc_size)
            # ties: allocations first (conservative)
            events.append((e.start_time_ns, 0 if size > 0 else 1, size, int(e.extra_fields.ptr)))
        stack.extend(e.children)
    events.sort()
    live: dict[int, int] = {}
    running = peak = 0
    for _, _, size, ptr in events:
        if size > 0:
            live[ptr] = size
            running += size
            peak = max(peak, running)
        elif ptr in live:  # frees of blocks from before the region (e.g. an earlier run) are not ours
            running -= live.pop(ptr)
    return peak
