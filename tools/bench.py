"""grapefx vs non-private training: time and memory, side by side, one command.

    python tools/bench.py                 # full run (M1-M4, 2 rounds), ~20 min on 2 cores
    python tools/bench.py --quick         # smoke: M1 + a small GPT, 1 round, ~3 min
    python tools/bench.py --models M3 --configs np-eager,gx-eager --rounds 3
    python tools/bench.py --strategies ghost,instantiate      # add gx-<codegen>-<strategy> variants
    python tools/bench.py --op-profile M3:gx-eager            # one step's op table (top 15 self CPU)

Method (mirrors /work/shared/BENCHMARKS.md; see tools/README.md):
- one torch thread (torch.set_num_threads(1), OMP/MKL_NUM_THREADS=1);
- every (model, config) runs in a FRESH subprocess; configurations are interleaved within a round
  and the order is reversed in every other round, so machine drift cancels in the ratios;
- per run: `warmup` steps (compilation happens in the first one: compile_s = first step's time),
  then `steps` timed steps; ms/step = median of forward + loss + backward + optimizer step
  (zero_grad(set_to_none=True) included); SGD, cross entropy with mean reduction; the process CPU
  time of each step (time.process_time) is recorded too: on a busy shared machine it is the steadier
  measure (one torch thread, so CPU time ~ wall time when the core is free);
- dRSS = peak RSS during the timed steps (VmHWM from /proc/self/status after resetting it with
  `echo 5 > /proc/self/clear_refs` when the warmup is done; falls back to getrusage ru_maxrss, which
  then also covers the compile) minus RSS just before the first step; every configuration imports
  torch._dynamo / torch._inductor / grapefx before that RSS is read, so module imports are not
  counted, but what compilation leaves behind (generated code, graphs) is;
- prof = peak bytes of tensors allocated within one (extra, untimed) step under torch.profiler with
  profile_memory=True: the allocation/free events of the profiler's event tree
  (`prof.profiler.kineto_results.experimental_event_tree()`, events tagged Allocation with
  `extra_fields.alloc_size` signed and `.ptr`), sorted by time; the running sum counts only blocks
  allocated inside the step, so weights and the previous step's grads (freed by zero_grad) are
  excluded. `prof_net` (in the JSON) is the plain running sum of all events, frees of older blocks
  included;
- ratios (×np) are against non-private eager of the same model in the same round; the table shows
  the median over rounds of the per-round medians and ratios.
After the timed steps every grapefx run asserts that all parameter grads are finite.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIGS = ["np-eager", "np-inductor", "gx-eager", "gx-inductor"]
FULL_MODELS = ["M1", "M2", "M3", "M4"]
QUICK_MODELS = ["M1", "GPT-S"]
# (warmup, timed steps) per model
FULL_STEPS = {"M1": (3, 30), "M2": (3, 15), "M3": (2, 5), "M4": (2, 5), "GPT-S": (3, 20)}
QUICK_STEPS = {"M1": (2, 5), "M2": (2, 3), "M3": (1, 2), "M4": (1, 2), "GPT-S": (2, 5)}
# targets for grapefx vs non-private eager: (time ratio, memory ratio)
TARGETS = {"M1": (1.3, 1.2), "M2": (1.3, 1.2), "M3": (1.15, 1.10), "M4": (1.15, 1.10), "GPT-S": (1.15, 1.10)}


# ----------------------------------------------------------------------------------------------
# worker: one (model, config) in this process
# ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profiler_memory_peak(prof) -> dict:
    """Peak bytes of tensors allocated within the profiled region, from the profiler's allocation
    events (torch 2.13: kineto_results.experimental_event_tree(), tag Allocation)."""
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
                n_free_unknown += 1  # a block allocated before the step (old grads, ...)
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


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    # Import the compiler stacks in every configuration before measuring RSS, so that dRSS does not
    # charge compiled configs ~100 MB of Python modules that eager runs never import.
    import torch._dynamo  # noqa: F401
    import torch._functorch.aot_autograd  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch.profiler  # noqa: F401

    import grapefx

    sys.path.insert(0, str(ROOT / "tools"))
    from models import make_case

    res: dict = {"model": args.model, "config": args.config, "pid": os.getpid(), "torch": torch.__version__}
    case = make_case(args.model, gpt_pos=args.gpt_pos, cnn_pool=args.cnn_pool)
    res["n_params"] = case.n_params
    res["desc"] = case.desc
    model, x, y, loss_fn = case.model, case.x, case.y, case.loss_fn
    kind, codegen, *rest = args.config.split("-")
    strategy = rest[0] if rest else "auto"
    if kind == "np":
        run = model if codegen == "eager" else torch.compile(model)
    else:
        run = grapefx.compile(
            model,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            loss_reduction="mean",
            codegen=codegen,
            strategy=strategy,
            clipping="flat",
        )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(run(x), y)
        loss.backward()
        opt.step()
        return loss

    gc.collect()
    rss0 = _rss_bytes()
    res["rss_before_first_step_bytes"] = rss0
    times = []
    losses = []
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(float(step().detach()))
        times.append(time.perf_counter() - t0)
    res["compile_s"] = times[0] if times else None
    res["warmup_s"] = times
    hwm_after_warmup = _vm_hwm_bytes()
    res["drss_incl_compile_bytes"] = (hwm_after_warmup or _ru_maxrss_bytes()) - rss0
    res["rss_after_warmup_bytes"] = _rss_bytes()
    reset_ok = _reset_hwm() and _vm_hwm_bytes() is not None
    res["rss_method"] = "VmHWM after clear_refs=5 (timed steps only)" if reset_ok else "ru_maxrss (includes compile)"

    step_s, cpu_s = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(float(step().detach()))
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
    peak_rss = _vm_hwm_bytes() if reset_ok else _ru_maxrss_bytes()
    res["step_s"] = step_s
    res["ms_per_step"] = 1e3 * statistics.median(step_s)
    res["cpu_s"] = cpu_s
    res["cpu_ms_per_step"] = 1e3 * statistics.median(cpu_s)
    res["peak_rss_bytes"] = peak_rss
    res["drss_bytes"] = peak_rss - rss0
    res["drss_steady_bytes"] = peak_rss - res["rss_after_warmup_bytes"]  # peak over the post-warmup RSS
    res["losses"] = losses

    grads_ok = all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.requires_grad
    )
    res["grads_finite"] = grads_ok
    if kind == "gx":
        assert grads_ok, "grapefx left a missing or non-finite p.grad"

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            step()
        res["prof"] = profiler_memory_peak(prof)
        del prof
    if args.op_table:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        res["op_table"] = table
        res["op_table_total_self_cpu_ms"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    return res


# ----------------------------------------------------------------------------------------------
# orchestrator
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--short").splitlines()}


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_one(model: str, config: str, warmup: int, steps: int, opts: argparse.Namespace, op_table: bool = False) -> dict:
    fd, out_path = tempfile.mkstemp(prefix="grapefx-bench-", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--model", model, "--config", config, "--warmup", str(warmup), "--steps", str(steps),
        "--gpt-pos", opts.gpt_pos, "--cnn-pool", opts.cnn_pool, "--json-out", out_path,
    ]  # fmt: skip
    if opts.no_profile:
        cmd.append("--no-profile")
    if op_table:
        cmd.append("--op-table")
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(opts.cache_dir))
    load_before = _loadavg()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=opts.timeout)
        rc, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = "timeout", (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
    wall = time.perf_counter() - t0
    try:
        with open(out_path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError):
        res = {"model": model, "config": config}
    finally:
        os.unlink(out_path)
    if "error" not in res and rc != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "USDT" not in ln]
        res["error"] = f"worker exited with {rc}: " + (lines[-1] if lines else "")
        res["stderr_tail"] = "\n".join(lines[-40:])
    res.update(wall_s=wall, loadavg_before=load_before, loadavg_after=_loadavg())
    return res


def _mb(b):
    return None if b is None else b / 2**20


def summarize(runs: list[dict], models: list[str], configs: list[str]) -> dict:
    """Per (model, config): median over rounds of the per-round numbers and of the ratios to
    non-private eager (and to non-private inductor) of the same round."""
    out: dict = {}
    for m in models:
        for c in configs:
            rs = [r for r in runs if r["model"] == m and r["config"] == c]
            errs = [r["error"] for r in rs if "error" in r]
            ok = [r for r in rs if "error" not in r]
            row: dict = {"model": m, "config": c, "n_rounds_ok": len(ok), "errors": errs}
            if ok:
                row["ms_per_step"] = statistics.median(r["ms_per_step"] for r in ok)
                if all("cpu_ms_per_step" in r for r in ok):
                    row["cpu_ms_per_step"] = statistics.median(r["cpu_ms_per_step"] for r in ok)
                row["drss_mb"] = statistics.median(_mb(r["drss_bytes"]) for r in ok)
                row["compile_s_first_round"] = ok[0]["compile_s"]
                row["compile_s"] = [r["compile_s"] for r in ok]
                if all("prof" in r for r in ok):
                    row["prof_mb"] = statistics.median(_mb(r["prof"]["peak_bytes"]) for r in ok)
                for base, key in (("np-eager", "x_np"), ("np-inductor", "x_npind")):
                    ratios: dict = {"time": [], "cpu": [], "drss": [], "prof": []}
                    for r in ok:
                        b = next(
                            (q for q in runs if q["model"] == m and q["config"] == base
                             and q["round"] == r["round"] and "error" not in q),
                            None,
                        )  # fmt: skip
                        if b is None:
                            continue
                        ratios["time"].append(r["ms_per_step"] / b["ms_per_step"])
                        if "cpu_ms_per_step" in r and "cpu_ms_per_step" in b:
                            ratios["cpu"].append(r["cpu_ms_per_step"] / b["cpu_ms_per_step"])
                        ratios["drss"].append(r["drss_bytes"] / max(b["drss_bytes"], 1))
                        if "prof" in r and "prof" in b:
                            ratios["prof"].append(r["prof"]["peak_bytes"] / max(b["prof"]["peak_bytes"], 1))
                    row[key] = {k: (statistics.median(v) if v else None) for k, v in ratios.items()}
                    row[key + "_per_round"] = ratios
            out[f"{m}/{c}"] = row
    return out


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def _target_str(m: str, c: str, row: dict) -> str:
    if not c.startswith("gx") or "x_np" not in row:
        return ""
    t_max, m_max = TARGETS.get(m, (1.15, 1.10))
    x = row["x_np"]
    parts = []
    for label, v, lim in (
        ("t", x["time"], t_max),
        ("cpu", x.get("cpu"), t_max),
        ("rss", x["drss"], m_max),
        ("prof", x["prof"], m_max),
    ):
        if v is not None:
            parts.append(f"{label}{'✓' if v <= lim else '✗'}")
    return " ".join(parts) + f" (≤{t_max}/{m_max})"


def write_markdown(
    path: Path, meta: dict, summary: dict, models: list[str], configs: list[str], runs: list[dict]
) -> None:
    L = []
    L.append(f"# grapefx benchmark — {meta['machine']}{' (quick)' if meta['quick'] else ''}")
    L.append("")
    L.append(
        f"{meta['date']} · torch {meta['torch']} · {meta['cpu_model']} · {meta['nproc']} cores · 1 torch thread · "
        f"{meta['rounds']} round(s), fresh process per run, order reversed every other round · "
        f"flat clipping C=1, σ=1, mean loss, SGD · GPT pos={meta['gpt_pos']}, CNN pool={meta['cnn_pool']}"
    )
    L.append(f"Load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}.")
    g = meta.get("git", {})
    if g.get("commit"):
        dirty = f" + {len(g['dirty_files'])} uncommitted file(s)" if g.get("dirty_files") else ""
        L.append(f"grapefx at {g['commit'][:10]}{dirty}; command: `{meta['command']}`.")
    L.append("")
    L.append(
        "`ms/step` median of fwd+bwd+SGD step · `dRSS` peak RSS during timed steps − RSS before the first step · "
        "`prof` peak bytes of tensors allocated within one step (profiler) · `×np` ratio to non-private eager, "
        "same round (median over rounds) · `cpu ms` median process CPU time per step (less sensitive to other "
        "processes on a busy machine than wall time) · `×ind` ratio to non-private torch.compile · "
        "`compile s` first step of round 1 (cold Inductor cache; later rounds in JSON)."
    )
    L.append("")
    L.append(
        "| model | config | ms/step | ×np | ×ind | cpu ms | ×np | dRSS MB | ×np | prof MB | ×np | compile s | target |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for c in configs:
            row = summary[f"{m}/{c}"]
            if not row["n_rounds_ok"]:
                err = row["errors"][0] if row["errors"] else "no result"
                L.append(f"| {m} | {c} | FAIL: {err[:160].replace('|', '/')} | | | | | | | | | | |")
                continue
            x = row.get("x_np", {})
            xi = row.get("x_npind", {})
            L.append(
                f"| {m} | {c} | {_fmt(row['ms_per_step'])} | {_fmt(x.get('time'), 2)} | {_fmt(xi.get('time'), 2)} | "
                f"{_fmt(row.get('cpu_ms_per_step'))} | {_fmt(x.get('cpu'), 2)} | "
                f"{_fmt(row['drss_mb'])} | {_fmt(x.get('drss'), 2)} | {_fmt(row.get('prof_mb'))} | "
                f"{_fmt(x.get('prof'), 2)} | {_fmt(row['compile_s_first_round'])} | {_target_str(m, c, row)} |"
            )
    L.append("")
    L.append("Per-round ms/step (load average before the run):")
    L.append("")
    for m in models:
        parts = []
        for c in configs:
            rs = [r for r in runs if r["model"] == m and r["config"] == c]
            vals = ", ".join(
                "FAIL"
                if "error" in r
                else f"{r['ms_per_step']:.1f} ({r['loadavg_before'][0] if r['loadavg_before'] else '?'})"
                for r in rs
            )
            parts.append(f"{c}: {vals}")
        L.append(f"- {m}: " + "; ".join(parts))
    errors = [(r["model"], r["config"], r["round"], r["error"]) for r in runs if "error" in r]
    if errors:
        L.append("")
        L.append("Errors:")
        L.append("")
        for m, c, rd, e in errors:
            L.append(f"- {m} {c} round {rd}: `{e[:400]}`")
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke: M1 + small GPT, tiny step counts, 1 round")
    ap.add_argument("--models", help="comma list of M1,M2,M3,M4,GPT-S")
    ap.add_argument("--configs", help=f"comma list (default {','.join(BASE_CONFIGS)}); gx-<codegen>[-<strategy>]")
    ap.add_argument("--strategies", default="", help="add gx-eager-<s> and gx-inductor-<s> for s in this list")
    ap.add_argument("--rounds", type=int, help="default 2 (full) / 1 (quick)")
    ap.add_argument("--warmup", type=int, help="override warmup steps for every model")
    ap.add_argument("--steps", type=int, help="override timed steps for every model")
    ap.add_argument("--machine", default=f"cpu-{os.cpu_count()}c", help="name in the output files")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    ap.add_argument("--gpt-pos", default="embedding", choices=["param", "embedding"])
    ap.add_argument("--cnn-pool", default="max", choices=["stride", "max"])
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler memory step")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the Inductor cache of an earlier bench run")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per run")
    ap.add_argument(
        "--op-profile",
        metavar="MODEL:CONFIG",
        help="only profile one step of MODEL:CONFIG (op table, top 15 by self CPU)",
    )
    ap.add_argument("--no-profile-worst", action="store_true", help="full mode: skip the op table of the worst gx run")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    ap.add_argument("--op-table", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        try:
            res = worker(args)
        except BaseException as e:  # noqa: B036 - report every failure to the parent
            res = {
                "model": args.model, "config": args.config,
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                "error_full": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
            }  # fmt: skip
        with open(args.json_out, "w") as f:
            json.dump(res, f)
        sys.exit(1 if "error" in res else 0)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir = out_dir / "tmp" / f"inductor-cache-{args.machine}"
    if not args.keep_cache and args.cache_dir.exists():
        shutil.rmtree(args.cache_dir)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    steps_table = QUICK_STEPS if args.quick else FULL_STEPS

    def steps_for(m):
        w, n = steps_table[m]
        return (args.warmup if args.warmup is not None else w), (args.steps if args.steps is not None else n)

    if args.op_profile:
        m, c = args.op_profile.split(":", 1)
        w, n = steps_for(m)
        r = run_one(m, c, w, min(n, 2), args, op_table=True)
        name = out_dir / f"profile-{args.machine}-{m}-{c}.txt"
        name.write_text(r.get("op_table", r.get("error", "no result")) + "\n")
        print(r.get("op_table", r.get("error")))
        print(f"wrote {name}")
        return

    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    configs = args.configs.split(",") if args.configs else list(BASE_CONFIGS)
    for s in filter(None, args.strategies.split(",")):
        configs += [f"gx-eager-{s}", f"gx-inductor-{s}"]
    if "np-eager" not in configs:
        configs.insert(0, "np-eager")
    rounds = args.rounds or (1 if args.quick else 2)

    import torch

    meta = {
        "machine": args.machine, "quick": args.quick, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(), "torch_threads": 1, "rounds": rounds, "models": models, "configs": configs,
        "steps": {m: steps_for(m) for m in models}, "gpt_pos": args.gpt_pos, "cnn_pool": args.cnn_pool,
        "privacy": {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "loss_reduction": "mean", "clipping": "flat"},
        "optimizer": "SGD lr=1e-3", "loadavg_start": _loadavg(), "command": " ".join(sys.argv),
        "git": _git_state(),
        "inductor_cache": "fresh at start (round 1 compiles cold)" if not args.keep_cache else "kept",
    }  # fmt: skip
    del torch
    print(f"bench: models={models} configs={configs} rounds={rounds} load={meta['loadavg_start']}", flush=True)
    runs: list[dict] = []
    t_start = time.perf_counter()
    for m in models:
        w, n = steps_for(m)
        for rd in range(rounds):
            order = configs if rd % 2 == 0 else configs[::-1]
            for c in order:
                r = run_one(m, c, w, n, args)
                r["round"] = rd
                runs.append(r)
                if "error" in r:
                    msg = f"FAIL {r['error'][:300]}"
                else:
                    prof = f" prof {_mb(r['prof']['peak_bytes']):.1f} MB" if "prof" in r else ""
                    msg = (
                        f"{r['ms_per_step']:.1f} ms/step, dRSS {_mb(r['drss_bytes']):.1f} MB{prof}, "
                        f"compile {r['compile_s']:.1f} s"
                    )
                print(
                    f"[{time.perf_counter() - t_start:6.0f}s] {m} r{rd} {c:24s} {msg} "
                    f"(wall {r['wall_s']:.0f}s, load {r['loadavg_before'][:1]})",
                    flush=True,
                )
    meta["loadavg_end"] = _loadavg()
    meta["total_s"] = time.perf_counter() - t_start
    summary = summarize(runs, models, configs)

    worst = None
    if not args.quick and not args.no_profile_worst:
        # worst = largest (time ratio / target); CPU-time ratios when recorded (steadier under load)
        cands = [
            (
                (row["x_np"].get("cpu") or row["x_np"]["time"]) / TARGETS.get(row["model"], (1.15, 1.1))[0],
                row["model"],
                row["config"],
            )
            for row in summary.values()
            if row["config"].startswith("gx") and row.get("x_np", {}).get("time")
        ]
        if cands:
            score, m, c = max(cands)
            if score > 1.0:
                w, _ = steps_for(m)
                print(f"profiling the worst grapefx run vs target: {m} {c}", flush=True)
                r = run_one(m, c, w, 1, args, op_table=True)
                worst = {"model": m, "config": c, "op_table": r.get("op_table"), "error": r.get("error")}
                (out_dir / f"profile-{args.machine}-{m}-{c}.txt").write_text(
                    (r.get("op_table") or str(r.get("error"))) + "\n"
                )
    suffix = "-quick" if args.quick else ""
    jpath = out_dir / f"bench-{args.machine}{suffix}.json"
    mpath = out_dir / f"bench-{args.machine}{suffix}.md"
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs, "worst_profile": worst}, f, indent=1)
    write_markdown(mpath, meta, summary, models, configs, runs)
    if worst and worst.get("op_table"):
        with open(mpath, "a") as f:
            f.write(f"\nOne step of the worst grapefx run vs target ({worst['model']} {worst['config']}), ")
            f.write("torch.profiler, top 15 ops by self CPU time:\n\n```\n" + worst["op_table"] + "\n```\n")
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath} in {meta['total_s']:.0f}s")
    n_err = sum("error" in r for r in runs)
    sys.exit(1 if n_err and args.quick else 0)


if __name__ == "__main__":
    main()
