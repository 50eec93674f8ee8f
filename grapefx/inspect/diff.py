"""What the DP rewrite changed: nodes of the private backward matched against the original.

The rewrite re-traces the backward (make_fx), so node names say nothing: `mm_1` before and after are
unrelated. Matching is therefore structural, and a *heuristic*:

1. placeholders match by position (both graphs take the same backward inputs);
2. **kept**: a private node whose target, constant arguments and (already matched) input nodes equal
   those of an original node: it recomputes exactly that original value (one-to-one, in graph order);
3. **grapefx op**: a `grapefx::` custom op (`record_norms`, `add_gaussian_noise`);
4. **rewritten**: not kept, but an original node with the same target and the same shape is still
   unmatched: most likely that node recomputed from new inputs (e.g. the weighted `mm` that replaces
   a weight-gradient `mm`, and the reshapes after it). Target+shape can pair the wrong twins when a
   graph has several same-shaped gradients; the count is right, the pairing may not be;
5. **inserted**: everything else (per-sample norms, clip factors, noise scaling, ...).
Original nodes left unmatched are reported as **removed** (typically the non-private batch sums).

Roles of inserted nodes are guessed from their position relative to the grapefx ops: ancestors of
`record_norms` compute per-sample norms, the noise ops' std inputs scale the noise, the rest
clip and weight. A node's parameter is the one output it alone feeds. If the rewrite stores
`node.meta["grapefx"]["role"]` / `["param"]`, those win over the guesses.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from grapefx.inspect.graphs import Namer, batch_symbols, is_grapefx_op, is_noise_op, op_key

KEPT, REWRITTEN, INSERTED, GRAPEFX_OP = "kept", "rewritten", "inserted", "grapefx-op"


@dataclass
class GraphDiff:
    status: dict[fx.Node, str] = field(default_factory=dict)  # private node -> status
    matched: dict[fx.Node, fx.Node] = field(default_factory=dict)  # private node -> original node
    removed: list[fx.Node] = field(default_factory=list)  # original nodes without a counterpart
    roles: dict[fx.Node, str] = field(default_factory=dict)  # private node -> role guess
    params: dict[fx.Node, str] = field(default_factory=dict)  # private node -> parameter name
    counts_before: Counter = field(default_factory=Counter)
    counts_after: Counter = field(default_factory=Counter)

    def provenance(self, original: dict[fx.Node, str]) -> dict[fx.Node, str]:
        out: dict[fx.Node, str] = {}
        for node, status in self.status.items():
            parts = []
            if node in self.matched:
                src = self.matched[node]
                if status == REWRITTEN:
                    parts.append(f"{status} {src.name}")
                elif node.op == "placeholder":
                    parts.append(f"= {src.name}")
                if original.get(src):
                    parts.append(original[src])
            if node in self.roles:
                parts.append(self.roles[node])
            if node in self.params and not any(p.endswith(" " + self.params[node]) for p in parts):
                parts.append(self.params[node])
            out[node] = "; ".join(p for p in parts if p)
        return out

    def summary(self) -> dict[str, Any]:
        by_status = Counter(self.status.values())
        ops = sorted(set(self.counts_before) | set(self.counts_after))
        return {
            "nodes_before": sum(self.counts_before.values()),
            "nodes_after": sum(self.counts_after.values()),
            "status": {k: by_status.get(k, 0) for k in (KEPT, REWRITTEN, INSERTED, GRAPEFX_OP)},
            "removed": len(self.removed),
            "ops": {
                op: {"before": self.counts_before.get(op, 0), "after": self.counts_after.get(op, 0)}
                for op in ops
                if self.counts_before.get(op, 0) != self.counts_after.get(op, 0)
            },
            "grapefx_nodes": [n.name for n, s in self.status.items() if s == GRAPEFX_OP],
        }


def _const_key(x: Any) -> Any:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(x.node.expr))
    if isinstance(x, (list, tuple)):
        return tuple(_const_key(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _const_key(v)) for k, v in x.items()))
    if isinstance(x, fx.Node):
        return ("node", id(x))
    return ("c", repr(x))


def _structural_key(node: fx.Node, mapping: dict[fx.Node, fx.Node]) -> Any:
    """Key in terms of original nodes; None if an input has no original counterpart."""
    missing = []

    def sub(a: fx.Node) -> fx.Node:
        m = mapping.get(a)
        if m is None:
            missing.append(a)
            return a
        return m

    args = fx.node.map_arg(node.args, sub)
    kwargs = fx.node.map_arg(node.kwargs, sub)
    if missing:
        return None
    return (node.target, _const_key(args), _const_key(kwargs))


def _shape_key(node: fx.Node, namer: Namer) -> Any:
    return (node.target, namer.val(node.meta.get("val")))


def match_graphs(orig: fx.GraphModule, priv: fx.GraphModule, plan: Any = None) -> GraphDiff:
    diff = GraphDiff()
    o_nodes = [n for n in orig.graph.nodes if n.op not in ("output",)]
    p_nodes = [n for n in priv.graph.nodes if n.op not in ("output",)]
    diff.counts_before = Counter(op_key(n) for n in o_nodes if n.op == "call_function")
    diff.counts_after = Counter(op_key(n) for n in p_nodes if n.op == "call_function")

    index: dict[Any, list[fx.Node]] = {}
    identity = {n: n for n in o_nodes}
    for n in o_nodes:
        if n.op == "call_function":
            index.setdefault(_structural_key(n, identity), []).append(n)
    used: set[fx.Node] = set()
    mapping: dict[fx.Node, fx.Node] = {}
    o_ph = [n for n in o_nodes if n.op == "placeholder"]
    p_ph = [n for n in p_nodes if n.op == "placeholder"]
    for p, o in zip(p_ph, o_ph):
        mapping[p] = o
        used.add(o)
        diff.status[p] = KEPT

    unmatched: list[fx.Node] = []
    for n in p_nodes:
        if n.op == "placeholder":
            continue
        if is_grapefx_op(n):
            diff.status[n] = GRAPEFX_OP
            continue
        key = _structural_key(n, mapping) if n.op == "call_function" else None
        cands = [c for c in index.get(key, []) if c not in used] if key is not None else []
        if cands:
            mapping[n] = cands[0]
            used.add(cands[0])
            diff.status[n] = KEPT
        else:
            unmatched.append(n)

    # Second chance by target + shape for nodes recomputed from new inputs.
    namer = Namer(batch_symbols(orig) | batch_symbols(priv))
    by_shape: dict[Any, list[fx.Node]] = {}
    for n in o_nodes:
        if n not in used and n.op == "call_function":
            by_shape.setdefault(_shape_key(n, namer), []).append(n)
    for n in unmatched:
        cands = by_shape.get(_shape_key(n, namer), [])
        if cands:
            src = cands.pop(0)
            used.add(src)
            diff.matched[n] = src
            diff.status[n] = REWRITTEN
        else:
            diff.status[n] = INSERTED
    for p, o in mapping.items():
        diff.matched[p] = o
    diff.removed = [n for n in o_nodes if n not in used and n.op == "call_function"]
    _guess_roles(priv, diff, plan)
    return diff


def _guess_roles(priv: fx.GraphModule, diff: GraphDiff, plan: Any) -> None:
    nodes = list(priv.graph.nodes)
    norms_ops = [n for n in nodes if is_grapefx_op(n) and n.target._opname == "record_norms"]
    noise_ops = [n for n in nodes if is_noise_op(n)]
    before_norms = _ancestors(norms_ops)
    after_noise = _descendants(noise_ops)
    noised = _ancestors([n.args[0] for n in noise_ops if isinstance(n.args[0], fx.Node)])
    noise_scale = _ancestors([n.args[1] for n in noise_ops if isinstance(n.args[1], fx.Node)]) - noised
    for n in nodes:
        meta = n.meta.get("grapefx") or {}
        if meta.get("role") and meta.get("pass") != "replay":  # provenance recorded by the rewrite
            diff.roles[n] = f"{meta['pass']}: {meta['role']}"
        elif n in norms_ops:
            diff.roles[n] = "record per-sample norms"
        elif n in noise_ops:
            diff.roles[n] = "noise"
        elif diff.status.get(n) in (INSERTED, REWRITTEN):
            if n in before_norms:
                diff.roles[n] = "per-sample norm"
            elif n in after_noise:
                diff.roles[n] = "after noise"
            elif n in noise_scale:
                diff.roles[n] = "noise scale"
            else:
                diff.roles[n] = "clip / weighted sum"
        if meta.get("param"):
            diff.params[n] = str(meta["param"])
    if plan is None:
        return
    outputs = priv.graph.output_node().args[0]
    owners: dict[fx.Node, set[str]] = {}
    for g in plan.grads:
        out = outputs[g.out_index] if g.out_index < len(outputs) else None
        if isinstance(out, fx.Node):
            for a in _ancestors([out]):
                owners.setdefault(a, set()).add(g.name)
    for n, names in owners.items():
        if len(names) == 1 and n not in diff.params and diff.status.get(n) != KEPT:
            diff.params[n] = next(iter(names))


def _ancestors(roots: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _descendants(roots: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(u for u in n.users if u.op != "output")
    return seen
