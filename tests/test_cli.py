"""The `grapefx` command line and grapefx.inspect: dumps, the inspect report, ONNX, errors.

The slow part is starting Python + torch, so the two runs of the installed command start together
(module fixture) and the rest runs in-process through `grapefx.cli.main`.

Golden file: tests/golden/tiny_mlp_inspect.json; how to regenerate it: tests/golden/README.md.
Only stable fields are compared (`STABLE`): flop counts, reasons, memory estimates are not.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import grapefx
from grapefx.cli import main
from grapefx.inspect.render import dot_binary

REPO = Path(__file__).resolve().parents[1]
MODELS = "examples/models.py"  # subprocesses run in the repo root (the golden file names the model so)
TINY = [f"{MODELS}:tiny_mlp", "--input", "float32[4,16]"]
ABS = str(REPO / MODELS)  # in-process runs: any working directory
ABS_TINY = [f"{ABS}:tiny_mlp", "--input", "float32[4,16]"]
GOLDEN = REPO / "tests" / "golden" / "tiny_mlp_inspect.json"
STAGES = ("00_forward", "01_backward_original", "02_backward_private")

BAD_MODEL = """
import torch.nn as nn

def batchnorm():
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
"""


def _command() -> list[str]:
    exe = Path(sys.executable).parent / "grapefx"  # the console script (pip install -e .)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "grapefx.cli"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad_model.py").write_text(BAD_MODEL)
    out = tmp / "dump"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEFX_DUMP")}
    env["OMP_NUM_THREADS"] = "1"
    cmds = {
        "transform": ["transform", *TINY, "--out", str(out), "--format", "all"],
        "error": ["inspect", f"{tmp / 'bad_model.py'}:batchnorm", "--input", "float32[4,8]"],
    }
    procs = {
        k: subprocess.Popen(
            _command() + v, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k, v in cmds.items()
    }
    results = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        results[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    results["out"] = out
    return results


# -- transform --------------------------------------------------------------------------------
def test_transform_writes_every_stage_and_format(runs: dict) -> None:
    r = runs["transform"]
    assert r.returncode == 0, r.stderr
    out: Path = runs["out"]
    for stage in STAGES:
        ast.parse((out / f"{stage}.py").read_text())  # readable code is valid Python
        assert (out / f"{stage}.table.txt").stat().st_size > 0
        assert (out / f"{stage}.dot").read_text().startswith("digraph")
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    rw = summary["rewrite"]
    assert rw["pass"] == "privatize_backward"
    assert rw["status"]["grapefx-op"] == len(rw["grapefx_nodes"]) > 0
    assert any(op.startswith("grapefx.") and c["after"] > c["before"] for op, c in rw["ops"].items())
    assert "what the DP rewrite" in (out / "summary.txt").read_text()
    assert "what the DP rewrite" in r.stdout
    if dot_binary() is not None:
        assert (out / "02_backward_private.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    else:
        assert "Graphviz `dot` not found" in r.stdout


def test_transform_tables_mark_sites_and_inserted_nodes(runs: dict) -> None:
    out: Path = runs["out"]
    original = (out / "01_backward_original.table.txt").read_text()
    private = (out / "02_backward_private.table.txt").read_text()
    assert "site[mm]" in original and "site[reduce]" in original
    for word in ("grapefx.record_norms", "grapefx-op", "inserted", "per_sample_norms: norm", "book_keeping"):
        assert word in private
    assert "f32[B, 16]" in private  # batch symbol shown as B
    dot = (out / "02_backward_private.dot").read_text()
    assert "#ffb38a" in dot and "#c7f0c2" in dot  # grapefx ops and inserted nodes coloured


def test_transform_onnx_checked_against_onnxruntime(runs: dict) -> None:
    onnx = json.loads((runs["out"] / "summary.json").read_text()).get("onnx")
    if onnx is None or "not installed" in onnx.get("message", ""):
        pytest.fail("onnx / onnxscript not installed (test extra)")
    assert onnx["ok"] and onnx["checker_ok"], onnx["message"]
    if onnx["ort_match"] is None:
        pytest.fail("onnxruntime not installed (test extra)")
    assert onnx["ort_match"] and onnx["ort_max_abs_diff"] < 1e-5
    assert [n for n in onnx["input_names"] if n.startswith("noise.")] == [
        "noise.0.weight",
        "noise.0.bias",
        "noise.2.weight",
        "noise.2.bias",
    ]
    assert onnx["output_names"] == ["grad.0.weight", "grad.0.bias", "grad.2.weight", "grad.2.bias"]


# -- inspect ----------------------------------------------------------------------------------
STABLE = ("model", "inputs", "batch_size", "loss")
STABLE_CONFIG = ("max_grad_norm", "noise_multiplier", "loss_reduction", "clipping", "strategy", "codegen")


def _stable(report: dict) -> dict:
    from grapefx.inspect.report import STABLE_PARAM_FIELDS

    return {
        **{k: report.get(k) for k in STABLE},
        "config": {k: report["config"][k] for k in STABLE_CONFIG},
        "parameters": [{k: p[k] for k in STABLE_PARAM_FIELDS} for p in report["parameters"]],
        "totals": {k: report["totals"][k] for k in ("parameters", "numel", "methods", "rules")},
    }


def test_inspect_json_matches_golden(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from grapefx.inspect.report import format_report

    monkeypatch.chdir(REPO)  # the golden file names the model by its repo-relative path
    assert main(["inspect", *TINY, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    golden = json.loads(GOLDEN.read_text())
    assert _stable(report) == _stable(golden), "regenerate tests/golden (see this file's docstring) if intended"
    mem = report["memory_estimate"]
    assert "estimate" in mem["kind"]
    assert mem["backward_private"]["peak_bytes"] > 0 and mem["backward_original"]["peak_bytes"] > 0
    sched = mem["schedule"]  # the memory scheduler's decisions, estimated peaks before / after
    peaks = sched["estimated_peak_bytes"]
    assert peaks["private_scheduled"] == mem["backward_private"]["peak_bytes"] <= peaks["private_unscheduled"]
    assert sched["policy"] == "balanced" and sched["live_at_peak"]
    assert "memory scheduler (policy balanced)" in format_report(report)


def test_compiler_error_is_one_message_without_traceback(runs: dict) -> None:
    r = runs["error"]
    assert r.returncode == 1
    assert r.stderr.startswith("grapefx: error: ") and "BatchNorm" in r.stderr and "GroupNorm" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad_model.py").write_text(BAD_MODEL)
    assert main(["inspect", f"{tmp_path / 'bad_model.py'}:batchnorm", "--input", "float32[4,8]", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "BatchNorm" in err


def test_inspect_text_triple_factory_per_layer(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", f"{ABS}:regression", "--clipping", "per_layer"]) == 0
    text = capsys.readouterr().out
    assert "clipping=per_layer" in text and "(B=6)" in text
    assert "4 trainable parameters" in text and "estimated peak memory" in text


@pytest.mark.parametrize("groups", ["module", "0.*;2.weight,2.bias"])
def test_inspect_group_clipping(groups: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", f"{ABS}:regression", "--clipping", "group", "--clip-groups", groups]) == 0
    text = capsys.readouterr().out
    assert "clipping=group" in text and "4 trainable parameters" in text


def test_inspect_group_clipping_names_unmatched_parameters(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", f"{ABS}:regression", "--clipping", "group", "--clip-groups", "0.*"]) != 0
    assert "['2.weight', '2.bias'] match no group" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", f"{ABS}:no_such_factory", "--input", "float32[4,16]"], "has no 'no_such_factory'"),
        (["inspect", "missing.py:f", "--input", "float32[4,16]"], "not found"),
        (["inspect", f"{ABS}:tiny_mlp"], "give its inputs with --input"),
        (["inspect", f"{ABS}:tiny_mlp", "--input", "float32[4,16"], "expected DTYPE[D0,D1,...]"),
        (["inspect", f"{ABS}:tiny_mlp", "--input", "floot[4,16]"], "unknown dtype"),
        (["transform", *ABS_TINY, "--out", "x", "--format", "png"], "unknown dump format"),
        (["inspect", *ABS_TINY, "--max-grad-norm", "-1"], "max_grad_norm must be a positive number"),
        (["inspect", f"{ABS}:tiny_mlp", "--input", "float32[1,16]"], "use a batch of at least 2"),
        (["inspect", "torch.nn:Identity", "--input", "float32[4,16]"], "no trainable parameters"),  # module:factory
        (["inspect", "json:loads", "--input", "float32[4,16]"], "calling the factory 'json:loads' failed"),
        (["inspect", "no_such_pkg.models:f", "--input", "float32[4,16]"], "cannot import module"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("grapefx: error: ") and message in err and "Traceback" not in err


def test_help_explains_commands_and_env(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("transform", "inspect", "GRAPEFX_DUMP_DIR", "FILE.py:FACTORY", "exit status"):
        assert word in text


# -- grapefx.inspect as a library ------------------------------------------------------------
def _tiny_backward(batch: int = 4) -> grapefx.PrivateModule:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cli_test_models", REPO / MODELS)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    pm = grapefx.compile(models.tiny_mlp(), seed=0)
    x, y = torch.randn(batch, 16), torch.randint(0, 4, (batch,))
    F.cross_entropy(pm(x), y).backward()
    return pm


def _onnx_matches_torch(pm: grapefx.PrivateModule, tmp_path: Path, denom: int) -> None:
    """Export the private backward, check it with onnx.checker, run it with onnxruntime against
    torch on fresh random inputs, and check that the noise input enters as sigma * C * z / denom."""
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401

    from grapefx.inspect.graphs import current_plan
    from grapefx.inspect.onnx_export import concrete_backward, export_onnx

    g = pm.grapefx_backend.graphs
    grads = current_plan(pm.grapefx_backend).grads
    res = export_onnx(g["backward"], g["backward_original"], grads, str(tmp_path / "b.onnx"))
    assert res.ok, res.message
    onnx.checker.check_model(onnx.load(res.path), full_check=True)
    gm, names, _, examples = concrete_backward(g["backward"], g["backward_original"], grads)
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names

    def run(xs: list[torch.Tensor]) -> list:
        return sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})

    torch.manual_seed(1)
    fresh = [torch.randn_like(x) if x.is_floating_point() else x for x in examples]
    with torch.no_grad():
        want = gm(*fresh)
    got = run(fresh)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-5)
    # Gradient with noise z minus gradient without: sigma * C * z / denom (sigma = C = 1).
    zero = [torch.zeros_like(x) if n.startswith("noise.") else x for n, x in zip(names, fresh)]
    noise = [x for n, x in zip(names, fresh) if n.startswith("noise.")]
    assert len(noise) == len(grads)
    for a, b, z in zip(got, run(zero), noise):
        torch.testing.assert_close(torch.from_numpy(a - b), z / denom, rtol=1e-4, atol=1e-5)


def test_onnx_noise_is_an_explicit_input(tmp_path: Path) -> None:
    _onnx_matches_torch(_tiny_backward(batch=4), tmp_path, denom=4)  # mean reduction, B = 4


class _Norms(torch.nn.Module):
    """GroupNorm and LayerNorm without convolutions (ONNX has no convolution_backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.gn = torch.nn.Linear(6, 12), torch.nn.GroupNorm(2, 4)
        self.ln, self.fc2 = torch.nn.LayerNorm(12), torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.fc1(x).view(x.shape[0], 4, 3)).flatten(1)
        return self.fc2(F.gelu(self.ln(h)))


