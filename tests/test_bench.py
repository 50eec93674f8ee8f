"""The benchmark command (`python -m tools.bench`): a quick run of the smallest model against a peer,
and the scaling fit. Timings are not checked (benchmarks, not timed tests): only that every
configuration runs and the outputs are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~30 s of subprocesses: CI runs it with the slow tests
def test_bench_quick_smallest(tmp_path: Path) -> None:
    """GPT-S, one round: non-private, grapefx (BK), Opacus ghost clipping, torch.func (~40 s)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable,
        "-m",
        "tools.bench",
        "--quick",
        "--models",
        "GPT-S",
        "--configs",
        "np-eager,gx-eager,opacus-ghost,func-vmap",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / f"bench-suite-cpu-{os.cpu_count()}c-quick.json").read_text())
    assert [r.get("error") for r in res["runs"]] == [None] * 4
    rows = res["summary"]
    assert rows["GPT-S/np-eager"]["x_np"]["time"] == 1.0
    for c in ("gx-eager", "opacus-ghost", "func-vmap"):
        row = rows[f"GPT-S/{c}"]
        assert row["time"] > 0 and row["prof"] > 0 and row["x_np"]["time"] > 0 and row["x_og"]["time"] > 0
        assert row["faults"] is not None  # minor page faults per step (0 is possible)
    md = (tmp_path / f"bench-suite-cpu-{os.cpu_count()}c-quick.md").read_text()
    assert "| GPT-S | opacus-ghost |" in md and res["meta"]["torch"] and res["meta"]["cpu_model"]


@pytest.mark.slow  # two cold compiles in subprocesses (~20 s)
def test_compile_time_tool(tmp_path: Path) -> None:
    """`python -m tools.compile_time`: both configurations run and the table reports them."""
    stem = tmp_path / "compile-time"
    cmd = [sys.executable, "-m", "tools.compile_time", "--models", "GPT-S", "--configs", "np-aot,gx-eager"]
    proc = subprocess.run([*cmd, "--out", str(stem)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["config"]) for r in rows] == [("GPT-S", "np-aot"), ("GPT-S", "gx-eager")]
    assert all(r["compile_s"] > 0 and r["step_s"] > 0 for r in rows), rows
    assert "| GPT-S | " in stem.with_suffix(".md").read_text()


def test_scaling_slope_fit() -> None:
    from tools.bench.scaling import fit, slope

    assert abs(slope([1, 4, 16, 64], [3 + 2 * x for x in (1, 4, 16, 64)]) - 2.0) < 1e-12
    assert slope([4], [1.0]) is None
    cur = {"np-eager": {"time": [(1, 10.0), (3, 30.0)]}, "gx-eager": {"time": [(1, 12.0), (3, 33.0)]}}
    assert abs(fit(cur)["gx-eager"]["time"]["x_np"] - 1.05) < 1e-12
