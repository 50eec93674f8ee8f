"""Where a GPU training step's time goes: host (enqueueing kernels) or device, per configuration.

    python -m tools.host_overhead M3:np-eager M3:gx-eager M3:gx-inductor [--out FILE]

For each MODEL:CONFIG of `tools.bench` (built the same way, on CUDA): the median synchronized step
time; the time to enqueue one step against the wait for the device after it (a step that is mostly
enqueue is host-bound: its kernels are too small to hide the Python and launch overhead); kernel
launches and host-device synchronizations per step, and the device's busy time per step (torch
profiler); then the profiler's op tables by host and by device time. On a small model a GPU step is
host-bound, so kernel count and per-op overhead decide the ratio to non-private training, not flops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tools.bench.configs import build
from tools.models import make_case

LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
PROFILED_STEPS = 3


def measure(model: str, config: str, warmup: int = 6, steps: int = 20) -> str:
    tr = build(make_case(model), config, "cuda")
    for _ in range(warmup):
        float(tr.step())
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        float(tr.step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tr.step()  # no float(): the host returns as soon as the step is enqueued
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            float(tr.step())
        torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = sum(e.count for e in ka if e.key in LAUNCH_EVENTS) / PROFILED_STEPS
    syncs = sum(e.count for e in ka if e.key == "cudaStreamSynchronize") / PROFILED_STEPS
    # kernel rows only, as the profiler's own "Self CUDA time total": operator rows repeat their kernels
    cuda = torch.autograd.DeviceType.CUDA
    busy = sum(e.self_device_time_total for e in ka if e.device_type == cuda and not e.is_user_annotation)
    head = (
        f"## {model} {config}\n\nmedian {1e3 * statistics.median(times):.2f} ms/step; one step enqueued in "
        f"{1e3 * (t1 - t0):.2f} ms, then {1e3 * (t2 - t1):.2f} ms waiting for the device; "
        f"{launches:.0f} kernel launches/step; {syncs:.0f} stream synchronizations/step; device busy "
        f"{busy / PROFILED_STEPS / 1e3:.2f} ms/step\n"
    )
    tables = [ka.table(sort_by=k, row_limit=25) for k in ("self_cpu_time_total", "self_device_time_total")]
    return head + "\n```\n" + "\n".join(tables) + "\n```\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.host_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="MODEL:CONFIG")
    ap.add_argument("--out", help="also write the report here (markdown)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tools.host_overhead measures a CUDA step: no CUDA device visible to torch")
    parts = [f"# Host vs device time per step · torch {torch.__version__} · {torch.cuda.get_device_name()}\n"]
    for run in args.runs:
        model, config = run.split(":", 1)
        parts.append(measure(model, config))
        print(parts[-1].split("\n```")[0], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(parts))


if __name__ == "__main__":
    main()
