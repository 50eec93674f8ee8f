"""Export the private backward graph to ONNX, with the noise as explicit inputs.

The graph cannot be exported as it is: `grapefx::add_gaussian_noise` draws from grapefx's own generator
and `grapefx::record_norms` publishes norms to Python. The exported graph therefore

* takes one extra input per noised parameter, `noise.<param>`: a standard normal sample shaped like
  the gradient; the graph scales it and adds it as the grapefx noise op would (`graphs.NOISE_OPS`),
* treats `record_norms` as the identity (its value is a copy of its input),
* is specialized to the example batch size (the batch symbol becomes a constant),
* returns only the parameter gradients, named `grad.<param>`; its other inputs keep the names of
  the backward's inputs (saved activations `primals_*`, ..., tangents `tangents_*`).

`check_onnx` validates the file with `onnx.checker` and runs it with onnxruntime against torch on
the same random inputs. The ONNX packages are optional: imported only here.
"""

from __future__ import annotations

import contextlib
import io
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grapefx.inspect.graphs import concrete, is_grapefx_op, is_noise_op, target_name

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


@dataclass
class OnnxResult:
    path: str | None = None
    ok: bool = False
    message: str = ""
    unsupported_ops: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    checker_ok: bool | None = None
    ort_max_abs_diff: float | None = None
    ort_match: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def concrete_backward(
    priv: fx.GraphModule, orig: fx.GraphModule | None, grads: list[Any]
) -> tuple[fx.GraphModule, list[str], list[str], list[torch.Tensor]]:
    """The private backward with noise as inputs, static sizes, gradient outputs only.

    Returns (graph module, input names, output names, random example inputs).
    """
    o_names = [n.name for n in orig.graph.nodes if n.op == "placeholder"] if orig is not None else []
    outputs = priv.graph.output_node().args[0]
    out_param = {g.out_index: g.name for g in grads} or {i: f"output{i}" for i in range(len(outputs))}
    owner = _noise_owners(priv, outputs, out_param)

    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    names: list[str] = []
    examples: list[torch.Tensor] = []
    noise_nodes = [n for n in priv.graph.nodes if is_noise_op(n)]
    k = 0
    for n in priv.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, _SYM) or isinstance(val, int):
            env[n] = concrete(val)
        else:
            name = o_names[k] if k < len(o_names) else n.name
            env[n] = g.placeholder(_safe(name))
            env[n].meta["val"] = val
            names.append(name)
            examples.append(_random_like(val))
        k += 1
    noise_in: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(noise_nodes):
        param = owner.get(n, f"#{i}")
        ph = g.placeholder(_safe(f"noise_{param}"))
        noise_in[n] = ph
        names.append(f"noise.{param}")
        examples.append(torch.randn([concrete(s) for s in n.meta["val"].shape], dtype=n.meta["val"].dtype))
    for n in priv.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        val = n.meta.get("val")
        if isinstance(val, _SYM):
            env[n] = concrete(val)
        elif n in noise_in:
            env[n] = _noise_replacement(g, n, noise_in[n], env)
        elif is_grapefx_op(n) and n.target._opname == "record_norms":
            env[n] = env[n.args[0]]
        elif is_grapefx_op(n) and n.target._opname == "conv_per_sample_weight_grad":
            env[n] = _conv_per_sample_replacement(g, n, env)
        elif is_grapefx_op(n) and n.target._opname == "group_norm_per_sample_affine_grads":
            env[n] = _group_norm_per_sample_replacement(g, n, env)
        elif n.target is operator.getitem and isinstance(env.get(n.args[0]), tuple):
            env[n] = env[n.args[0]][n.args[1]]
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    out_vals, out_names = [], []
    for i, o in enumerate(outputs):
        if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor):
            out_vals.append(env[o])
            out_names.append(f"grad.{out_param.get(i, f'output{i}')}")
    g.output(tuple(out_vals))
    gm = fx.GraphModule(priv, g)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, names, out_names, examples


# the grapefx noise op written with the standard normal input z (shaped like the output):
#   add_gaussian_noise(grad, std: 0-d tensor, state_id)  = grad + std * z


def _noise_replacement(g: fx.Graph, n: fx.Node, z: fx.Node, env: dict[fx.Node, Any]) -> fx.Node:
    aten = torch.ops.aten
    std = n.args[1]
    std = env[std] if isinstance(std, fx.Node) else float(std)
    if isinstance(std, fx.Node) and n.meta["val"].dtype != torch.float32:
        std = g.call_function(aten._to_copy.default, (std,), {"dtype": n.meta["val"].dtype})
    scaled = g.call_function(aten.mul.Tensor, (z, std))
    return g.call_function(aten.add.Tensor, (env[n.args[0]], scaled))


def _conv_per_sample_replacement(g: fx.Graph, n: fx.Node, env: dict[fx.Node, Any]) -> fx.Node:
    """grapefx::conv_per_sample_weight_grad at the (now constant) batch size, as the single grouped
    convolution_backward it computes in chunks."""
    aten = torch.ops.aten
    grad, x, w_shape, stride, padding, dilation, groups = n.args
    b = concrete(x.meta["val"].shape[0])
    folded = [
        g.call_function(aten.reshape.default, (env[t], [1, -1, *[concrete(s) for s in t.meta["val"].shape[2:]]]))
        for t in (grad, x)
    ]
    w = g.call_function(aten.zeros.default, ([b * w_shape[0], *w_shape[1:]],), {"dtype": grad.meta["val"].dtype})
    conv = g.call_function(
        aten.convolution_backward.default,
        (*folded, w, None, stride, padding, dilation, False, [0] * len(stride), b * groups, [False, True, False]),
    )
    wg = g.call_function(operator.getitem, (conv, 1))
    return g.call_function(aten.reshape.default, (wg, [b, *w_shape]))


