"""Scaling sweeps on the GPT config (M3's decoder): time and memory as B grows (T=128) and as T grows
(B=4), per configuration; a least-squares line per curve and the ratio of its slope to non-private's."""

from __future__ import annotations

import json
from pathlib import Path

from tools.bench import report, runner

SWEEPS = {  # name -> (the varied key, values, the fixed key and value)
    "batch": ("batch", (1, 4, 16, 64), ("seq", 128)),
    "seq": ("seq", (64, 256, 1024), ("batch", 4)),
}
LETTER = {"batch": "B", "seq": "T"}
QUICK_SWEEPS = {"batch": ("batch", (1, 4, 8), ("seq", 32)), "seq": ("seq", (16, 32, 64), ("batch", 2))}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than 2 points)."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def curves(runs: list[dict], key: str, configs: list[str]) -> dict:
    """config -> metric -> [(x, median y)] over the sweep's points (failed points left out)."""
    summary = report.summarize([{**r, "model": f"{r['model']}@{key}={r[key]}"} for r in runs])
    out: dict = {}
    for c in configs:
        for m in ("time", "cpu", "prof", "drss"):
            pts = sorted(
                (row[key], row[m]) for row in summary.values() if row["config"] == c and row.get(m) is not None
            )
            out.setdefault(c, {})[m] = pts
    return out


def fit(cur: dict) -> dict:
    """Slopes per config and metric, and their ratio to np-eager's."""
    out: dict = {}
    for c, ms in cur.items():
        for m, pts in ms.items():
            s = slope([p[0] for p in pts], [p[1] for p in pts])
            b = slope(
                [p[0] for p in cur.get("np-eager", {}).get(m, [])], [p[1] for p in cur.get("np-eager", {}).get(m, [])]
            )
            out.setdefault(c, {})[m] = {
                "slope": s,
                "x_np": (s / b) if (s is not None and b) else None,
                "points": len(pts),
            }
    return out


def plot(all_curves: dict, sweeps: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (sweep, cur) in enumerate(all_curves.items()):
        key, _, (fixed_k, fixed_v) = sweeps[sweep]
        for row, (m, label) in enumerate((("time", "ms / step"), ("prof", "peak MB allocated in a step"))):
            ax = axes[row][col]
            for c, ms in cur.items():
                pts = ms[m]
                if pts:
                    ys = [p[1] / (1 if m == "time" else 2**20) for p in pts]
                    ax.plot([p[0] for p in pts], ys, marker="o", label=c)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{LETTER[key]} ({LETTER[fixed_k]}={fixed_v})")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(opts, configs: list[str], meta: dict, out_dir: Path, log=print) -> dict:  # noqa: ANN001
    sweeps = QUICK_SWEEPS if opts.quick else SWEEPS
    only = [w for w in (opts.sweeps or "").split(",") if w]
    sweeps = {k: v for k, v in sweeps.items() if not only or k in only}
    # file stem: scaling-<machine>[-quick][-<sweep>] (a single sweep gets its own files)
    file_stem = f"scaling-{opts.machine}{'-quick' if opts.quick else ''}" + (
        "".join(f"-{k}" for k in sweeps) if only else ""
    )
    model = "GPT-S" if opts.quick else "M3"
    warmup, steps = (1, 2) if opts.quick else (1, opts.scaling_steps)
    runs: list[dict] = []
    for name, (key, values, (fk, fv)) in sweeps.items():
        groups = [
            [
                {"model": model, "config": c, "warmup": warmup, "steps": steps, key: v, fk: fv, "sweep": name}
                for c in configs
            ]
            for v in values
        ]
        partial = out_dir / f"{file_stem}.partial.jsonl"
        runs += runner.interleaved(groups, opts.scaling_rounds, opts, log=log, partial=partial)
    meta = {
        **meta,
        "loadavg_end": runner.loadavg(),
        "model": model,
        "sweeps": sweeps,
        "configs": configs,
        "warmup": warmup,
        "steps": steps,
        "rounds": opts.scaling_rounds,
    }
    stem = out_dir / file_stem
    res = render(meta, runs, stem)
    partial.unlink(missing_ok=True)
    return res


def render(meta: dict, runs: list[dict], stem: Path) -> dict:
    """Curves, fits, plot, JSON and markdown of a sweep's runs (`--scaling-from` re-renders a JSON)."""
    sweeps, configs, model, quick = meta["sweeps"], meta["configs"], meta["model"], meta.get("quick")
    all_curves = {
        name: curves([r for r in runs if r["sweep"] == name], key, configs) for name, (key, _, _) in sweeps.items()
    }
    fits = {name: fit(cur) for name, cur in all_curves.items()}
    title = f"grapefx scaling on {model}'s decoder — {meta['machine']}, torch {meta['torch']}, {meta['date'][:10]}"
    plot(all_curves, sweeps, stem.with_suffix(".png"), title)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "curves": all_curves, "fits": fits, "runs": runs}, indent=1)
    )
    L = report.header(meta, f"Scaling — {model}'s decoder, {meta['machine']}{' (quick)' if quick else ''}")
    L += [
        f"Plot: `{stem.with_suffix('.png').name}`. Points: {', '.join(f'{n} {v}' for n, (_, v, _) in sweeps.items())}"
        f"; {meta['warmup']} warmup + {meta['steps']} timed steps per point, fresh process per run. "
        "Slope = least-squares line through (x, median); `×np` = slope / non-private eager's slope "
        "(the issue's target in B: ≤ 1.1). "
        "`cpu` = the same fit of process CPU time per step, less disturbed by other processes on the cores.",
        "",
    ]
    for name, f in fits.items():
        key = sweeps[name][0]
        L += [
            f"| {key} sweep: config | ms/step per unit | ×np | cpu ms per unit | ×np | prof MB per unit | ×np "
            "| points |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c, ms in f.items():
            t, cp, p = ms["time"], ms["cpu"], ms["prof"]
            mb = None if p["slope"] is None else p["slope"] / 2**20
            L.append(
                f"| {c} | {report._f(t['slope'], 2)} | {report._f(t['x_np'], 2)} | {report._f(cp['slope'], 2)} | "
                f"{report._f(cp['x_np'], 2)} | {report._f(mb, 2)} | "
                f"{report._f(p['x_np'], 2)} | {t['points']} |"
            )
        L.append("")
        L += [f"Points ({key}: ms/step, prof MB):", ""]
        for c, ms in all_curves[name].items():
            pts = ", ".join(f"{x}: {y:.0f} ms" for x, y in ms["time"])
            mem = ", ".join(f"{x}: {y / 2**20:.0f}" for x, y in ms["prof"])
            L.append(f"- {c}: {pts} · MB {mem}")
        L.append("")
    errors = [r for r in runs if "error" in r]
    L += [
        f"- FAIL {r['model']} {r['config']} B={r.get('batch')} T={r.get('seq')}: `{r['error'][:300]}`" for r in errors
    ]
    stem.with_suffix(".md").write_text("\n".join(L) + "\n")
    return {"fits": fits, "errors": len(errors), "md": stem.with_suffix(".md")}
