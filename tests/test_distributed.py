"""Data-parallel private training: 2 gloo processes on CPU vs the single-process result on the global batch.

One spawn runs the default 2-rank scenarios (`distributed_worker.py`, ~60 s on 2 cores), another the
slow ones (GRAPE with sum reduction or noise, FSDP2 with noise; -m slow); the tests below check their
results. Single-rank tests (wrapping-order refusals, FSDP) run in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from distributed_worker import SPLITS, C, inductor_worker, mlp, slow_worker, worker

import grapefx
from grapefx.distributed import DistributedSetupError

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = 40 * 24 + 24 + 24 * 32 + 32 + 32 * 5 + 5  # the MLP: 1949
GHAT = 4 * 40 + 32 * 4  # GRAPE rank 4: Ĝ of 0.weight [24, 40] is 4 × 40, of 2.weight [32, 24] is 32 × 4


def _spawn(fn) -> tuple[dict, dict]:  # noqa: ANN001 - a worker function of distributed_worker
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(fn, args=(2, os.path.join(d, "rendezvous"), d, "cpu"), nprocs=2, join=True)
        results = tuple(torch.load(f"{d}/rank{r}.pt", weights_only=False) for r in range(2))
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def ranks() -> tuple[dict, dict]:
    return _spawn(worker)


@pytest.fixture(scope="module")
def slow_ranks() -> tuple[dict, dict]:
    return _spawn(slow_worker)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-12)).item()


def _check_exact(ranks: tuple[dict, dict], key: str, n_steps: int) -> None:
    r0, r1 = ranks[0][key], ranks[1][key]
    assert len(r0["steps"]) == n_steps
    for k, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        assert set(s0["dist"]) == set(s0["ref"]), f"step {k}: {sorted(s0['dist'])} vs {sorted(s0['ref'])}"
        for name, ref in s0["ref"].items():
            assert ref.abs().max() > 0, f"{key} step {k} {name}: the reference must not be trivial"
            assert _rel(s0["dist"][name], ref) < 2e-6, f"{key} step {k} {name}"
            torch.testing.assert_close(s1["dist"][name], s0["dist"][name], rtol=0, atol=0)  # ranks agree


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bk_gradients_equal_single_process_on_global_batch(ranks, reduction: str) -> None:
    """Noise off, flat clipping: every rank's p.grad equals one process on the concatenated batch;
    "mean" steps include a rank with B=1 and ranks with B=0 (other graphs, same collectives)."""
    _check_exact(ranks, f"exact/auto/{reduction}", len(SPLITS) if reduction == "mean" else 2)


def test_two_pass_gradients_equal_single_process_on_global_batch(ranks) -> None:
    """two_pass=True (norms, then the backward replayed with per-sample weighted tangents) under
    data parallelism: the run-time global denominator and rank 0's noise are those of one pass."""
    _check_exact(ranks, "exact/two_pass/mean", len(SPLITS))


def test_group_clipping_gradients_equal_single_process_on_global_batch(ranks) -> None:
    """clipping="group": each group finished on its own, with the run-time global denominator."""
    _check_exact(ranks, "exact/group/mean", len(SPLITS))


def test_grape_gradients_equal_single_process_on_global_batch(ranks) -> None:
    """GRAPE: Ĝ (all-reduced in the backward) and the back-projected p.grad equal the single-process
    ones; the projected weights are left out of DDP's reducer. DDP all-reduces only the dense
    parameters and grapefx the r-dimensional Ĝ plus the global batch size (8 bytes)."""
    _check_grape(ranks, "mean", extra_bytes=8)


@pytest.mark.slow
def test_grape_gradients_with_sum_reduction(slow_ranks) -> None:
    _check_grape(slow_ranks, "sum", extra_bytes=0)


