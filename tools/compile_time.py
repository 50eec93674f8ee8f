"""What compiling costs: grapefx against torch.compile of the same model, non-private.

    python -m tools.compile_time --models M3,HFL4,HFL16 --configs np-aot,np-inductor,gx-eager,gx-inductor

Each (model, configuration) runs in its own process, one torch thread, with an empty Inductor cache
(a cold compile, what a user's first run pays): the first training step (compiling included) and
the median of the next steps; compile time = first step − a steady step. Configurations are those of
`tools.bench` (`tools/bench/configs.py`) plus `np-aot`: torch.compile(model, backend="aot_eager"),
Dynamo and AOTAutograd without code generation, the part of every configuration grapefx builds on.
Writes `results/compile-time-<machine>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEADY_STEPS = 3


def _worker(model: str, config: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from tools.bench.configs import _optimizer, _plain_step, build
    from tools.models import make_case

    case = make_case(model)
    if config == "np-aot":
        opt = _optimizer(case, case.model.parameters())
        fwd = torch.compile(case.model, backend="aot_eager")
        step = _plain_step(fwd, opt, case, case.x, case.y)
    else:
        step = build(case, config).step
    t0 = time.perf_counter()
    float(step())
    first = time.perf_counter() - t0
    steady = []
    for _ in range(STEADY_STEPS):
        t0 = time.perf_counter()
        float(step())
        steady.append(time.perf_counter() - t0)
    step_s = statistics.median(steady)
    return {"model": model, "config": config, "first_step_s": first, "step_s": step_s, "compile_s": first - step_s}


def _run(model: str, config: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "tools.compile_time", "--worker", model, config]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": model, "config": config, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], configs: list[str]) -> str:
    base = "np-aot" if "np-aot" in configs else configs[0]
    lines = [
        "| model | " + " | ".join(f"{c} compile s (× {base})" for c in configs) + " |",
        "|---|" + "---|" * len(configs),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        ref = by.get(base, {}).get("compile_s")
        cells = []
        for c in configs:
            r = by.get(c, {})
            if "compile_s" not in r:
                cells.append(f"failed: {r.get('error')}")
            else:
                cells.append(f"{r['compile_s']:.1f}" + (f" ({r['compile_s'] / ref:.2f})" if ref else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="M3,HFL4,HFL16")
    ap.add_argument("--configs", default="np-aot,np-inductor,gx-eager,gx-inductor")
    ap.add_argument("--out", default=None, help="results file stem (default results/compile-time-cpu-<n>c)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return
    configs = args.configs.split(",")
    rows = []
    for model in args.models.split(","):
        for config in configs:
            rows.append(_run(model, config))
            print(json.dumps(rows[-1]), flush=True)
    import torch

    stem = Path(args.out or ROOT / "results" / f"compile-time-cpu-{os.cpu_count()}c")
    command = "python -m tools.compile_time " + " ".join(sys.argv[1:])
    meta = {"torch": torch.__version__, "command": command, "time": time.strftime("%Y-%m-%d %H:%M")}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = f"# Compile time, cold Inductor cache\n\n`{meta['command']}` (torch {meta['torch']}, {meta['time']})\n\n"
    md += _table(rows, configs) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
