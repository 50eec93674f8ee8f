"""Liveness over an fx graph: which storages are alive when each node runs, and the peak.

Model (a static ESTIMATE, checked against torch.profiler in tests/test_schedule.py):
nodes run in the given order; each node's tensor outputs are allocated when it runs (bytes from
`meta["val"]`) and freed right after the last node that reads them. Views and in-place ops share
their base's storage, so a storage lives until the last use of any alias. Graph inputs (saved
activations, tangents) are live from the start and die after their last use — AOTAutograd hands
the backward its inputs in a list it clears — unless `free_inputs=False` (a caller that keeps
them). Graph outputs live to the end. An op's internal scratch is modelled where it is large and known
(convolutions on CPU, calibrated once per shape: grapefx/schedule/workspace.py; the noise op's draw
chunk) as a storage that lives only while the op runs. Not modelled: allocator caching and fragmentation, other ops'
temporaries, Inductor fusion, parameters and optimizer state outside the graph.

Sizes are sympy expressions in the batch symbol where shapes are symbolic; `MemoryModel.at(batch)`
makes them concrete for one batch size (default: the size the graph was compiled with).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.aliasing import is_alias, is_noise, reuses_input_storage
from grapefx.inspect.graphs import batch_symbols, concrete, tensor_vals
from grapefx.privacy.noise import noise_scratch_bytes
from grapefx.schedule.workspace import Workspace, workspace_of


def symbolic_nbytes(t: torch.Tensor) -> sympy.Expr:
    n: sympy.Expr = sympy.Integer(t.element_size())
    for s in t.shape:
        n = n * (sympy.sympify(s.node.expr) if isinstance(s, torch.SymInt) else sympy.Integer(int(s)))
    return n


@dataclass
class MemoryModel:
    """Storages of a graph: who allocates them, who reads them, their sizes (symbolic)."""

    nodes: list[fx.Node]
    allocates: dict[fx.Node, list[int]]  # storages a node creates
    reads: dict[fx.Node, set[int]]  # storages a node reads (through any alias)
    size_expr: list[sympy.Expr]  # per storage
    pinned: set[int]  # live to the end (graph outputs; inputs when the caller keeps them)
    owner: list[fx.Node]  # per storage: the node that allocated it
    symbols: set[sympy.Symbol] = field(default_factory=set)
    hint: dict[sympy.Symbol, int] = field(default_factory=dict)
    workspaces: dict[int, Workspace] = field(default_factory=dict)  # storages that are op scratch

    @staticmethod
    def of(gm: fx.GraphModule, free_inputs: bool = True) -> MemoryModel:
        nodes = [n for n in gm.graph.nodes if n.op != "output"]
        storages: dict[fx.Node, list[int]] = {}
        elems: dict[fx.Node, list[list[int]]] = {}
        allocates: dict[fx.Node, list[int]] = {}
        reads: dict[fx.Node, set[int]] = {}
        size_expr: list[sympy.Expr] = []
        owner: list[fx.Node] = []
        hint: dict[sympy.Symbol, int] = {}
        workspaces: dict[int, Workspace] = {}

        def new_storage(t: torch.Tensor, node: fx.Node) -> int:
            for s in t.shape:
                if isinstance(s, torch.SymInt):
                    for sym in sympy.sympify(s.node.expr).free_symbols:
                        hint.setdefault(sym, _symbol_hint(s, sym))
            size_expr.append(symbolic_nbytes(t))
            owner.append(node)
            allocates.setdefault(node, []).append(len(size_expr) - 1)
            return len(size_expr) - 1

        for n in nodes:
            val = n.meta.get("val")
            allocates.setdefault(n, [])
            reads[n] = {s for a in n.all_input_nodes for s in storages.get(a, [])}
            first = next((a for a in n.all_input_nodes if storages.get(a)), None)
            if n.op == "call_function" and n.target is operator.getitem and n.args[0] in elems:
                parts = elems[n.args[0]]
                storages[n] = list(parts[n.args[1]]) if n.args[1] < len(parts) else []
            elif n.op == "call_function" and first is not None and (is_alias(n) or reuses_input_storage(n)):
                storages[n] = list(storages[first])
                if isinstance(val, (list, tuple)):
                    elems[n] = [list(storages[first]) for _ in val]
            elif isinstance(val, (list, tuple)):
                parts = [[new_storage(v, n)] if isinstance(v, torch.Tensor) else [] for v in val]
                elems[n] = parts
                storages[n] = [s for p in parts for s in p]
            else:
                storages[n] = [new_storage(t, n) for t in tensor_vals(val)]
            ws = workspace_of(n, symbolic_nbytes)
            if ws is not None:  # read by no one: freed right after the node
                size_expr.append(ws.expr)
                owner.append(n)
                allocates[n].append(len(size_expr) - 1)
                workspaces[len(size_expr) - 1] = ws
            elif is_noise(n) and isinstance(val, torch.Tensor):  # the temporary the noise is drawn into
                scratch = noise_scratch_bytes(concrete(val.numel()), val.dtype, val.device, n.args[2])
                size_expr.append(sympy.Integer(scratch))
                owner.append(n)
                allocates[n].append(len(size_expr) - 1)
        pinned = {s for a in gm.graph.output_node().all_input_nodes for s in storages.get(a, [])}
        if not free_inputs:
            pinned |= {s for n in nodes if n.op == "placeholder" for s in storages[n]}
        return MemoryModel(nodes, allocates, reads, size_expr, pinned, owner, batch_symbols(gm), hint, workspaces)

    def readers(self) -> list[list[fx.Node]]:
        """Per storage, the nodes that read it, in model order."""
        result: list[list[fx.Node]] = [[] for _ in self.size_expr]
        for n in self.nodes:
            for s in self.reads[n]:
                result[s].append(n)
        return result

    def sizes(self, batch: int | None = None) -> list[int]:
        """Concrete bytes per storage for `batch` (None: the compiled example batch)."""
        subs = dict(self.hint)
        if batch is not None:
            subs.update({s: batch for s in self.symbols})
        sizes = [int(e.xreplace(subs)) if e.free_symbols else int(e) for e in self.size_expr]
        if batch is not None:  # scratch is not linear in the batch: calibrate at this one
            for s, ws in self.workspaces.items():
                sizes[s] = ws.bytes_at({sym: sympy.Integer(batch) for sym in self.symbols})
        return sizes

    def simulate(self, order: Sequence[fx.Node] | None = None, batch: int | None = None) -> Liveness:
        return simulate(self, list(order) if order is not None else self.nodes, self.sizes(batch))

    def live_exprs(self, order: Sequence[fx.Node] | None = None) -> list[sympy.Expr]:
        """The live bytes while each node runs, as expressions in the batch symbol."""
        order = list(order) if order is not None else self.nodes
        free_at = _free_positions(self, order)
        live: sympy.Expr = sympy.Integer(0)
        result = []
        for i, n in enumerate(order):
            live = live + sum((self.size_expr[s] for s in self.allocates[n]), sympy.Integer(0))
            result.append(sympy.expand(live))
            live = live - sum((self.size_expr[s] for s in free_at.get(i, [])), sympy.Integer(0))
        return result


@dataclass(frozen=True)
class Liveness:
    peak_bytes: int
    peak_index: int
    peak_node: str
    live_at_peak: tuple[tuple[str, int], ...]  # (allocating node, bytes), largest first
    input_bytes: int
    output_bytes: int

    def as_dict(self, top: int = 10) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_at": self.peak_node,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "live_at_peak": [{"node": n, "bytes": b} for n, b in self.live_at_peak[:top]],
        }


def _free_positions(model: MemoryModel, order: list[fx.Node]) -> dict[int, list[int]]:
    last: dict[int, int] = {}
    for i, n in enumerate(order):
        for s in model.allocates[n]:
            last.setdefault(s, i)
        for s in model.reads[n]:
            last[s] = i
    free_at: dict[int, list[int]] = {}
    for s, i in last.items():
        if s not in model.pinned:
            free_at.setdefault(i, []).append(s)
    return free_at


def live_curve(model: MemoryModel, order: list[fx.Node], sizes: list[int]) -> list[int]:
    """Live bytes while each node of `order` runs (its outputs allocated, nothing freed yet)."""
    free_at = _free_positions(model, order)
    total = 0
    curve = []
    for i, n in enumerate(order):
        total += sum(sizes[s] for s in model.allocates[n])
        curve.append(total)
        total -= sum(sizes[s] for s in free_at.get(i, []))
    return curve


def simulate(model: MemoryModel, order: list[fx.Node], sizes: list[int]) -> Liveness:
    """Peak live bytes running `order` (every node of the model exactly once, topologically)."""
    free_at = _free_positions(model, order)
    live: set[int] = set()
    total = peak = 0
    peak_index = 0
    peak_live: set[int] = set()
    for i, n in enumerate(order):
        for s in model.allocates[n]:
            live.add(s)
            total += sizes[s]
        if total > peak or i == 0:
            peak, peak_index, peak_live = total, i, set(live)
        for s in free_at.get(i, []):
            live.discard(s)
            total -= sizes[s]
    at_peak = sorted(((model.owner[s].name, sizes[s]) for s in peak_live), key=lambda x: -x[1])
    inputs = sum(sizes[s] for n in order if n.op == "placeholder" for s in model.allocates[n])
    outputs = sum(sizes[s] for s in model.pinned if model.owner[s].op != "placeholder")
    name = order[peak_index].name if order else ""
    return Liveness(peak, peak_index, name, tuple(at_peak), inputs, outputs)


def peak_envelope(model: MemoryModel) -> sympy.Expr:
    """The peak as a function of the batch symbol: the max over nodes of the live bytes (only the
    pieces that can be the max for some batch >= 1 are kept)."""
    exprs = set(model.live_exprs())
    if not model.symbols:
        return sympy.Integer(max((int(e) for e in exprs), default=0))
    if len(model.symbols) > 1:
        return sympy.Max(*exprs)
    (b,) = tuple(model.symbols)
    lines = []
    for e in exprs:
        poly = sympy.Poly(e, b) if e.free_symbols else None
        if poly is not None and poly.degree() <= 1:
            coeffs = poly.all_coeffs()
            slope, const = coeffs if len(coeffs) == 2 else [0, coeffs[0]]
            lines.append((int(slope), int(const)))
        else:
            lines.append((0, int(e)) if not e.free_symbols else None)
    if any(line is None for line in lines):
        return sympy.Max(*exprs)
    # Upper envelope for b >= 1: keep a line if it is the max at b=1 or has the largest slope
    # among lines not dominated everywhere on [1, inf).
    kept = [
        (m, c)
        for (m, c) in set(lines)
        if not any((m2 >= m and m2 + c2 >= m + c) and (m2, c2) != (m, c) for (m2, c2) in lines)
    ]
    return sympy.Max(*(m * b + c for m, c in kept)) if len(kept) > 1 else kept[0][0] * b + kept[0][1]


def _symbol_hint(s: torch.SymInt, sym: sympy.Symbol) -> int:
    env = s.node.shape_env
    values = getattr(env, "backed_var_to_val", None) or env.var_to_val
    if sym in values:
        return int(values[sym])
    return concrete(s)
