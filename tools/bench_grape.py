"""DP-GRAPE memory and time on a parameter-heavy decoder, side by side with non-private Adam.

    python tools/bench_grape.py [--steps 5] [--rounds 2] [--out results/bench-grape-cpu-2c]

Models (--model): "heavy" GPT-style decoder, d 512, 6 layers, 8 heads, vocab 8192, T=64, B=4; "m3" the
core benchmark's decoder (d 256, 4 layers, T=128, B=16); tools/models.GPT with the positional table as
a parameter. Configurations, each in a fresh process, interleaved over rounds:
non-private Adam; grapefx Book-Keeping + Adam; grapefx GRAPE (r = 16, 64) + GrapeAdamW; Opacus
DP-Adam (hooks) when it can run the model. One torch thread.

Memory metric ("total peak"): bytes of model state live at the start of a step (parameters +
optimizer state + any gradients, counted from the tensors themselves) plus the peak of bytes allocated
within the step (torch.profiler memory events). Optimizer state is what GRAPE shrinks, so it must be
counted; the profiler alone sees only allocations inside the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = ("np-adam", "bk-adam", "grape16-adamw", "grape64-adamw", "opacus-adam")


SHAPES = {  # name: (GPT kwargs, B, T)
    "heavy": (dict(vocab=8192, d=512, n_layer=6, heads=8, max_t=64), 4, 64),
    "m3": (dict(vocab=8192, d=256, n_layer=4, heads=4, max_t=128), 16, 128),
}


def _model(name: str) -> torch.nn.Module:
    from models import GPT

    torch.manual_seed(0)
    return GPT(**SHAPES[name][0], pos="param")


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _profiled_peak(step) -> int:  # noqa: ANN001
    """Peak bytes allocated within one step (the allocation events tools/bench.py reads)."""
    from bench import profiler_memory_peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return int(profiler_memory_peak(prof)["peak_bytes"])


def worker(config: str, steps: int, model_name: str = "heavy") -> dict:
    torch.set_num_threads(1)
    import grapefx
    from grapefx.optim import GrapeAdamW

    model = _model(model_name)
    _, B, T = SHAPES[model_name]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 8192, (B, T), generator=g)
    y = torch.randint(0, 8192, (B, T), generator=g)
    fwd = model
    if config == "np-adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    elif config == "bk-adam":
        fwd = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    elif config.startswith("grape"):
        rank = int(config[len("grape") :].split("-")[0])
        fwd = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=1.0, strategy="grape", rank=rank, seed=0)
        opt = GrapeAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    else:
        from opacus import PrivacyEngine

        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B)
        fwd, opt, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )

    def step() -> None:
        out = fwd(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    state = _state_bytes(model, opt)
    peak_in_step = _profiled_peak(step)
    return {
        "config": config,
        "ms_per_step": statistics.median(times) * 1e3,
        "state_bytes": state,
        "peak_in_step_bytes": peak_in_step,
        "total_peak_bytes": state + peak_in_step,
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default="results/bench-grape-cpu-2c")
    ap.add_argument("--model", default="heavy", choices=sorted(SHAPES), help="heavy: d512 6 layers T=64 B=4; m3")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.model)))
        return
    configs = args.configs.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:
            cmd = [sys.executable, __file__, "--worker", c, "--steps", str(args.steps), "--model", args.model]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else ""
            if not line.startswith("{"):
                err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                runs[c].append({"config": c, "error": err})
                print(f"round {r} {c}: FAIL {err}", flush=True)
                continue
            runs[c].append(json.loads(line))
            print(f"round {r} {c}: {runs[c][-1]}", flush=True)
    base = [x for x in runs.get("np-adam", []) if "error" not in x]
    base_t = statistics.median(x["ms_per_step"] for x in base) if base else float("nan")
    base_m = statistics.median(x["total_peak_bytes"] for x in base) if base else float("nan")
    kw, B, T = SHAPES[args.model]
    lines = [
        f"# DP-GRAPE on a GPT-style decoder ({args.model}: d {kw['d']}, {kw['n_layer']} layers, vocab 8192, "
        f"T={T}, B={B}), 1 torch thread",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · torch {torch.__version__} · {args.rounds} rounds, fresh process per run"
        f" · load average at end {os.getloadavg()}",
        "",
        "total peak = parameters + optimizer state + gradients live at step start + peak allocated within the"
        " step (profiler)",
        "",
        "| config | ms/step | ×np | model state MB | in-step peak MB | total peak MB | ×np Adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        ok = [x for x in runs[c] if "error" not in x]
        if not ok:
            lines.append(f"| {c} | FAIL: {runs[c][0]['error'][:120]} | | | | | |")
            continue
        t = statistics.median(x["ms_per_step"] for x in ok)
        st = statistics.median(x["state_bytes"] for x in ok) / 2**20
        pk = statistics.median(x["peak_in_step_bytes"] for x in ok) / 2**20
        tot = statistics.median(x["total_peak_bytes"] for x in ok)
        lines.append(
            f"| {c} | {t:.0f} | {t / base_t:.2f} | {st:.0f} | {pk:.0f} | {tot / 2**20:.0f} | {tot / base_m:.2f} |"
        )
    Path(args.out + ".md").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(runs, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