def _check_grape(ranks: tuple[dict, dict], reduction: str, extra_bytes: int) -> None:
    key = f"exact/grape/{reduction}"
    _check_exact(ranks, key, len(SPLITS) if reduction == "mean" else 2)
    assert ranks[0][key]["grape_params"] == ("0.weight", "2.weight")
    assert ranks[0][key]["ignored"] == ["module.0.weight", "module.2.weight"]
    assert {n for n in ranks[0][key]["steps"][0]["dist"] if n.startswith("ghat:")} == {"ghat:0.weight", "ghat:2.weight"}
    dense = 4 * (N_PARAMS - 24 * 40 - 32 * 24)
    for r in range(2):
        for step in ranks[r][key]["steps"]:
            assert (step["ddp_bytes"], step["grapefx_bytes"]) == (dense, 4 * GHAT + extra_bytes)
    assert dense + 4 * GHAT < 0.3 * 4 * N_PARAMS


def test_bytes_communicated_per_step(ranks) -> None:
    """BK: DDP all-reduces every gradient (4 bytes × 1949); an actual-size "mean" adds 8 bytes (the
    global batch size). GRAPE's bytes: test_grape_gradients_*."""
    for r in range(2):
        for step in ranks[r]["exact/auto/sum"]["steps"]:
            assert (step["ddp_bytes"], step["grapefx_bytes"]) == (4 * N_PARAMS, 0)
        for step in ranks[r]["exact/auto/mean"]["steps"]:
            assert (step["ddp_bytes"], step["grapefx_bytes"]) == (4 * N_PARAMS, 8)


def test_noise_is_drawn_once_with_std_sigma_c(ranks) -> None:
    """σ=2, C=0.5, expected global batch 8: the distributed result equals the single-process one with
    the same seed (rank 0 draws the noise, once), and the noise std is σC/8 over 3 steps × 1949
    coordinates (√2 times larger if both ranks drew)."""
    noise = ranks[0]["noise"]
    for k, step in enumerate(noise["noisy"]["steps"]):
        for name, ref in step["ref"].items():
            assert _rel(step["dist"][name], ref) < 2e-6, f"step {k} {name}"
    clean = noise["clean"]["steps"][0]["ref"]
    diffs = torch.cat([(s["dist"][n] - clean[n]).reshape(-1) for s in noise["noisy"]["steps"] for n in clean])
    expected = 2.0 * C / 8
    assert abs(diffs.std().item() / expected - 1) < 0.05, diffs.std().item() / expected
    assert abs(diffs.mean().item()) < 4 * expected / diffs.numel() ** 0.5
    draws = [ranks[r]["noise"]["noisy"]["steps"][-1]["noise_draws"] for r in range(2)]
    assert draws[0] == draws[1] == 3 * 6, "rank 1 counts the draws rank 0 made (the engine's step guard)"


def test_noise_is_reproducible_per_seed(ranks) -> None:
    noise = ranks[0]["noise"]
    first, again = noise["noisy"]["steps"][0]["dist"], noise["again"]["steps"][0]["dist"]
    other = noise["other_seed"]["steps"][0]["dist"]
    for name in first:
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)
    assert all(_rel(other[n], first[n]) > 0.1 for n in first)


@pytest.mark.slow
def test_grape_noise_once_in_projected_space(slow_ranks) -> None:
    """GRAPE with noise: Ĝ and p.grad equal the single-process result with the same seed (also on a
    step where rank 1 has no samples)."""
    for k, step in enumerate(slow_ranks[0]["noise/grape"]["steps"]):
        for name, ref in step["ref"].items():
            assert _rel(step["dist"][name], ref) < 2e-6, f"step {k} {name}"


def test_adaptive_clipping_bound_is_global(ranks) -> None:
    """Adaptive clipping on 2 ranks: the unclipped counts are summed over the ranks (with the count's
    noise drawn once, by rank 0), so both ranks move the bound exactly as one process on the global
    batch does, steps with B=1 and B=0 shards included; gradients equal too."""
    for key, n_steps in (("adaptive/clean", len(SPLITS)), ("adaptive/noisy", 3)):
        _check_exact(ranks, key, n_steps)
        bounds = [ranks[r][key]["bounds"] for r in range(2)]
        assert bounds[0] == bounds[1], key
        assert bounds[0] == pytest.approx(ranks[0][key]["ref_bounds"], rel=1e-12), key
        assert len(set(bounds[0])) == n_steps + 1, f"{key}: the bound must move every step: {bounds[0]}"