def test_onnx_export_of_the_fused_norm_backwards(tmp_path: Path) -> None:
    """The per-sample GroupNorm op is written as the folded native_group_norm_backward it runs."""
    pm = grapefx.compile(_Norms(), seed=0, noise_multiplier=1.0, max_grad_norm=1.0, loss_reduction="sum")
    F.cross_entropy(pm(torch.randn(5, 6)), torch.randint(0, 3, (5,)), reduction="sum").backward()
    ops = {str(n.target) for n in pm.grapefx_backend.graphs["backward"].graph.nodes}
    assert {"grapefx.group_norm_per_sample_affine_grads.default", "aten.native_layer_norm_backward.default"} <= ops
    _onnx_matches_torch(pm, tmp_path, denom=1)


def test_dump_private_module_and_env_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grapefx.inspect import dump_from_env, dump_private_module

    pm = _tiny_backward()
    res = dump_private_module(pm, str(tmp_path / "lib"), ["code", "table"])
    assert sorted(os.path.basename(f) for f in res.files) == sorted(
        [f"{s}.py" for s in STAGES] + [f"{s}.table.txt" for s in STAGES] + ["summary.json", "summary.txt"]
    )
    monkeypatch.delenv("GRAPEFX_DUMP_DIR", raising=False)
    assert dump_from_env(pm.grapefx_backend) is None
    monkeypatch.setenv("GRAPEFX_DUMP_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("GRAPEFX_DUMP_FORMATS", "table,dot")
    out = dump_from_env(pm.grapefx_backend)
    assert out is not None and os.path.isfile(os.path.join(out, "02_backward_private.dot"))
    assert not os.path.exists(os.path.join(out, "02_backward_private.py"))
    monkeypatch.setenv("GRAPEFX_DUMP_FORMATS", "bogus")
    assert dump_from_env(pm.grapefx_backend) is None  # never raises: a debugging aid must not stop training


def test_memory_estimate_views_share_storage() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from grapefx.inspect.memory import estimate_peak

    def f(x: torch.Tensor) -> torch.Tensor:
        a = x + 1  # 64 B, x dies here
        b = a.view(16)  # alias of a: no bytes
        c = b * 2  # 64 B, a dies here
        return c.sum()  # 4 B

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 4))
    est = estimate_peak(gm)
    assert (est.peak_bytes, est.input_bytes, est.output_bytes) == (128, 64, 4)


