"""Store vs recompute: saved activations needed after the clip barrier, recomputed there instead.

With flat clipping a layer's input activation `a` is read twice: by its per-sample norm (early) and
by its weighted contraction (after the barrier, when every norm is known), so it stays alive through
the whole backward. When the forward computed `a` from other saved tensors by a short chain of
elementwise ops (gelu(h) from h, a LayerNorm output from x, mean, rstd and the affine weights), that
chain can be replayed after the barrier: `a` then dies at its last use before the barrier and only
its sources must wait — which pays off when they are smaller, or are kept anyway. The memory
scheduler (`schedule_memory.py`) decides per activation by simulating the peak.

The replayed nodes are copies of the forward's own aten nodes on the same inputs, so the values are
the same (bitwise on the eager path).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from grapefx.analysis.aliasing import is_alias
from grapefx.schedule.reorder import copy_graph_module

MAX_RECIPE_NODES = 16
_CONSTANT_OPS = {"scalar_tensor", "full", "zeros", "ones"}
# Cheap (O(numel)), deterministic ops worth replaying besides pointwise ones: normalizations.
_CHEAP_OPS = {"native_layer_norm", "native_group_norm"}
_SYM_OPS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg)


@dataclass(frozen=True)
class Recipe:
    """How the forward computed saved tensor `target` from `sources` (also saved / inputs)."""

    target: str  # forward node name = backward placeholder name
    nodes: tuple[fx.Node, ...]  # forward nodes, topological, the last computes `target`
    sources: tuple[str, ...]  # forward node names the recipe reads (backward placeholders)


def find_recipes(fw_gm: fx.GraphModule, available: set[str]) -> dict[str, Recipe]:
    """Recipes for the saved forward outputs made of elementwise / view / constant ops over other
    tensors in `available` (the names the backward receives)."""
    outputs = [n for n in fw_gm.graph.output_node().all_input_nodes if n.name in available]
    recipes: dict[str, Recipe] = {}
    for target in outputs:
        recipe = _recipe(target, available)
        if recipe is not None:
            recipes[target.name] = recipe
    return recipes


def _replayable(node: fx.Node) -> bool:
    t = node.target
    if node.op != "call_function":
        return False
    if t in _SYM_OPS:  # size arithmetic of views (B*T)
        return True
    if t is operator.getitem:
        return _replayable(node.args[0])
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t._opname in _CONSTANT_OPS or t._opname in _CHEAP_OPS:
        return True
    if torch.Tag.nondeterministic_seeded in t.tags:
        return False
    return torch.Tag.pointwise in t.tags or is_alias(node) and not t._schema.is_mutable


def _recipe(target: fx.Node, available: set[str]) -> Recipe | None:
    if not _replayable(target):
        return None
    nodes: set[fx.Node] = set()
    sources: set[str] = set()
    stack = [target]
    while stack:
        n = stack.pop()
        if n in nodes:
            continue
        nodes.add(n)
        if len(nodes) > MAX_RECIPE_NODES:
            return None
        for a in n.all_input_nodes:
            if a.name in available and a is not target:
                sources.add(a.name)
            elif _replayable(a):
                stack.append(a)
            else:
                return None
    if not sources:
        return None
    ordered = tuple(n for n in target.graph.nodes if n in nodes)
    return Recipe(target.name, ordered, tuple(sorted(sources)))


def post_barrier_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that run after the flat clip factors exist (descendants of the clip nodes)."""
    barrier = [n for n in gm.graph.nodes if (n.meta.get("grapefx") or {}).get("role") == "clip"]
    barrier = [n for n in barrier if n.meta["grapefx"].get("param") == "*"]
    if not barrier:
        return set()
    dag = nx.DiGraph()
    for n in gm.graph.nodes:
        for u in n.users:
            dag.add_edge(n, u)
    after: set[fx.Node] = set(barrier)
    for b in barrier:
        after |= nx.descendants(dag, b)
    return after


def candidates(gm: fx.GraphModule, recipes: dict[str, Recipe], rename: dict[str, str]) -> list[str]:
    """Saved activations (forward names) with a recipe whose storage is read after the barrier;
    `rename` maps forward names to `gm`'s placeholder names."""
    after = post_barrier_nodes(gm)
    if not after:
        return []
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    found = []
    for name, recipe in recipes.items():
        ph = placeholders.get(rename.get(name, ""))
        if ph is None or not all(rename.get(s) in placeholders for s in recipe.sources):
            continue
        if any(u in after for u in _alias_closure(ph) for u in u.users):
            found.append(name)
    return found


def _alias_closure(node: fx.Node) -> list[fx.Node]:
    closure, stack = [], [node]
    while stack:
        n = stack.pop()
        closure.append(n)
        stack.extend(u for u in n.users if is_alias(u) and u.args and u.args[0] is n)
    return closure


def recompute_after_barrier(
    gm: fx.GraphModule, recipes: dict[str, Recipe], names: list[str], rename: dict[str, str]
) -> fx.GraphModule:
    """A copy of `gm` where the post-barrier readers of each named saved activation (and of its
    views) read a replay of its recipe instead."""
    new = copy_graph_module(gm)
    graph = new.graph
    after = post_barrier_nodes(new)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for name in names:
        recipe, ph = recipes[name], placeholders[rename[name]]
        closure = _alias_closure(ph)
        position = _position(graph)
        readers = sorted({u for n in closure for u in n.users if u in after and u not in closure}, key=position)
        if not readers:
            continue
        first = readers[0]
        clones: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(first):
            for fw_node in recipe.nodes:
                clones[fw_node] = graph.node_copy(
                    fw_node,
                    lambda a: clones[a] if a in clones else placeholders[rename[a.name]],  # noqa: B023
                )
                clones[fw_node].meta["grapefx"] = {"pass": "recompute_operands", "role": "recompute", "param": name}
        replayed = {ph: clones[recipe.nodes[-1]]}
        for reader in readers:
            with graph.inserting_before(reader):
                reader.args = fx.node.map_arg(reader.args, lambda a: _replay(a, closure, replayed, graph))  # noqa: B023
                reader.kwargs = fx.node.map_arg(reader.kwargs, lambda a: _replay(a, closure, replayed, graph))  # noqa: B023
    graph.lint()
    new.recompile()
    return new


def _replay(node: fx.Node, closure: list[fx.Node], replayed: dict[fx.Node, fx.Node], graph: fx.Graph) -> fx.Node:
    """The post-barrier version of `node`: the replayed placeholder, or a copy of a view chain on it."""
    if node not in closure:
        return node
    if node not in replayed:
        base = _replay(node.args[0], closure, replayed, graph)
        copy = graph.node_copy(node, lambda a: base if a is node.args[0] else a)
        copy.meta["grapefx"] = {"pass": "recompute_operands", "role": "recompute_view", "param": ""}
        replayed[node] = copy
    return replayed[node]


def _position(graph: fx.Graph):  # noqa: ANN202
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__
