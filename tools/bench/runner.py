"""Fresh subprocess per (model, configuration); rounds interleaved, order reversed every other round."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_meta(device: str) -> dict:
    import torch

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": 1,
        "device": device,
        "command": " ".join(["python -m tools.bench", *sys.argv[1:]]),
        "git": {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--short").splitlines()},
        "loadavg_start": loadavg(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def run_one(spec: dict, opts, op_table: bool = False) -> dict:  # noqa: ANN001 - argparse namespace
    """Run `spec` (model, config, warmup, steps, [batch, seq]) in a fresh `python -m tools.bench
    --worker` process; returns its result dict (with `error` when it failed)."""
    fd, out_path = tempfile.mkstemp(prefix="grapefx-bench-", suffix=".json")
    os.close(fd)
    cmd = [
        sys.executable,
        "-m",
        "tools.bench",
        "--worker",
        json.dumps({**spec, "op_table": op_table}),
        "--json-out",
        out_path,
        "--device",
        opts.device,
        "--gpt-pos",
        opts.gpt_pos,
        "--cnn-pool",
        opts.cnn_pool,
    ]
    if opts.no_profile:
        cmd.append("--no-profile")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(opts.cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    load_before = loadavg()
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
        res = {}
    finally:
        os.unlink(out_path)
    res = {**spec, **res}
    if "error" not in res and rc != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "USDT" not in ln]
        res["error"] = f"worker exited with {rc}: " + (lines[-1] if lines else "")
        res["stderr_tail"] = "\n".join(lines[-40:])
    res.update(wall_s=wall, loadavg_before=load_before, loadavg_after=loadavg())
    return res


def _line(r: dict) -> str:
    if "error" in r:
        return f"FAIL {r['error'][:300]}"
    prof = f" prof {r['prof']['peak_bytes'] / 2**20:.1f} MB" if "prof" in r else ""
    return (
        f"{r['ms_per_step']:.1f} ms/step, dRSS {r['drss_bytes'] / 2**20:.1f} MB{prof}, compile {r['compile_s']:.1f} s"
    )


def interleaved(groups: Iterable[list[dict]], rounds: int, opts, log=print, partial: Path | None = None) -> list[dict]:  # noqa: ANN001
    """Each group (the configurations of one model / one sweep point) runs `rounds` times back to back,
    reversed in odd rounds, so drift cancels in same-round ratios. Returns every run with `round`; each
    is also appended to `partial` (JSON lines) as it finishes, so an interrupted run can be reported
    (`--report-partial`)."""
    runs: list[dict] = []
    t_start = time.perf_counter()
    for group in groups:
        for rd in range(rounds):
            for spec in group if rd % 2 == 0 else group[::-1]:
                r = run_one(spec, opts)
                r["round"] = rd
                runs.append(r)
                if partial is not None:
                    with open(partial, "a") as f:
                        f.write(json.dumps(r) + "\n")
                where = spec["model"] + "".join(
                    f" {n}={spec[k]}" for k, n in (("batch", "B"), ("seq", "T")) if spec.get(k)
                )
                log(
                    f"[{time.perf_counter() - t_start:6.0f}s] {where} r{rd} {spec['config']:22s} {_line(r)} "
                    f"(wall {r['wall_s']:.0f}s, load {r['loadavg_before'][:1]})",
                    flush=True,
                )
    return runs