def test_memory_estimate_close_to_dispatch_measurement() -> None:
    """Run both backward graphs eagerly, counting live storages at dispatch: estimate within 10%."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from grapefx.inspect.graphs import concrete
    from grapefx.inspect.memory import estimate_peak
    from grapefx.inspect.onnx_export import _random_like

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.refs: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors]
            self.cur = self.peak = 0

        def _drop(self, key: int) -> None:
            self.refs[key][1] -= 1
            if self.refs[key][1] == 0:
                self.cur -= self.refs.pop(key)[0]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                    key = t.untyped_storage().data_ptr()
                    if key not in self.refs:
                        self.refs[key] = [t.untyped_storage().nbytes(), 0]
                        self.cur += self.refs[key][0]
                        self.peak = max(self.peak, self.cur)
                    self.refs[key][1] += 1
                    weakref.finalize(t, self._drop, key)
            return out

    pm = _tiny_backward(batch=64)
    for gm in (pm.grapefx_backend.graphs["backward_original"], pm.grapefx_backend.graphs["backward"]):
        args = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = n.meta["val"]
                args.append(concrete(v) if isinstance(v, torch.SymInt) else _random_like(v))
        live = Live()
        for a in args:  # inputs: live throughout (`args` holds them), views of them allocate nothing
            if isinstance(a, torch.Tensor):
                live.refs[a.untyped_storage().data_ptr()] = [a.untyped_storage().nbytes(), 1]
                live.cur += a.untyped_storage().nbytes()
        with live, torch.no_grad():
            gm(*args)
        est = estimate_peak(gm, free_inputs=False).peak_bytes
        assert abs(est - live.peak) <= 0.1 * live.peak, (est, live.peak)
