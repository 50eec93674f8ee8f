"""Text renderings of a stage: readable Python code, a node table, Graphviz DOT (and SVG via `dot`)."""

from __future__ import annotations

import re
import shutil
import subprocess

import torch
import torch.fx as fx

from grapefx.inspect.diff import GRAPEFX_OP, INSERTED, KEPT, REWRITTEN
from grapefx.inspect.graphs import Namer, Stage, batch_symbols, target_name


def stage_namer(stage: Stage) -> Namer:
    return Namer(batch_symbols(stage.gm))


def render_code(stage: Stage) -> str:
    """The stage as Python: `print_readable` (shapes as annotations), with a valid class name."""
    header = f"# grapefx stage {stage.key}: {stage.title}\n"
    syms = sorted(str(s) for s in batch_symbols(stage.gm))
    if syms:
        header += f"# {', '.join(syms)}: the batch size (symbolic; written B in the node table)\n"
    try:
        body = stage.gm.print_readable(print_output=False, include_stride=False, include_device=False)
        body = re.sub(r"^class [^(]*\(", f"class Stage{stage.key.split('_')[0]}(", body, count=1)
    except Exception:  # noqa: BLE001 - older torch signatures: plain code
        body = stage.gm.code
    return header + body.rstrip() + "\n"


def table_rows(stage: Stage) -> list[dict[str, str]]:
    namer = stage_namer(stage)
    rows = []
    for node in stage.gm.graph.nodes:
        row = {
            "name": node.name,
            "op": node.op,
            "target": target_name(node),
            "shape": namer.val(node.meta.get("val")),
            "batch": namer.layout(stage.layouts[node]) if node in stage.layouts else "",
        }
        if stage.status:
            row["status"] = stage.status.get(node, "")
        row["provenance"] = stage.provenance.get(node, "")
        rows.append(row)
    return rows


def render_table(stage: Stage) -> str:
    rows = table_rows(stage)
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: min(max(len(c), *(len(r[c]) for r in rows)), 48) for c in cols}
    widths["provenance"] = 0  # last column: no padding
    lines = [
        f"# grapefx stage {stage.key}: {stage.title}",
        "# batch: where the batch lives in each tensor: dimN (dim N is the batch), dimN=o*B*i (batch merged "
        "with o outer and i inner factors), - (no batch), ? (not analysed)",
    ]
    if stage.status:
        lines.append(
            "# status (heuristic, see grapefx/inspect/diff.py): kept = recomputes an original node; rewritten = "
            "same op and shape as an original node, new inputs; inserted = new; grapefx-op = grapefx custom op"
        )
    lines.append("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    lines.append("  ".join("-" * max(widths[c], len(c)) for c in cols).rstrip())
    for r in rows:
        lines.append("  ".join(_clip(r[c], widths[c]).ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    return text if width == 0 or len(text) <= width else text[: width - 1] + "~"


# -- DOT --------------------------------------------------------------------------------------
_FILL = {
    KEPT: "white",
    REWRITTEN: "#fff3b0",  # yellow
    INSERTED: "#c7f0c2",  # green
    GRAPEFX_OP: "#ffb38a",  # orange
    "site": "#cfe3ff",  # blue: grad sites of the original backward
    "input": "#eeeeee",
}


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render_dot(stage: Stage) -> str:
    namer = stage_namer(stage)
    lines = [
        f'digraph "{_esc(stage.key)}" {{',
        f'  label="{_esc(stage.key + ": " + stage.title)}"; labelloc=t; fontsize=12;',
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=9];',
        "  edge [arrowsize=0.5, color=gray40];",
    ]
    ids: dict[fx.Node, str] = {}
    for i, node in enumerate(stage.gm.graph.nodes):
        ids[node] = f"n{i}"
        label = [node.name]
        if node.op == "call_function":
            label.append(target_name(node))
        shape = namer.val(node.meta.get("val"))
        if shape:
            label.append(shape)
        if stage.layouts.get(node) is not None and node in stage.layouts:
            label.append("batch " + namer.layout(stage.layouts[node]))
        fill = _fill(stage, node)
        attrs = f'label="{_esc(chr(10).join(label))}"'.replace("\n", "\\n")
        if fill != "white":
            attrs += f', fillcolor="{fill}"'
        if node.op in ("placeholder", "output"):
            attrs += ", shape=ellipse"
        lines.append(f"  {ids[node]} [{attrs}];")
    for node in stage.gm.graph.nodes:
        for a in node.all_input_nodes:
            if _is_size(a):
                continue  # the batch-size SymInt feeds hundreds of reshapes: edges would swamp the layout
            lines.append(f"  {ids[a]} -> {ids[node]};")
    lines.extend(_legend(stage))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, int)) and node.op in ("placeholder", "call_function")


def _fill(stage: Stage, node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return _FILL["input"]
    if stage.status:
        return _FILL.get(stage.status.get(node, KEPT), "white")
    if "site[" in stage.provenance.get(node, ""):
        return _FILL["site"]
    return "white"


def _legend(stage: Stage) -> list[str]:
    if stage.status:
        entries = [
            (KEPT, "kept (recomputes an original node)"),
            (REWRITTEN, "rewritten (same op+shape, new inputs)"),
            (INSERTED, "inserted by grapefx"),
            (GRAPEFX_OP, "grapefx custom op"),
        ]
    elif any("site[" in p for p in stage.provenance.values()):
        entries = [("site", "grad site (sums a parameter gradient over the batch)")]
    else:
        return []
    out = ["  subgraph cluster_legend {", '    label="legend (heuristic)"; fontsize=10; style=dashed;']
    for i, (key, text) in enumerate(entries):
        out.append(f'    legend{i} [label="{_esc(text)}", fillcolor="{_FILL[key]}"];')
    out.append("  }")
    return out


def dot_binary() -> str | None:
    return shutil.which("dot")


def render_svg(dot_path: str, svg_path: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Run Graphviz `dot`; (ok, message)."""
    exe = dot_binary()
    if exe is None:
        return False, "Graphviz `dot` not found on PATH: wrote DOT only (apt-get install graphviz for SVG)"
    try:
        proc = subprocess.run([exe, "-Tsvg", dot_path, "-o", svg_path], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"`dot` took longer than {timeout:.0f} s on {dot_path}: graph too large for SVG, DOT kept"
    if proc.returncode != 0:
        return False, f"`dot` failed on {dot_path}: {proc.stderr.strip()[:300]}"
    return True, svg_path
