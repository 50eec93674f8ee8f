"""Memory probes: process RSS (Linux /proc), torch.profiler allocation events, model state, CUDA."""

from __future__ import annotations

import os

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm_hwm_bytes() is not None
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profiler_memory_peak(prof) -> dict:  # noqa: ANN001 - a torch.profiler.profile
    """Peak bytes of tensors allocated within the profiled region, from the profiler's allocation
    events (torch 2.13: kineto_results.experimental_event_tree(), tag Allocation, signed alloc_size).
    Frees of blocks allocated before the region (weights, the previous step's grads) are ignored, so
    the peak excludes them; `net_peak_bytes` is the plain running sum of all events."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            # ties: allocations before frees (conservative)
            events.append((e.start_time_ns, 0 if f.alloc_size > 0 else 1, int(f.alloc_size), int(f.ptr)))
        stack.extend(e.children)
    events.sort()
    live: dict[int, int] = {}
    cur = peak = net = net_peak = 0
    n_alloc = n_free_unknown = 0
    for _, _, size, ptr in events:
        net += size
        net_peak = max(net_peak, net)
        if size > 0:
            live[ptr] = live.get(ptr, 0) + size
            cur += size
            n_alloc += 1
            peak = max(peak, cur)
        else:
            s = live.pop(ptr, None)
            if s is None:
                n_free_unknown += 1  # a block allocated before the step
            else:
                cur -= s
    return {
        "peak_bytes": peak,
        "net_peak_bytes": net_peak,
        "live_at_end_bytes": cur,
        "n_events": len(events),
        "n_allocs": n_alloc,
        "n_frees_of_older_blocks": n_free_unknown,
    }


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters + optimizer state (the memory that persists between steps, grads excluded: every
    step starts with zero_grad(set_to_none=True) and the profiler peak counts the new grads)."""
    seen: set[int] = set()
    tensors = list(model.parameters())
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    total = 0
    for t in tensors:
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
