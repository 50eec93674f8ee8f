"""The memory scheduler's effect on the private backward: estimated and measured peaks.

    python tools/bench_memory.py                      # M3 and M4, BK and GRAPE r16, balanced + min-memory
    python tools/bench_memory.py --models GPT-S --quick

For every (model, strategy, policy) the model is compiled with grapefx (noise off), one step runs,
and the next backward's inputs are captured. Three graphs are then replayed alone on those same
inputs (AOTAutograd gives the private backward the same inputs as the non-private one):
  non-private  the backward graph AOTAutograd produced (what grapefx receives),
  unscheduled  the private backward as traced by privatize_backward (before the scheduler),
  scheduled    the private backward grapefx runs (reordered, swaps per policy).
Each peak is estimated (grapefx.schedule.liveness, static) and measured (torch.profiler memory
events while the graph runs eagerly with boxed inputs: grapefx.schedule.measure). Ratios are to the
non-private backward's peak of the same kind. Eager graphs: Inductor fuses elementwise chains and
has its own buffer planning, so its peaks differ.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from models import make_case  # noqa: E402

import grapefx  # noqa: E402
from grapefx.passes import schedule_memory  # noqa: E402
from grapefx.schedule import MemoryModel  # noqa: E402
from grapefx.schedule.measure import measured_peak  # noqa: E402

MiB = 2**20
schedule_memory.KEEP_TRACED_GRAPH = True  # the "unscheduled" graph below


def run_one(model_name: str, strategy: str, policy: str) -> dict:
    case = make_case(model_name)
    pm = grapefx.compile(
        case.model, noise_multiplier=0.0, strategy=strategy, rank=16, memory_policy=policy, loss_reduction="mean"
    )
    t0 = time.perf_counter()
    case.loss_fn(pm(case.x), case.y).backward()
    compile_s = time.perf_counter() - t0
    backend = pm.grapefx_backend
    backend.capture_backward_inputs = True
    case.model.zero_grad(set_to_none=True)
    case.loss_fn(pm(case.x), case.y).backward()
    inputs = backend.captured_inputs
    backend.captured_inputs = None
    plan = backend.plans[-1].memory
    graphs = {
        "non_private": backend.graphs["backward_original"],
        "unscheduled": plan.traced_graph,
        "scheduled": backend.graphs["backward"],
    }
    row: dict = {"model": model_name, "strategy": strategy, "policy": policy, "compile_s": round(compile_s, 2)}
    for key, gm in graphs.items():
        clones = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        row[f"{key}_est_mib"] = MemoryModel.of(gm).simulate().peak_bytes / MiB
        row[f"{key}_meas_mib"] = measured_peak(gm, clones) / MiB
    for kind in ("est", "meas"):
        base = row[f"non_private_{kind}_mib"]
        for key in ("unscheduled", "scheduled"):
            row[f"{key}_{kind}_ratio"] = round(row[f"{key}_{kind}_mib"] / base, 4)
    row["ghost_swaps"] = plan.ghost_swaps
    row["instantiated"] = plan.instantiated
    row["recomputed"] = plan.recomputed
    row["order"] = plan.order_method
    row["notes"] = plan.notes
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Memory scheduler: peak of the private backward vs the non-private backward",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; command: `{meta['command']}`.",
        "Peaks of the backward graph alone (eager, boxed inputs), estimated (static liveness) and measured",
        "(torch.profiler memory events); ratios to the non-private backward of the same kind.",
        "",
        "| model | strategy | policy | non-private MiB est / meas | unscheduled ×np est / meas "
        "| scheduled ×np est / meas | ghost swaps | instantiated | recomputed | order |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['policy']} | {r['non_private_est_mib']:.1f} / "
            f"{r['non_private_meas_mib']:.1f} | {r['unscheduled_est_ratio']:.3f} / {r['unscheduled_meas_ratio']:.3f} "
            f"| {r['scheduled_est_ratio']:.3f} / {r['scheduled_meas_ratio']:.3f} | "
            f"{len(r['ghost_swaps'])} | {len(r.get('instantiated', []))} | {len(r['recomputed'])} | {r['order']} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="M3,M4")
    ap.add_argument("--strategies", default="auto,grape")
    ap.add_argument("--policies", default="balanced,min-memory")
    ap.add_argument("--quick", action="store_true", help="GPT-S only, balanced")
    ap.add_argument("--out", default=str(ROOT / "results" / "memory-schedule-cpu-2c"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = ["GPT-S"] if args.quick else args.models.split(",")
    policies = ["balanced"] if args.quick else args.policies.split(",")
    rows = []
    for m in models:
        for s in args.strategies.split(","):
            for p in policies:
                row = run_one(m, s, p)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
    meta = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread",
        "torch": torch.__version__,
        "date": _dt.date.today().isoformat(),
        "command": "python tools/bench_memory.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
