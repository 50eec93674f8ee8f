"""`grapefx inspect`: one row per trainable parameter (rule, norm method and why) plus totals."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import Any

import torch
import torch.nn as nn

from grapefx.inspect.graphs import concrete, current_plan
from grapefx.inspect.memory import compare, human_bytes

SCHEMA = 1
# Fields that do not change unless the model, the config or the rules change; tests/golden compare these.
STABLE_PARAM_FIELDS = ("name", "shape", "numel", "rule", "method")


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no inf: "not applicable"
    return x


def _choice_dict(choice: Any) -> dict[str, Any]:
    if is_dataclass(choice):
        return {f.name: _num(getattr(choice, f.name)) for f in fields(choice)}
    return {"method": str(choice)}


def parameter_rows(backend: Any, module: nn.Module | None = None) -> list[dict[str, Any]]:
    plan = current_plan(backend)
    rows: list[dict[str, Any]] = []
    if plan is None:
        return rows
    from grapefx.analysis.grad_sites import site_kind

    seen = set()
    for g in plan.grads:
        val = g.out_node.meta.get("val")
        shape = [concrete(s) for s in val.shape] if isinstance(val, torch.Tensor) else None
        sites = []
        choices = dict(plan.choices.get(g.name, []))
        for s in g.sites:
            kind = site_kind(s, plan.layouts) if plan.layouts is not None else None
            site = {"node": s.name, "rule": kind}
            if str(s) in choices:
                site.update(_choice_dict(choices[str(s)]))
            sites.append(site)
        rows.append(
            {
                "name": g.name,
                "shape": shape,
                "numel": math.prod(shape) if shape is not None else None,
                "rule": "+".join(dict.fromkeys(str(s["rule"]) for s in sites)),
                "method": "+".join(dict.fromkeys(str(s.get("method", "?")) for s in sites)),
                "reason": "; ".join(dict.fromkeys(str(s.get("reason", "")) for s in sites if s.get("reason"))),
                "sites": sites,
            }
        )
        seen.add(g.name)
    if module is not None:
        for name, p in module.named_parameters():
            if p.requires_grad and name not in seen and not _seen_alias(name, seen):
                rows.append(
                    {
                        "name": name,
                        "shape": list(p.shape),
                        "numel": p.numel(),
                        "rule": "-",
                        "method": "-",
                        "reason": "no gradient in the compiled graph (unused by this forward)",
                        "sites": [],
                    }
                )
    return rows


def _seen_alias(name: str, seen: set[str]) -> bool:
    # Capture names may differ slightly from named_parameters() (e.g. a wrapper prefix).
    return any(s.endswith("." + name) or name.endswith("." + s) for s in seen)


def build_report(
    backend: Any,
    *,
    model: str | None = None,
    inputs: list[str] | None = None,
    batch_size: int | None = None,
    module: nn.Module | None = None,
    loss: str | None = None,
) -> dict[str, Any]:
    cfg = backend.config
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    rows = parameter_rows(backend, module)
    methods: dict[str, int] = {}
    rules: dict[str, int] = {}
    for r in rows:
        methods[r["method"]] = methods.get(r["method"], 0) + 1
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    graphs = backend.graphs
    memory = compare(graphs.get("backward_original"), graphs.get("backward"))
    plan = current_plan(backend)
    if plan is not None and getattr(plan, "memory", None) is not None:
        memory["schedule"] = plan.memory.as_dict()  # the memory scheduler's decisions
    return {
        "grapefx_report": SCHEMA,
        "model": model,
        "inputs": inputs,
        "batch_size": batch_size,
        "config": config,
        "parameters": rows,
        "totals": {
            "parameters": len(rows),
            "numel": sum(r["numel"] or 0 for r in rows),
            "methods": dict(sorted(methods.items())),
            "rules": dict(sorted(rules.items())),
        },
        "memory_estimate": memory,
        "loss": loss,
    }


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = []
    head = f"model {report.get('model')}"
    if report.get("inputs"):
        head += "  inputs " + " ".join(report["inputs"])
    if report.get("batch_size") is not None:
        head += f"  (B={report['batch_size']})"
    lines.append(head)
    lines.append(
        f"privacy: C={cfg['max_grad_norm']} sigma={cfg['noise_multiplier']} clipping={cfg['clipping']} "
        f"strategy={cfg['strategy']} loss_reduction={cfg['loss_reduction']} codegen={cfg['codegen']}"
    )
    lines.append("")
    if not report["parameters"]:
        lines.append(
            "no per-parameter plan for this graph (grapefx compiles B=0 and B=1 on a special path "
            "without per-layer rules)"
        )
        return "\n".join(lines) + "\n"
    cols = ("name", "shape", "rule", "method", "why")
    table = [
        (r["name"], "x".join(map(str, r["shape"])) if r["shape"] else "?", r["rule"], r["method"], r["reason"])
        for r in report["parameters"]
    ]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    widths[-1] = 0
    lines.append("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for t in table:
        lines.append("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    tot = report["totals"]
    lines.append("")
    methods = ", ".join(f"{n} {m}" for m, n in tot["methods"].items())
    lines.append(f"{tot['parameters']} trainable parameters ({tot['numel']:,} values): {methods}")
    mem = report["memory_estimate"]
    if "backward_original" in mem and "backward_private" in mem:
        o, p = mem["backward_original"], mem["backward_private"]
        lines.append("estimated peak memory of the backward (static liveness estimate, not measured):")
        lines.append(
            f"  non-private {human_bytes(o['peak_bytes'])}   private {human_bytes(p['peak_bytes'])}"
            + (f"   (x{mem['ratio']:.2f})" if "ratio" in mem else "")
        )
        lines.append(f"  of which backward inputs (saved activations + tangents): {human_bytes(o['input_bytes'])}")
    sched = mem.get("schedule")
    if sched:
        peaks = sched["estimated_peak_bytes"]
        lines.append(
            f"memory scheduler (policy {sched['policy']}"
            + (f", budget {human_bytes(sched['memory_budget'])}" if sched["memory_budget"] else "")
            + f"): private peak {human_bytes(peaks['private_unscheduled'])} as traced -> "
            + f"{human_bytes(peaks['private_scheduled'])} ({sched['order']} order)"
        )
        if sched["ghost_swaps"]:
            swapped = ", ".join(sched["ghost_swaps"])
            lines.append(f"  kept operands instead of per-sample gradients (ghost norms): {swapped}")
        if sched.get("instantiated_to_save_flops"):
            inst = ", ".join(sched["instantiated_to_save_flops"])
            lines.append(f"  kept per-sample gradients instead of operands (fewer flops, fits under the peak): {inst}")
        live = ", ".join(f"{e['node']} {human_bytes(e['bytes'])}" for e in sched["live_at_peak"][:5])
        lines.append(f"  largest buffers live at the peak: {live}")
        for note in sched["notes"]:
            lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"
