"""One (model, configuration) in this process: time, memory, compile time; result as a dict.

CPU: ms/step = median wall time of the timed steps (process CPU time recorded too); dRSS = peak RSS
during the timed steps (VmHWM after resetting it at the end of the warmup) minus RSS before the
first step; prof = peak bytes allocated within one extra step (torch.profiler memory events).
CUDA: steps are timed between torch.cuda.synchronize() calls; memory = torch.cuda.max_memory_allocated
over the timed steps (peak stats reset after the warmup), and in-step peak = that minus the bytes
allocated at a step's start (parameters + optimizer state; grads are freed by zero_grad).
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time

import torch

# The compiler stacks are imported in every configuration before RSS is measured, so that dRSS does
# not charge compiled configs ~100 MB of Python modules that eager runs never import.
import torch._dynamo  # noqa: F401
import torch._functorch.aot_autograd  # noqa: F401
import torch._inductor.compile_fx  # noqa: F401
import torch.profiler  # noqa: F401

import grapefx  # noqa: F401
from tools.bench import measure
from tools.bench.configs import build
from tools.models import make_case


def run(
    model: str,
    config: str,
    warmup: int,
    steps: int,
    device: str = "cpu",
    batch: int | None = None,
    seq: int | None = None,
    gpt_pos: str = "embedding",
    cnn_pool: str = "max",
    profile_memory: bool = True,
    op_table: bool = False,
) -> dict:
    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res: dict = {"model": model, "config": config, "pid": os.getpid(), "torch": torch.__version__, "device": device}
    case = make_case(model, gpt_pos=gpt_pos, cnn_pool=cnn_pool, batch=batch, seq=seq)
    res.update(n_params=case.n_params, desc=case.desc, batch=int(case.x.shape[0]))
    res["seq"] = int(case.x.shape[1]) if case.x.dim() == 2 and case.x.dtype == torch.long else None
    tr = build(case, config, device)

    gc.collect()
    rss0 = measure.rss_bytes()
    res["rss_before_first_step_bytes"] = rss0
    times, losses = [], []
    for _ in range(warmup):
        sync()
        t0 = time.perf_counter()
        losses.append(float(tr.step()))
        sync()
        times.append(time.perf_counter() - t0)
    res["compile_s"] = times[0] if times else None  # first step: compilation + one step
    res["warmup_s"] = times
    res["drss_incl_compile_bytes"] = (measure.vm_hwm_bytes() or measure.ru_maxrss_bytes()) - rss0
    res["rss_after_warmup_bytes"] = measure.rss_bytes()
    reset_ok = measure.reset_hwm()
    res["rss_method"] = "VmHWM after clear_refs=5 (timed steps only)" if reset_ok else "ru_maxrss (includes compile)"
    if cuda:
        tr.opt.zero_grad(set_to_none=True)
        sync()
        alloc0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    step_s, cpu_s, faults = [], [], []
    for _ in range(steps):
        sync()
        t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        losses.append(float(tr.step()))
        sync()
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    peak_rss = measure.vm_hwm_bytes() if reset_ok else measure.ru_maxrss_bytes()
    res.update(
        step_s=step_s,
        ms_per_step=1e3 * statistics.median(step_s),
        cpu_s=cpu_s,
        cpu_ms_per_step=1e3 * statistics.median(cpu_s),
        # minor page faults: on CPU, fresh pages of large buffers glibc mapped for this step
        minflt_per_step=statistics.median(faults),
        peak_rss_bytes=peak_rss,
        drss_bytes=peak_rss - rss0,
        drss_steady_bytes=peak_rss - res["rss_after_warmup_bytes"],
        losses=losses,
        state_bytes=measure.state_bytes(tr.model, tr.opt),
    )
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in tr.model.parameters())
    res["grads_finite"] = grads_ok
    if tr.private:
        assert grads_ok, f"{config} left a missing or non-finite p.grad"

    if cuda:
        peak = torch.cuda.max_memory_allocated()
        res["cuda_max_memory_allocated_bytes"] = peak
        res["prof"] = {"peak_bytes": peak - alloc0, "method": "cuda max_memory_allocated - allocated at step start"}
    elif profile_memory:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            tr.step()
        res["prof"] = measure.profiler_memory_peak(prof)
        del prof
    if "prof" in res:
        res["total_peak_bytes"] = res["state_bytes"] + res["prof"]["peak_bytes"]
    if op_table:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            tr.step()
            sync()
        ka = prof.key_averages(group_by_input_shape=True)
        res["op_table"] = ka.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=20)
        res["op_table_total_self_cpu_ms"] = sum(e.self_cpu_time_total for e in ka) / 1e3
    return res
