"""Write a compiled model's graphs to a folder: per stage code / table / DOT / SVG, ONNX, a summary.

    out/00_forward.py  .table.txt  .dot  .svg
    out/01_backward_original.*
    out/02_backward_private.*   + 02_backward_private.onnx
    out/summary.txt             what the DP rewrite changed, memory estimate, per-parameter choices
    out/summary.json            the same, for scripts

While training, set `GRAPEFX_DUMP_DIR=dir` (and optionally `GRAPEFX_DUMP_FORMATS=code,table,dot`)
and every backward grapefx compiles is dumped to `dir/state<ID>_graph<N>/` (see `dump_from_env`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from grapefx.inspect.diff import match_graphs
from grapefx.inspect.graphs import collect_stages, current_plan
from grapefx.inspect.memory import estimate_peak, human_bytes
from grapefx.inspect.render import dot_binary, render_code, render_dot, render_svg, render_table
from grapefx.inspect.report import build_report

log = logging.getLogger("grapefx")

FORMATS = ("code", "table", "dot", "svg", "onnx")
ENV_DIR = "GRAPEFX_DUMP_DIR"
ENV_FORMATS = "GRAPEFX_DUMP_FORMATS"
ENV_DEFAULT_FORMATS = ("code", "table", "dot")


@dataclass
class DumpResult:
    out_dir: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # formats that could not be written, and why
    summary: dict[str, Any] = field(default_factory=dict)


def parse_formats(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip().lower() for s in items if s.strip()]
    if "all" in items:
        return list(FORMATS)
    bad = [s for s in items if s not in FORMATS]
    if bad:
        raise ValueError(f"unknown dump format(s) {bad}; choose from {', '.join(FORMATS)} or all")
    return list(dict.fromkeys(items))


def _backend_of(obj: Any) -> Any:
    return getattr(obj, "grapefx_backend", obj)  # a PrivateModule or the GrapefxBackend itself


def dump_private_module(
    pm: Any, out_dir: str, formats: Any = ("code", "table", "dot"), **report_info: Any
) -> DumpResult:
    """Dump the graphs of `pm` (a PrivateModule after one backward, or a GrapefxBackend) to `out_dir`.

    Formats: code, table, dot, svg (needs Graphviz `dot`; DOT is written anyway), onnx (the private
    backward with noise as inputs; needs onnx + onnxscript, checked with onnxruntime when installed).
    A format that cannot be produced is reported in `DumpResult.notes`; the others are still written.
    """
    backend = _backend_of(pm)
    fmts = parse_formats(formats)
    os.makedirs(out_dir, exist_ok=True)
    res = DumpResult(out_dir)
    stages = collect_stages(backend)
    if not stages:
        res.notes.append("no graphs: run one forward and backward of the compiled model first")
        return res

    def write(name: str, text: str) -> str:
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        res.files.append(path)
        return path

    want_dot = "dot" in fmts or "svg" in fmts
    if "svg" in fmts and dot_binary() is None:
        res.notes.append("svg: Graphviz `dot` not found on PATH, wrote DOT only (apt-get install graphviz)")
    for st in stages:
        if "code" in fmts:
            write(f"{st.key}.py", render_code(st))
        if "table" in fmts:
            write(f"{st.key}.table.txt", render_table(st))
        if want_dot:
            dot_path = write(f"{st.key}.dot", render_dot(st))
            if "svg" in fmts and dot_binary() is not None:
                ok, msg = render_svg(dot_path, os.path.join(out_dir, f"{st.key}.svg"))
                if ok:
                    res.files.append(msg)
                else:
                    res.notes.append(f"svg: {msg}")

    summary = _summary(backend, stages, report_info)
    if "onnx" in fmts:
        summary["onnx"] = _onnx(backend, out_dir, res)
    res.summary = summary
    write("summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write("summary.txt", format_summary(summary, res.notes))
    return res


def _onnx(backend: Any, out_dir: str, res: DumpResult) -> dict[str, Any]:
    from grapefx.inspect.onnx_export import export_onnx

    graphs = backend.graphs
    priv = graphs.get("backward")
    if priv is None:
        res.notes.append("onnx: no private backward graph")
        return {"ok": False, "message": "no private backward graph"}
    plan = current_plan(backend)
    grads = plan.grads if plan is not None else []
    path = os.path.join(out_dir, "02_backward_private.onnx")
    out = export_onnx(priv, graphs.get("backward_original"), grads, path)
    if out.ok:
        res.files.append(path)
        if out.ort_match is False or out.checker_ok is False:
            res.notes.append(f"onnx: {out.message}")
    else:
        res.notes.append(f"onnx: {out.message} (other formats written)")
    return out.as_dict()


def _summary(backend: Any, stages: list[Any], report_info: dict[str, Any]) -> dict[str, Any]:
    graphs = backend.graphs
    summary: dict[str, Any] = {
        "stages": [
            {
                "stage": st.key,
                "graph": st.graph_name,
                "title": st.title,
                "nodes": len(st.gm.graph.nodes),
                "peak_bytes_estimate": estimate_peak(st.gm).peak_bytes,
            }
            for st in stages
        ]
    }
    orig, priv = graphs.get("backward_original"), graphs.get("backward")
    if orig is not None and priv is not None:
        summary["rewrite"] = {"pass": "privatize_backward", **match_graphs(orig, priv, current_plan(backend)).summary()}
    summary["report"] = build_report(backend, **report_info)
    return summary


def format_summary(summary: dict[str, Any], notes: list[str] | None = None) -> str:
    lines = ["stages:"]
    for st in summary["stages"]:
        peak = human_bytes(st["peak_bytes_estimate"])
        lines.append(f"  {st['stage']:<22} {st['nodes']:>6} nodes   est. peak {peak:>10}   {st['title']}")
    rw = summary.get("rewrite")
    if rw:
        s = rw["status"]
        lines.append("")
        lines.append(f"what the DP rewrite ({rw['pass']}) did (node matching is a heuristic: grapefx/inspect/diff.py):")
        lines.append(
            f"  op nodes {rw['nodes_before']} -> {rw['nodes_after']}: kept {s['kept']}, rewritten {s['rewritten']}, "
            f"inserted {s['inserted']}, grapefx ops {s['grapefx-op']}; original nodes removed: {rw['removed']}"
        )
        grapefx_ops: dict[str, int] = {}
        for op, c in rw["ops"].items():
            if op.startswith("grapefx."):
                grapefx_ops[op] = c["after"]
        if grapefx_ops:
            lines.append("  grapefx ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(grapefx_ops.items())))
        lines.append("  op counts that changed (before -> after):")
        for op, c in sorted(rw["ops"].items(), key=lambda kv: -abs(kv[1]["after"] - kv[1]["before"])):
            d = c["after"] - c["before"]
            lines.append(f"    {op:<58} {c['before']:>5} -> {c['after']:<5} ({d:+d})")
    rep = summary.get("report")
    if rep:
        from grapefx.inspect.report import format_report

        lines.append("")
        lines.append(format_report(rep).rstrip())
    onnx = summary.get("onnx")
    if onnx:
        lines.append("")
        lines.append(f"onnx: {onnx.get('message')}")
        if onnx.get("ok"):
            lines.append(f"  inputs:  {', '.join(onnx['input_names'])}")
            lines.append(f"  outputs: {', '.join(onnx['output_names'])}")
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines) + "\n"


def dump_from_env(backend: Any) -> str | None:
    """If GRAPEFX_DUMP_DIR is set, dump `backend`'s current graphs to a new subfolder; never raises.

    Meant to be called by the backend right after it has privatized a backward graph. Formats come
    from GRAPEFX_DUMP_FORMATS (default code,table,dot). Returns the folder, or None.
    """
    root = os.environ.get(ENV_DIR)
    if not root:
        return None
    try:
        formats = parse_formats(os.environ.get(ENV_FORMATS) or ",".join(ENV_DEFAULT_FORMATS))
        n = getattr(backend, "_grapefx_dump_count", 0) + 1
        backend._grapefx_dump_count = n
        state = getattr(backend, "state", None)
        out = os.path.join(root, f"state{getattr(state, 'id', 0)}_graph{n:02d}")
        res = dump_private_module(backend, out, formats)
        for note in res.notes:
            log.warning("grapefx dump: %s", note)
        log.info("grapefx: dumped graphs to %s", out)
        return out
    except Exception as e:  # noqa: BLE001 - a debugging aid must never break training
        log.warning("grapefx: %s=%s: dump failed: %s: %s", ENV_DIR, root, type(e).__name__, e)
        return None