def test_distributed_model_outside_ddp_is_refused(ranks) -> None:
    for r in range(2):
        messages = ranks[r]["refusals"]
        assert "outside DistributedDataParallel" in messages["outside_ddp"]
        assert "init_process_group(...) before grapefx.compile" in messages["not_distributed_in_ddp"]
        assert "DistributedDataParallel(grapefx.compile(model" in messages["outside_ddp"]


def test_make_private_shards_poisson_sampling_and_counts_global_steps(ranks) -> None:
    """make_private on 2 ranks, loader batch_size 4 per rank on 64 examples: q = 8/64 (accumulation 3:
    24/64); each rank samples its own shard (examples r, r+2, ...); the accountant counts the same
    global steps at the global q on both ranks; parameters stay identical across ranks; with
    accumulation both ranks run the same number of micro-batches."""
    e0, e1 = ranks[0]["engine"], ranks[1]["engine"]
    for acc, q in ((1, 8 / 64), (3, 24 / 64)):
        a, b = e0[acc], e1[acc]
        assert a["is_ddp"] and a["sample_rate"] == b["sample_rate"] == q
        assert a["expected_batch_size"] == round(q * 64)
        assert a["steps"] == b["steps"] == a["steps_per_epoch"] == round(1 / q)
        assert a["epsilon"] == b["epsilon"] > 0
        assert a["micro_batches"] == b["micro_batches"] >= a["steps"]
        torch.testing.assert_close(a["params"], b["params"], rtol=0, atol=0)
    for r, e in enumerate((e0, e1)):
        drawn = [i for batch in e["indices"] for i in batch]
        assert drawn and all(i % 2 == r for i in drawn)
    sizes = [len(b) for e in (e0, e1) for b in e["indices"]]
    assert 2 <= sum(sizes) / len(e0["indices"]) <= 16  # expected global batch 8


@pytest.mark.slow
def test_inductor_codegen_on_two_ranks() -> None:
    """codegen="inductor" (~2 min): noise off, BK and GRAPE equal one process on the global batch;
    noise on, its std is σC/8 (drawn once). Not bit-identical to the single-process noise of the same
    seed: Inductor may order the per-parameter draws differently in the two graphs."""
    ranks = _spawn(inductor_worker)
    res = ranks[0]["inductor"]
    for strategy in ("auto", "grape"):
        for k, step in enumerate(res[f"exact/{strategy}"]["steps"]):
            for name, ref in step["ref"].items():
                assert _rel(step["dist"][name], ref) < 2e-6, f"{strategy} step {k} {name}"
                torch.testing.assert_close(
                    ranks[1]["inductor"][f"exact/{strategy}"]["steps"][k]["dist"][name],
                    step["dist"][name],
                    rtol=0,
                    atol=0,
                )
    clean = res["clean"]["steps"][0]["dist"]
    diffs = torch.cat([(s["dist"][n] - clean[n]).reshape(-1) for s in res["noisy"]["steps"] for n in clean])
    assert abs(diffs.std().item() / (2.0 * C / 8) - 1) < 0.05


# -- single rank, in this process ------------------------------------------------------------------
@pytest.fixture
def process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Net(nn.Module):  # a user-defined forward: Dynamo compiles it as a frame of its own inside DDP
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_compile_of_ddp_module_is_refused(process_group) -> None:
    with pytest.raises(DistributedSetupError, match=r"DistributedDataParallel\(grapefx.compile\(model"):
        grapefx.compile(nn.parallel.DistributedDataParallel(Net()))


def test_torch_compile_of_ddp_with_grapefx_backend_is_refused(process_group) -> None:
    """Dynamo's DDPOptimizer would split the graph per bucket and clip each part: refused."""
    ddp = nn.parallel.DistributedDataParallel(Net())
    compiled = torch.compile(ddp, backend=grapefx.backend(max_grad_norm=1.0, noise_multiplier=0.0))
    with pytest.raises(Exception, match="DDPOptimizer splits such graphs") as info:
        compiled(torch.randn(4, 6))
    assert "DistributedDataParallel(grapefx.compile(model" in str(info.value)


