"""The graphs a compiled model went through, as numbered stages, plus helpers to describe nodes.

Stages (the pipeline has one DP rewrite today):

    00_forward            AOTAutograd forward graph
    01_backward_original  AOTAutograd backward graph, before the DP rewrite (after grapefx's pre-passes
                          where they apply: zero tangents folded, masked rows padded)
    02_backward_private   the same backward after `privatize_backward` (clipping + noise)

Shapes are symbolic in the batch (Dynamo marks dim 0 dynamic); for display the batch symbol is
written `B`, and sizes are made concrete with the hint of the example batch (the batch the model was
compiled with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout import UNKNOWN, BatchLayout, analyze_layouts
from grapefx.errors import module_path

STAGES = (
    ("00_forward", "forward", "AOTAutograd forward graph"),
    ("01_backward_original", "backward_original", "backward graph before the DP rewrite"),
    ("02_backward_private", "backward", "backward graph after the DP rewrite (privatize_backward)"),
)


@dataclass
class Stage:
    key: str  # "00_forward"
    graph_name: str  # key in GrapefxBackend.graphs
    title: str
    gm: fx.GraphModule
    layouts: dict[fx.Node, Any] = field(default_factory=dict)  # node -> BatchLayout / None / UNKNOWN
    provenance: dict[fx.Node, str] = field(default_factory=dict)
    status: dict[fx.Node, str] = field(default_factory=dict)  # private stage only: kept / rewritten / ...


# -- concrete sizes ------------------------------------------------------------------------------
# a data-dependent size with no hint (torch._inductor.config.unbacked_symint_fallback)
UNBACKED_SIZE_GUESS = 8192


def concrete(x: Any) -> int:
    """The example value of an int / SymInt (the batch size the graph was compiled with)."""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            from torch.fx.experimental.symbolic_shapes import optimization_hint

            return int(optimization_hint(x))
        except Exception:  # noqa: BLE001 - older / newer torch: fall back to the node's hint
            hint = getattr(x.node, "hint", None)
            if hint is not None:
                return int(hint)
            env = x.node.shape_env
            values = getattr(env, "backed_var_to_val", None) or env.var_to_val
            expr = x.node.expr.xreplace(values)
            if expr.free_symbols:  # unbacked (a data-dependent size, e.g. x[mask]): torch 2.11's
                # optimization_hint is missing; guess as Inductor does for such sizes
                expr = expr.xreplace(dict.fromkeys(expr.free_symbols, UNBACKED_SIZE_GUESS))
            return int(expr)
    return int(x)


def tensor_vals(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def nbytes(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= concrete(s)
    return n * t.element_size()


def batch_symbols(gm: fx.GraphModule) -> set[sympy.Symbol]:
    syms: set[sympy.Symbol] = set()
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            syms |= sympy.sympify(val.node.expr).free_symbols
        for t in tensor_vals(val):
            for s in t.shape:
                if isinstance(s, torch.SymInt):
                    syms |= sympy.sympify(s.node.expr).free_symbols
    return syms


# -- display -----------------------------------------------------------------------------------
_DTYPES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
}


class Namer:
    """Writes sizes with the batch symbol as `B` (when the graph has exactly one symbol)."""

    def __init__(self, symbols: set[sympy.Symbol]) -> None:
        self.subs = {str(s): "B" for s in symbols} if len(symbols) == 1 else {}

    def expr(self, x: Any) -> str:
        text = str(x)
        for name, new in self.subs.items():
            text = re.sub(rf"\b{re.escape(name)}\b", new, text)
        return text

    def val(self, val: Any) -> str:
        if isinstance(val, torch.Tensor):
            dtype = _DTYPES.get(val.dtype, str(val.dtype).replace("torch.", ""))
            return f"{dtype}[{', '.join(self.expr(s) for s in val.shape)}]"
        if isinstance(val, (list, tuple)):
            return "(" + ", ".join(self.val(v) for v in val) + ")"
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return f"sym {self.expr(val)}"
        if val is None:
            return ""
        return type(val).__name__

    def layout(self, lay: Any) -> str:
        if lay is UNKNOWN:
            return "?"
        if lay is None:
            return "-"
        if isinstance(lay, BatchLayout):
            if lay.plain:
                return f"dim{lay.dim}"
            return f"dim{lay.dim}={self.expr(lay.outer)}*B*{self.expr(lay.inner)}"
        if isinstance(lay, (list, tuple)):
            return "(" + ", ".join(self.layout(x) for x in lay) + ")"
        return str(lay)


def target_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return ""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return (
            f"{t.namespace}.{t._opname}.{t._overloadname}"
            if t._overloadname != "default"
            else f"{t.namespace}.{t._opname}"
        )
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def op_key(node: fx.Node) -> str:
    """Target as used in op counts: `aten.mm`, `grapefx.add_gaussian_noise`, `getitem`."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    return target_name(node)


