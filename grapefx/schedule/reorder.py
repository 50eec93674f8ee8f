"""Memory-aware node order: a greedy list scheduler, an exact bottleneck search, and never-worse.

The order of an fx graph decides its peak: a node that allocates without freeing (an `mm` whose
inputs stay alive) is best run just before its result is needed; a node that frees its inputs
(a reduction, a contraction whose operands die) is best run early. Candidates, the lowest peak wins:

* the received order;
* greedy list scheduling forwards (run the ready node that grows the live bytes least) and
  backwards from the output (place, as late as possible, the node whose placement grows them
  least) — near-linear, good on backward graphs, which are nearly chains;
* each of those after sinking: a node moves to just before its first user when that cannot raise
  any position's live bytes;
* exact (graphs up to EXACT_MAX_NODES): a best-first search over sets of executed nodes keyed by
  the peak so far (the live bytes of a set do not depend on the path to it, so the first complete
  set popped is optimal), bounded by the best peak known and by a state budget. A ready node that
  allocates nothing is run at once (that never raises a later position), which keeps view-heavy
  aten graphs tractable.

The result is never worse than the received order (it is a candidate). Side-effecting nodes (noise
draws, norm records, collectives) keep their relative order, so the same seed gives the same noise;
replays of saved activations stay after the clip barrier.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from grapefx.schedule.liveness import MemoryModel, simulate

EXACT_MAX_NODES = 200  # beyond this the exact search rarely finishes in budget: greedy orders only
# The exact search's state budget. At 200k, searches that ran out cost ~5 s of compile time on
# 170-190-node graphs (session 11, zoo models); the ones that needed more than 20k states to finish
# improved peaks of a few KB (toy models), so the budget is 20k (~0.3 s).
EXACT_MAX_STATES = 20_000


@dataclass(frozen=True)
class OrderResult:
    order: list[fx.Node]
    peak_bytes: int
    received_peak_bytes: int
    method: str  # "received" / "sunk" / "greedy" / "reverse-greedy" / "exact" (+ sinking)


def dependency_graph(model: MemoryModel) -> nx.DiGraph:
    """Data edges, a chain through the side-effecting nodes (their order is observable), and
    barrier -> replay edges."""
    dag = nx.DiGraph()
    dag.add_nodes_from(model.nodes)
    for n in model.nodes:
        for a in n.all_input_nodes:
            dag.add_edge(a, n)
    impure = [n for n in model.nodes if _has_side_effects(n)]
    dag.add_edges_from(zip(impure, impure[1:]))
    # Replays of saved activations (passes/recompute_operands.py) exist to run after the clip
    # barrier; computed earlier they would only hold memory.
    barrier = [n for n in model.nodes if _role(n) == ("clip", "*")]
    for n in model.nodes:
        if _role(n)[0] in ("recompute", "recompute_view"):
            dag.add_edges_from((b, n) for b in barrier)
    return dag


def _role(node: fx.Node) -> tuple[str, str]:
    info = node.meta.get("grapefx") or {}
    return info.get("role", ""), info.get("param", "")


# grapefx ops that are plain functions of their inputs; every other grapefx op draws noise, reads or
# writes the privacy state, or communicates, so the scheduler keeps those in their traced order.
PURE_GRAPEFX_OPS = frozenset({"conv_per_sample_weight_grad", "group_norm_per_sample_affine_grads"})


def _has_side_effects(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "grapefx":
        return target._opname not in PURE_GRAPEFX_OPS
    return node.is_impure()


class _LazyHeap:
    """A priority queue whose entries can be rescored (stale entries are skipped on pop)."""

    def __init__(self) -> None:
        self.heap: list[tuple] = []
        self.key: dict[fx.Node, tuple] = {}

    def push(self, node: fx.Node, key: tuple) -> None:
        self.key[node] = key
        heapq.heappush(self.heap, (*key, id(node), node))

    def pop(self) -> fx.Node | None:
        while self.heap:
            entry = heapq.heappop(self.heap)
            node = entry[-1]
            if self.key.get(node) == entry[:-2]:
                del self.key[node]
                return node
        return None


def greedy_order(model: MemoryModel, dag: nx.DiGraph, sizes: list[int]) -> list[fx.Node]:
    """Forward list scheduling: run the ready node that grows the live bytes least."""
    position = {n: i for i, n in enumerate(model.nodes)}
    readers = model.readers()
    readers_left = [len(r) for r in readers]
    waiting = {n: dag.in_degree(n) for n in model.nodes}

    def key(n: fx.Node) -> tuple:
        if _is_input(n):  # inputs are live from the start whatever the order says
            return (0, 0, position[n])
        alloc = sum(sizes[s] for s in model.allocates[n] if readers_left[s] > 0 or s in model.pinned)
        freed = sum(sizes[s] for s in model.reads[n] if readers_left[s] == 1 and s not in model.pinned)
        return (1, alloc - freed, position[n])

    ready = _LazyHeap()
    for n in model.nodes:
        if waiting[n] == 0:
            ready.push(n, key(n))
    order: list[fx.Node] = []
    done: set[fx.Node] = set()
    while (n := ready.pop()) is not None:
        order.append(n)
        done.add(n)
        for s in model.reads[n]:
            readers_left[s] -= 1
            if readers_left[s] == 1:  # its last reader would now free it: rescore that reader
                last = next(r for r in readers[s] if r not in done)
                if last in ready.key:
                    ready.push(last, key(last))
        for succ in dag.successors(n):
            waiting[succ] -= 1
            if waiting[succ] == 0:
                ready.push(succ, key(succ))
    return order


def reverse_greedy_order(model: MemoryModel, dag: nx.DiGraph, sizes: list[int]) -> list[fx.Node]:
    """Backward list scheduling, from the output: place (as late as possible) the node whose
    placement grows the live bytes least — an allocation is pushed down to just before its users."""
    position = {n: i for i, n in enumerate(model.nodes)}
    readers = model.readers()
    live = set(model.pinned)
    users_left = {n: dag.out_degree(n) for n in model.nodes}

    def key(n: fx.Node) -> tuple:
        if _is_input(n):
            return (1, 0, -position[n])
        grows = sum(sizes[s] for s in model.reads[n] if s not in live)
        dies = sum(sizes[s] for s in model.allocates[n] if s in live)
        return (0, grows - dies, -position[n])

    ready = _LazyHeap()
    for n in model.nodes:
        if users_left[n] == 0:
            ready.push(n, key(n))
    placed: list[fx.Node] = []
    while (n := ready.pop()) is not None:
        placed.append(n)
        live -= set(model.allocates[n])
        new = [s for s in model.reads[n] if s not in live]
        live |= set(new)
        for s in new:  # rescore the nodes whose score depends on s
            for other in (model.owner[s], *readers[s]):
                if other in ready.key:
                    ready.push(other, key(other))
        for pred in dag.predecessors(n):
            users_left[pred] -= 1
            if users_left[pred] == 0:
                ready.push(pred, key(pred))
    order = placed[::-1]
    inputs = [n for n in order if _is_input(n)]
    return inputs + [n for n in order if not _is_input(n)]


def sink_allocations(model: MemoryModel, dag: nx.DiGraph, order: list[fx.Node], sizes: list[int]) -> list[fx.Node]:
    """Move nodes to just before their first user when that cannot raise any position's live
    bytes: the output is live for a shorter time, and the inputs that now live longer (those it
    was, or becomes, the last reader of) are together no larger than the output."""
    order = list(order)
    position = {m: k for k, m in enumerate(order)}
    readers = model.readers()
    for n in list(reversed(order)):
        if _is_input(n) or _has_side_effects(n) or not model.allocates[n]:
            continue
        i = position[n]
        users = [position[u] for u in dag.successors(n)]
        if not users:
            continue
        j = min(users)
        if j == i + 1:
            continue
        extended = sum(
            sizes[s]
            for s in model.reads[n]
            if s not in model.pinned and not any(position[r] >= j for r in readers[s] if r is not n)
        )
        if extended <= sum(sizes[s] for s in model.allocates[n]):
            move_to(order, position, i, j - 1)
    return order


def move_to(order: list[fx.Node], position: dict[fx.Node, int], i: int, j: int) -> None:
    """order.insert(j, order.pop(i)), keeping `position` (node -> index) up to date in O(|i - j|):
    recomputing it for every node made the passes quadratic (~40 s on a 16-layer Llama)."""
    order.insert(j, order.pop(i))
    for k in range(min(i, j), max(i, j) + 1):
        position[order[k]] = k


# Outputs up to this size may be computed early (`hoist_frees`): they cost next to nothing to keep.
SMALL_OUTPUT_BYTES = 64 * 1024


def hoist_frees(model: MemoryModel, dag: nx.DiGraph, order: list[fx.Node], sizes: list[int]) -> list[fx.Node]:
    """Move nodes to just after their last predecessor when that cannot raise any position's live
    bytes (the mirror of `sink_allocations`): the node stays the last reader of inputs that together
    are at least as large as its output, so they are freed earlier by as much as it allocates early.
    Nodes with a small output move too (a per-sample norm statistic read from an activation and its
    gradient: greedy list scheduling leaves them late, and moved up they let the buffers' other
    readers be the last); the caller keeps the order only if its simulated peak is lower."""
    order = list(order)
    position = {m: k for k, m in enumerate(order)}
    # Inputs never move, and a node never moves above one, so their positions stay fixed.
    inputs = [k for k, m in enumerate(order) if _is_input(m)]
    readers = model.readers()
    for n in list(order):
        if _is_input(n) or _has_side_effects(n):
            continue
        i = position[n]
        j = max((position[p] for p in dag.predecessors(n)), default=-1) + 1
        below = bisect.bisect_left(inputs, i)  # the inputs above position i
        if below:
            j = max(j, inputs[below - 1] + 1)  # never above an input
        if j >= i:
            continue
        freed = sum(
            sizes[s]
            for s in model.reads[n]
            if s not in model.pinned and all(position[r] < j for r in readers[s] if r is not n)
        )
        allocated = sum(sizes[s] for s in model.allocates[n])
        if freed >= allocated or allocated <= SMALL_OUTPUT_BYTES:
            move_to(order, position, i, j)
    return order


def exact_order(
    model: MemoryModel, dag: nx.DiGraph, sizes: list[int], bound: int | None = None, max_states: int = EXACT_MAX_STATES
) -> list[fx.Node] | None:
    """The order of least peak, or None if more than `max_states` sets would have to be explored
    (or none beats `bound`)."""
    nodes = model.nodes
    index = {n: i for i, n in enumerate(nodes)}
    preds = [sum(1 << index[p] for p in dag.predecessors(n)) for n in nodes]
    readers = [0] * len(sizes)
    for n in nodes:
        for s in model.reads[n]:
            readers[s] |= 1 << index[n]
    alloc_bytes = [sum(sizes[s] for s in model.allocates[n]) for n in nodes]
    touched = [sorted(set(model.reads[n]) | set(model.allocates[n])) for n in nodes]
    full = (1 << len(nodes)) - 1
    limit = bound if bound is not None else float("inf")

    def after(done: int, live: int, i: int) -> int:
        for s in touched[i]:
            if s not in model.pinned and readers[s] & ~done == 0:
                live -= sizes[s]
        return live

    # Inputs are live from the start: begin with all of them executed.
    start = live0 = peak0 = 0
    for i, n in enumerate(nodes):
        if _is_input(n):
            start |= 1 << i
            live0 += alloc_bytes[i]
            peak0 = max(peak0, live0)
            live0 = after(start, live0, i)
    best: dict[int, int] = {start: peak0}
    parent: dict[int, tuple[int, int]] = {}
    heap: list[tuple[int, int, int]] = [(peak0, live0, start)]  # (peak so far, live bytes, executed set)
    explored = 0
    while heap:
        peak, live, done = heapq.heappop(heap)
        if done == full:
            return _unwind(parent, nodes, done)
        if best.get(done, peak + 1) < peak:
            continue
        explored += 1
        if explored > max_states:
            return None
        ready = [i for i in range(len(nodes)) if not done >> i & 1 and not preds[i] & ~done]
        # Dominance: a ready node that allocates nothing (a view, a reduction to an existing
        # buffer) never raises any later position by running now, so it alone is expanded.
        free_step = next((i for i in ready if alloc_bytes[i] == 0), None)
        for i in ready if free_step is None else [free_step]:
            bit = 1 << i
            during = live + alloc_bytes[i]
            new_peak = max(peak, during)
            if new_peak >= limit:
                continue
            nxt = done | bit
            if new_peak < best.get(nxt, limit):
                best[nxt] = new_peak
                parent[nxt] = (done, i)
                heapq.heappush(heap, (new_peak, after(nxt, during, i), nxt))
    return None


def _unwind(parent: dict[int, tuple[int, int]], nodes: list[fx.Node], done: int) -> list[fx.Node]:
    order = []
    while done in parent:
        done, i = parent[done]
        order.append(nodes[i])
    return [n for n in nodes if _is_input(n)] + order[::-1]


def best_order(model: MemoryModel, batch: int | None = None, max_states: int = EXACT_MAX_STATES) -> OrderResult:
    """The lowest-peak order among the received, greedy and (when in budget) exact orders."""
    sizes = model.sizes(batch)
    dag = dependency_graph(model)
    received = simulate(model, model.nodes, sizes).peak_bytes
    best = OrderResult(model.nodes, received, received, "received")
    sunk = sink_allocations(model, dag, model.nodes, sizes)
    peak = simulate(model, sunk, sizes).peak_bytes
    if peak < best.peak_bytes:
        best = OrderResult(sunk, peak, received, "sunk")
    for method, fn in (("greedy", greedy_order), ("reverse-greedy", reverse_greedy_order)):
        order = sink_allocations(model, dag, fn(model, dag, sizes), sizes)
        peak = simulate(model, order, sizes).peak_bytes
        if peak < best.peak_bytes:
            best = OrderResult(order, peak, received, method)
        hoisted = sink_allocations(model, dag, hoist_frees(model, dag, order, sizes), sizes)
        peak = simulate(model, hoisted, sizes).peak_bytes
        if peak < best.peak_bytes:
            best = OrderResult(hoisted, peak, received, f"{method}+hoist")
    if max_states > 0 and len(model.nodes) <= EXACT_MAX_NODES:
        exact = exact_order(model, dag, sizes, bound=best.peak_bytes, max_states=max_states)
        if exact is not None:
            peak = simulate(model, exact, sizes).peak_bytes
            if peak < best.peak_bytes:
                best = OrderResult(exact, peak, received, "exact")
    return best


def apply_order(gm: fx.GraphModule, order: list[fx.Node]) -> None:
    """Rearrange `gm`'s nodes in place into `order` (inputs stay first, the output last)."""
    output = gm.graph.output_node()
    for n in order:
        if not _is_input(n):
            output.prepend(n)  # moves n to just before the output: the nodes line up in order
    gm.graph.lint()  # raises if the order was not topological
    gm.recompile()


def copy_graph_module(gm: fx.GraphModule, codegen: fx.graph.CodeGen | None = None) -> fx.GraphModule:
    """A copy of `gm` with its own graph (reordering it leaves `gm` as it was)."""
    graph = fx.Graph()
    out = graph.output(graph.graph_copy(gm.graph, {}))
    out.meta = dict(gm.graph.output_node().meta)
    if codegen is not None:
        graph.set_codegen(codegen)
    return fx.GraphModule(gm, graph)


def _is_input(node: fx.Node) -> bool:
    return node.op in ("placeholder", "get_attr")