def _group_norm_per_sample_replacement(g: fx.Graph, n: fx.Node, env: dict[fx.Node, Any]) -> tuple[fx.Node, fx.Node]:
    """grapefx::group_norm_per_sample_affine_grads at the (now constant) batch size, as the one
    native_group_norm_backward with the batch folded into the channels that it runs."""
    aten = torch.ops.aten
    grad, x, mean, rstd, groups = n.args
    b, c = (concrete(s) for s in grad.meta["val"].shape[:2])
    s = 1
    for d in grad.meta["val"].shape[2:]:
        s *= concrete(d)
    folded = [g.call_function(aten.reshape.default, (env[t], [1, b * c, s])) for t in (grad, x)]
    stats = [g.call_function(aten.reshape.default, (env[t], [1, b * groups])) for t in (mean, rstd)]
    ones = g.call_function(aten.ones.default, ([b * c],), {"dtype": grad.meta["val"].dtype})
    nb = g.call_function(
        aten.native_group_norm_backward.default,
        (*folded, *stats, ones, 1, b * c, s, b * groups, [False, True, True]),
    )
    return tuple(
        g.call_function(aten.reshape.default, (g.call_function(operator.getitem, (nb, i)), [b, c])) for i in (1, 2)
    )


def _random_like(val: Any) -> torch.Tensor:
    shape = [concrete(s) for s in val.shape]
    if val.dtype.is_floating_point:
        return torch.randn(shape, dtype=val.dtype)
    if val.dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    return torch.randint(0, 2, shape, dtype=val.dtype)  # indices: 0/1 are valid for any table


def _noise_owners(priv: fx.GraphModule, outputs: Any, out_param: dict[int, str]) -> dict[fx.Node, str]:
    owner: dict[fx.Node, str] = {}
    for i, o in enumerate(outputs):
        if not isinstance(o, fx.Node) or i not in out_param:
            continue
        stack, seen = [o], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if is_noise_op(n):
                owner.setdefault(n, out_param[i])
            stack.extend(n.all_input_nodes)
    return owner


def export_onnx(priv: fx.GraphModule, orig: fx.GraphModule | None, grads: list[Any], path: str) -> OnnxResult:
    """Export (and check) the private backward; safe to call while a compile's fake mode is active."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _export_onnx(priv, orig, grads, path)


def _export_onnx(priv: fx.GraphModule, orig: fx.GraphModule | None, grads: list[Any], path: str) -> OnnxResult:
    res = OnnxResult()
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        res.message = f"ONNX export skipped: {e.name} is not installed (pip install onnx onnxscript onnxruntime)"
        return res
    gm, in_names, out_names, examples = concrete_backward(priv, orig, grads)
    res.input_names, res.output_names = in_names, out_names
    if not out_names:
        res.message = "ONNX export skipped: the graph has no gradient outputs"
        return res
    suspects = unsupported_ops(gm)  # names the culprit if the export fails (the check may over-report)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm,
                tuple(examples),
                path,
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=in_names,
                output_names=out_names,
            )
    except Exception as e:  # noqa: BLE001 - report the op that failed, carry on with other formats
        text = str(e)
        ops = suspects or sorted(set(re.findall(r"\b(aten\.\w+(?:\.\w+)?|grapefx\.\w+)", text)))
        res.unsupported_ops = ops
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        if ops:
            res.message = "no ONNX form for: " + ", ".join(ops)
        else:
            res.message = f"ONNX export failed ({type(e).__name__}: {first[:300]})"
        return res
    res.path = path
    res.ok = True
    res.message = "exported"
    _check(res, gm, examples)
    return res


def unsupported_ops(gm: fx.GraphModule) -> list[str]:
    """Ops of `gm` that the torch.onnx (dynamo) exporter can neither translate nor decompose."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        registry = ONNXRegistry.from_torchlib()
    except Exception:  # noqa: BLE001 - private API moved: let the export itself report
        return []
    try:
        decomp = torch.export.default_decompositions()
    except Exception:  # noqa: BLE001
        decomp = {}
    missing = set()
    for n in gm.graph.nodes:
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        if t in decomp:
            continue
        try:
            found = registry.is_registered(t)
        except Exception:  # noqa: BLE001
            continue
        if not found:
            missing.add(target_name(n))
    return sorted(missing)


def _check(res: OnnxResult, gm: fx.GraphModule, examples: list[torch.Tensor]) -> None:
    import onnx

    try:
        onnx.checker.check_model(onnx.load(res.path), full_check=True)
        res.checker_ok = True
    except Exception as e:  # noqa: BLE001
        res.checker_ok = False
        res.message = f"onnx.checker: {e}"
        return
    try:
        import onnxruntime as ort
    except ImportError:
        res.message += "; onnxruntime not installed: not run"
        return
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), examples)}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = gm(*examples)
    diff = 0.0
    match = True
    for g_, w in zip(got, want):
        w = w.detach()
        g_t = torch.from_numpy(g_)
        diff = max(diff, float((g_t.double() - w.double()).abs().max()) if w.numel() else 0.0)
        match = match and torch.allclose(g_t.to(w.dtype), w, rtol=1e-4, atol=1e-5)
    res.ort_max_abs_diff = diff
    res.ort_match = bool(match)
    res.message += f"; onnx.checker ok; onnxruntime vs torch max |diff| = {diff:.3g}" + ("" if match else " (MISMATCH)")