def test_fsdp2_on_compiled_model_equals_single_process(ranks) -> None:
    """fully_shard(grapefx.compile(model)) on 2 ranks (B>=2, B=1, B=0 shards), an SGD step on the
    sharded parameters after each backward: gradients and parameters equal one process on the global
    batch."""
    _check_fsdp(ranks, "fsdp/clean")


@pytest.mark.slow
def test_fsdp2_with_noise_equals_single_process(slow_ranks) -> None:
    """With noise: equal to the single-process result with the same seed (noise drawn once)."""
    _check_fsdp(slow_ranks, "fsdp/noisy")


def _check_fsdp(ranks: tuple[dict, dict], key: str) -> None:
    for k, step in enumerate(ranks[0][key]):
        for name, ref in step["ref"].items():
            assert _rel(step["dist"][name], ref) < 2e-6, f"{key} step {k} {name}"
            assert _rel(step["params"][name], step["ref_params"][name]) < 1e-6, f"{key} step {k} {name}"
            torch.testing.assert_close(ranks[1][key][k]["dist"][name], step["dist"][name], rtol=0, atol=0)


def test_fsdp_set_ups_that_are_refused(process_group) -> None:
    """Sharded before compiling, DP-GRAPE with FSDP2, fully_shard inside the compiled model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    with pytest.raises(DistributedSetupError, match="already sharded") as info:
        grapefx.compile(fully_shard(Net(), mesh=mesh))
    assert "`fully_shard(grapefx.compile(model, ...))`" in str(info.value)
    cm = fully_shard(grapefx.compile(Net(), noise_multiplier=0.0, strategy="grape", rank=2), mesh=mesh)
    with pytest.raises(DistributedSetupError, match="DP-GRAPE"):
        cm(torch.randn(4, 6))
    cm = grapefx.compile(Net(), noise_multiplier=0.0)
    fully_shard(cm.module.a, mesh=mesh)
    fully_shard(cm, mesh=mesh)
    with pytest.raises(DistributedSetupError, match="inside the compiled model is sharded on its own"):
        cm(torch.randn(4, 6))


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_single_rank_ddp_equals_plain_grapefx(tmp_path: Path, device: str) -> None:
    """World size 1 (gloo on CPU, NCCL on CUDA): DDP(grapefx.compile(m)) with noise gives exactly the
    single-process result with the same seed."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randn(6, 40, generator=g) * 3).to(device), torch.randint(0, 5, (6,), generator=g).to(device)
        grads = []
        for distributed in (True, False):
            model = mlp().to(device)
            cm = grapefx.compile(model, max_grad_norm=C, noise_multiplier=1.0, seed=5, distributed=distributed)
            net = nn.parallel.DistributedDataParallel(cm) if distributed else cm
            F.cross_entropy(net(x), y).backward()
            grads.append([p.grad for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc; empty elsewhere)."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


@pytest.mark.slow  # ~13 s: two processes under torchrun (the 2-rank scenarios above run by default)
def test_ddp_example_runs_under_torchrun(tmp_path: Path) -> None:
    """examples/train_digits_ddp.py, short form, 2 processes under torchrun (what CI runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # Isolation from other torch processes on the machine (cache-dir locks) and from the host's
    # network set-up (gloo on the loopback interface).
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-cache")
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(ROOT / "examples" / "train_digits_ddp.py"), "--quick"]
    # Output to files, not pipes: a worker that outlives torchrun would hold a pipe open and block
    # the read. On a timeout torchrun's process group and its workers (in sessions of their own) die.
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            workers = _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(
                f"timed out:\n{out_path.read_text()[-3000:]}\n{err_path.read_text()[-3000:]}"
            ) from None
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "test accuracy" in stdout and "bytes/step" in stdout, stdout[-2000:]