def is_grapefx_op(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "grapefx"


NOISE_OPS = ("add_gaussian_noise",)  # the grapefx op that draws noise


def is_noise_op(node: fx.Node) -> bool:
    return is_grapefx_op(node) and node.target._opname in NOISE_OPS


# -- stages -----------------------------------------------------------------------------------
def collect_stages(backend: Any) -> list[Stage]:
    """The stages of the last compile of `backend` (a GrapefxBackend), in pipeline order."""
    graphs = getattr(backend, "graphs", {})
    plan = current_plan(backend)
    stages: list[Stage] = []
    for key, graph_name, title in STAGES:
        gm = graphs.get(graph_name)
        if gm is not None:
            stages.append(Stage(key, graph_name, title, gm))
    by_name = {s.graph_name: s for s in stages}
    fw = by_name.get("forward")
    primal_names: dict[str, str] = {}  # forward placeholder name -> what it is
    if fw is not None:
        fw.layouts = _forward_layouts(fw.gm)
        fw.provenance = {n: module_path(n) for n in fw.gm.graph.nodes}
        placeholders = [n for n in fw.gm.graph.nodes if n.op == "placeholder"]
        for ph in placeholders:
            if isinstance(fw.layouts.get(ph), BatchLayout):
                primal_names[ph.name] = "batch input"
        # Backward output k is the gradient of forward input (primal) k.
        for g in plan.grads if plan is not None else []:
            if g.out_index < len(placeholders):
                primal_names[placeholders[g.out_index].name] = f"param {g.name}"
        for ph in placeholders:
            if ph.name in primal_names:
                fw.provenance[ph] = primal_names[ph.name]
    orig = by_name.get("backward_original")
    if orig is not None:
        if plan is not None and plan.layouts is not None:
            orig.layouts = dict(plan.layouts.layouts)
        orig.provenance = _original_provenance(orig.gm, plan)
        for n in orig.gm.graph.nodes:
            if n.op == "placeholder" and n.name in primal_names:  # saved forward inputs keep their names
                orig.provenance[n] = _join(orig.provenance.get(n, ""), primal_names[n.name])
            elif n.op == "placeholder" and n.name.startswith("tangents"):
                orig.provenance[n] = _join(orig.provenance.get(n, ""), "tangent (gradient of a forward output)")
    priv = by_name.get("backward")
    if priv is not None and orig is not None:
        from grapefx.inspect.diff import match_graphs

        diff = match_graphs(orig.gm, priv.gm, plan)
        priv.status = diff.status
        priv.provenance = diff.provenance(orig.provenance)
        priv.layouts = _private_layouts(orig, priv)
    return stages


def current_plan(backend: Any) -> Any:
    """The BackwardPlan of the backward in `backend.graphs`, or None (B=0/1 graphs have no plan)."""
    plans = getattr(backend, "plans", None)
    orig = getattr(backend, "graphs", {}).get("backward_original")
    if not plans or orig is None:
        return None
    plan = plans[-1]
    if plan.grads and plan.grads[0].out_node.graph is not orig.graph:
        return None  # a later compile (e.g. the B=1 graph) replaced the graphs
    return plan


def _forward_layouts(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Recomputed here (the backend does not keep them): inputs whose dim 0 is the batch symbol."""
    syms = batch_symbols(gm)
    if len(syms) != 1:
        return {}
    (batch,) = syms
    seeds = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > 0:
            d0 = val.shape[0]
            if isinstance(d0, torch.SymInt) and sympy.sympify(d0.node.expr) == batch:
                seeds[node.name] = BatchLayout(0, sympy.Integer(1), sympy.Integer(1))
    try:
        return dict(analyze_layouts(gm, batch, seeds).layouts)
    except Exception:  # noqa: BLE001 - display only
        return {}


def _private_layouts(orig: Stage, priv: Stage) -> dict[fx.Node, Any]:
    syms = batch_symbols(priv.gm)
    if len(syms) != 1 or not orig.layouts:
        return {}
    o_ph = [n for n in orig.gm.graph.nodes if n.op == "placeholder"]
    p_ph = [n for n in priv.gm.graph.nodes if n.op == "placeholder"]
    seeds = {p.name: orig.layouts.get(o) for p, o in zip(p_ph, o_ph)}
    try:
        return dict(analyze_layouts(priv.gm, next(iter(syms)), seeds).layouts)
    except Exception:  # noqa: BLE001 - display only
        return {}


def _original_provenance(gm: fx.GraphModule, plan: Any) -> dict[fx.Node, str]:
    prov = {n: module_path(n) for n in gm.graph.nodes}
    if plan is None:
        return prov
    from grapefx.analysis.grad_sites import site_kind

    for g in plan.grads:
        for n in g.post_nodes:
            prov[n] = _join(prov.get(n, ""), f"post {g.name}")
        for s in g.sites:
            kind = site_kind(s, plan.layouts) if plan.layouts is not None else None
            prov[s] = _join(prov.get(s, ""), f"site[{kind}] {g.name}")
    return prov


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
