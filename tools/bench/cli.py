"""Command line of `python -m tools.bench`: the suite, the scaling sweeps, one op profile, a worker."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from tools.bench import report, runner

ROOT = runner.ROOT
CORE = [
    "np-eager",
    "np-inductor",
    "gx-eager",
    "gx-inductor",
    "gx-eager-ghost",
    "gx-eager-instantiate",
    "gx-eager-perlayer",
    "gx-eager-grape16",
    "gx-eager-grape64",
    "opacus-hooks",
    "opacus-ghost",
    "func-vmap",
]
NO_GRAPE = ("M2",)  # no Linear-type weight with both sides > rank: GRAPE would be BK
FULL_MODELS = ["M1", "M2", "M3", "M4", "H", "ViT"]
QUICK_MODELS = ["M1", "GPT-S"]
FULL_STEPS = {
    "M1": (3, 20),
    "M2": (3, 10),
    "M3": (2, 4),
    "M3C": (2, 4),
    "DC": (2, 4),
    "M4": (2, 4),
    "H": (2, 4),
    "ViT": (2, 4),
    "GPT-S": (3, 20),
    "L": (2, 4),
    "MoE": (2, 5),
    "HFL4": (2, 6),
    "HFL16": (2, 4),
    "HFL32": (2, 4),
    "MoE-bmm": (2, 5),
    "MoE-masked": (2, 5),
}
QUICK_STEPS = {
    "M1": (2, 3),
    "M2": (2, 2),
    "M3": (1, 2),
    "M3C": (1, 2),
    "DC": (1, 2),
    "M4": (1, 2),
    "H": (1, 2),
    "ViT": (1, 2),
    "GPT-S": (2, 3),
    "L": (1, 2),
    "MoE": (1, 2),
    "HFL4": (1, 2),
    "HFL16": (1, 2),
    "HFL32": (1, 2),
    "MoE-bmm": (1, 2),
    "MoE-masked": (1, 2),
}
SCALING_CONFIGS = ["np-eager", "gx-eager", "opacus-ghost", "opacus-hooks"]


def _args(argv: list[str] | None) -> argparse.Namespace:
    from tools.bench.__main__ import __doc__ as doc

    ap = argparse.ArgumentParser(
        prog="python -m tools.bench", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke: M1 + GPT-S, few steps, 1 round")
    ap.add_argument("--models", help=f"comma list of {','.join(FULL_MODELS)},GPT-S")
    ap.add_argument("--configs", help=f"comma list (default: {','.join(CORE)})")
    ap.add_argument("--strategies", default="", help="add gx-inductor-<s> for each s (ghost,instantiate,perlayer,...)")
    ap.add_argument("--rounds", type=int, help="default 2 (full) / 1 (quick)")
    ap.add_argument("--warmup", type=int, help="override warmup steps for every model")
    ap.add_argument("--steps", type=int, help="override timed steps for every model")
    ap.add_argument("--scaling", action="store_true", help="also run the B and T sweeps on the GPT config")
    ap.add_argument("--scaling-only", action="store_true", help="only the sweeps")
    ap.add_argument("--scaling-configs", default=",".join(SCALING_CONFIGS))
    ap.add_argument("--scaling-steps", type=int, default=3, help="timed steps per sweep point")
    ap.add_argument("--scaling-rounds", type=int, default=1)
    ap.add_argument("--sweeps", help="comma list of batch,seq (default both)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--machine", help="name in the output files (default cpu-<ncores>c / the GPU's name)")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    ap.add_argument("--gpt-pos", default="embedding", choices=["param", "embedding"])
    ap.add_argument("--cnn-pool", default="max", choices=["stride", "max"])
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler memory step")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the Inductor cache of an earlier run")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per run")
    ap.add_argument("--no-profile-worst", action="store_true", help="full mode: skip the worst miss's op table")
    ap.add_argument("--scaling-from", metavar="JSON", help="only: re-render a scaling-*.json (tables, plot)")
    ap.add_argument("--report-partial", metavar="JSONL", help="only: tables of an interrupted run's .partial.jsonl")
    ap.add_argument("--op-profile", metavar="MODEL:CONFIG", help="only: one step's op table of MODEL:CONFIG")
    ap.add_argument("--batch", type=int, help="with --op-profile: override the model's batch size")
    ap.add_argument("--seq", type=int, help="with --op-profile: override the decoder's sequence length")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one run
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _worker(args: argparse.Namespace) -> None:
    from tools.bench import worker

    spec = json.loads(args.worker)
    try:
        res = worker.run(
            spec["model"],
            spec["config"],
            spec["warmup"],
            spec["steps"],
            device=args.device,
            batch=spec.get("batch"),
            seq=spec.get("seq"),
            gpt_pos=args.gpt_pos,
            cnn_pool=args.cnn_pool,
            profile_memory=not args.no_profile,
            op_table=spec.get("op_table", False),
        )
    except BaseException as e:  # noqa: B036 - report every failure to the parent
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res = {"error": f"{type(e).__name__}: {first}", "traceback": traceback.format_exc()}
    with open(args.json_out, "w") as f:
        json.dump(res, f)
    sys.exit(1 if "error" in res else 0)


def _configs_for(model: str, configs: list[str]) -> list[str]:
    return [c for c in configs if not (model in NO_GRAPE and "-grape" in c)]


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.worker:
        return _worker(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if args.machine is None:
        gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
        args.machine = gpu.replace(" ", "-").lower() if gpu else f"cpu-{os.cpu_count()}c"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir = out_dir / "tmp" / f"inductor-cache-{args.machine}"
    if not args.keep_cache and args.cache_dir.exists():
        shutil.rmtree(args.cache_dir)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    table = QUICK_STEPS if args.quick else FULL_STEPS

    def steps_for(m: str) -> tuple[int, int]:
        w, n = table[m]
        return (w if args.warmup is None else args.warmup), (n if args.steps is None else args.steps)

    if args.op_profile:
        m, c = args.op_profile.split(":", 1)
        w, _ = steps_for(m)
        spec = {"model": m, "config": c, "warmup": w, "steps": 1, "batch": args.batch, "seq": args.seq}
        r = runner.run_one(spec, args, op_table=True)
        text = r.get("op_table") or r.get("error", "no result")
        shape = "".join(f"-{n}{v}" for n, v in (("B", args.batch), ("T", args.seq)) if v)
        (out_dir / f"profile-{args.machine}-{m}{shape}-{c}-op.txt").write_text(text + "\n")
        print(text)
        return None
    if args.scaling_from:  # same measurements, rendered again (e.g. after a change to the report)
        from tools.bench import scaling

        d = json.loads(Path(args.scaling_from).read_text())
        print(scaling.render(d["meta"], d["runs"], Path(args.scaling_from).with_suffix(""))["md"].read_text())
        return None
    if args.report_partial:
        return _report_partial(args, Path(args.report_partial), steps_for)
    meta = {**runner.machine_meta(args.device), "machine": args.machine, "quick": args.quick}
    failed = 0
    if not args.scaling_only:
        failed += _suite(args, meta, out_dir, steps_for)
    if args.scaling or args.scaling_only:
        res = __import__("tools.bench.scaling", fromlist=["run"]).run(
            args, args.scaling_configs.split(","), meta, out_dir
        )
        print(res["md"].read_text())
        failed += res["errors"]
    sys.exit(1 if failed and args.quick else 0)


def _suite(args: argparse.Namespace, meta: dict, out_dir: Path, steps_for) -> int:  # noqa: ANN001
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    configs = args.configs.split(",") if args.configs else list(CORE)
    configs += [f"gx-inductor-{s}" for s in filter(None, args.strategies.split(","))]
    if report.BASE not in configs:
        configs.insert(0, report.BASE)
    rounds = args.rounds or (1 if args.quick else 2)
    meta.update(
        rounds=rounds,
        models=models,
        configs=configs,
        steps={m: steps_for(m) for m in models},
        gpt_pos=args.gpt_pos,
        cnn_pool=args.cnn_pool,
    )
    print(f"bench: models={models} configs={configs} rounds={rounds} load={meta['loadavg_start']}", flush=True)
    t0 = time.perf_counter()
    groups = [
        [
            {"model": m, "config": c, "warmup": steps_for(m)[0], "steps": steps_for(m)[1]}
            for c in _configs_for(m, configs)
        ]
        for m in models
    ]
    stem = out_dir / f"bench-suite-{args.machine}{'-quick' if args.quick else ''}"
    partial = stem.with_suffix(".partial.jsonl")
    partial.write_text(json.dumps({"meta": meta}) + "\n")
    runs = runner.interleaved(groups, rounds, args, partial=partial)
    meta.update(loadavg_end=runner.loadavg(), total_s=time.perf_counter() - t0)
    _write_suite(args, meta, runs, stem, steps_for)
    partial.unlink()
    return sum("error" in r for r in runs)


def _report_partial(args: argparse.Namespace, path: Path, steps_for) -> None:  # noqa: ANN001
    """Render the tables of an interrupted suite run from its JSON lines (rounds as far as they got)."""
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    meta, runs = lines[0]["meta"], lines[1:]
    args.quick = meta.get("quick", False)
    meta.update(loadavg_end=runner.loadavg(), interrupted=f"{len(runs)} runs recorded before the run stopped")
    stem = path.parent / path.name.replace(".partial.jsonl", "")
    _write_suite(args, meta, runs, stem, steps_for)


def _write_suite(args: argparse.Namespace, meta: dict, runs: list[dict], stem: Path, steps_for) -> None:  # noqa: ANN001
    out_dir, models, configs = stem.parent, meta["models"], meta["configs"]
    summary = report.summarize(runs)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    md = report.markdown(meta, summary, models, configs, runs)
    worst = None if args.quick or args.no_profile_worst else report.worst_missed(summary)
    if worst:  # where the time goes in the worst miss: one step's op table
        m, c = worst
        print(f"profiling the worst time-target miss: {m} {c}", flush=True)
        r = runner.run_one({"model": m, "config": c, "warmup": steps_for(m)[0], "steps": 1}, args, op_table=True)
        text = r.get("op_table") or r.get("error", "no result")
        (out_dir / f"profile-{args.machine}-{m}-{c}-suite.txt").write_text(text + "\n")
        md += f"\nOne step of the worst time-target miss ({m} {c}), torch.profiler, top ops by self time:\n\n"
        md += "```\n" + text + "\n```\n"
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and .md")
