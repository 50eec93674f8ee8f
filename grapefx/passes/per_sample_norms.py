"""Per-sample squared gradient norms, one [B] tensor per parameter.

A parameter with one site reached through reshapes only uses its rule's cheapest norm (ghost or
instantiate, by the rule's cost model, per layer), and so does each site of a parameter split into
pieces used apart (`ParamGrad.disjoint_pieces`: their squared norms add up). Otherwise (a tied /
shared weight used at several sites, or post nodes that are not isometries such as slice_scatter)
every site is instantiated per sample and the post nodes are vmapped over the samples, so cross
terms between uses are exact.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from grapefx.analysis.grad_sites import ParamGrad
from grapefx.passes.batched_post import apply_post_batched
from grapefx.passes.factored_norms import broadcast_lookup, factored_norm_sq, lookup_norm_sq
from grapefx.rules.gram import gram_fraction
from grapefx.rules.registry import (
    MEMORY_WEIGHT,
    NormChoice,
    SiteContext,
    accumulated,
    mm_costs,
    pick,
    rule_for,
    squared_norms,
)


def plan_norms(
    grads: list[ParamGrad],
    contexts: dict[str, list[SiteContext]],
    ghost: frozenset[str] = frozenset(),
    instantiate: frozenset[str] = frozenset(),
) -> dict[str, list[NormChoice]]:
    """Each site's norm method by its rule's cost model; the memory scheduler's overrides: parameters
    in `ghost` use ghost norms wherever their rule has one, parameters in `instantiate` instantiate
    where the rule chose ghost only to save memory (instantiation costing fewer flops)."""
    plan: dict[str, list[NormChoice]] = {}
    for g in grads:
        choices = [rule_for(c.kind).choose(c) for c in contexts[g.name]]
        if not g.isometric and not g.disjoint_pieces:
            choices = _shared_choice(g, contexts[g.name], choices)
        if g.name in ghost:
            choices = [_as_ghost(c) for c in choices]
        elif g.name in instantiate and (g.isometric or g.disjoint_pieces):
            choices = [_as_instantiated(c) for c in choices]
        plan[g.name] = choices
    return plan


def cheaper_to_instantiate(choice: NormChoice) -> bool:
    """A ghost choice made for memory alone: instantiating would cost fewer flops."""
    return choice.method == "ghost" and choice.instantiate_flops < choice.ghost_flops


def _as_instantiated(choice: NormChoice) -> NormChoice:
    if not cheaper_to_instantiate(choice):
        return choice
    reason = f"{choice.reason}; instantiated by the memory scheduler (fewer flops, and it fits under the peak)"
    return NormChoice("instantiate", choice.ghost_flops, choice.instantiate_flops, reason, choice.tokens)


def _as_ghost(choice: NormChoice) -> NormChoice:
    if choice.method == "ghost" or not math.isfinite(choice.ghost_flops):
        return choice  # already ghost, or the rule has no ghost form
    reason = f"{choice.reason}; ghost chosen by the memory scheduler (instantiation was live at the peak)"
    return NormChoice("ghost", choice.ghost_flops, choice.instantiate_flops, reason, choice.tokens)


def _shared_choice(g: ParamGrad, sites: list[SiteContext], choices: list[NormChoice]) -> list[NormChoice]:
    """Ghost with cross terms (Σ_ab T_a T_b (m+n)) vs instantiating every site (Σ_a T_a m n)."""
    shape = list(g.out_node.meta["val"].shape)
    lookup = broadcast_lookup(g, sites)
    if lookup is not None:  # positions: an embedding of batch-free ids, summed over the batch
        T, d, V = int(lookup.args[1].meta["val"].numel()), int(shape[-1]), int(lookup.args[2])
        ghost = (2.0 * T * T * d + MEMORY_WEIGHT * 3 * T * T) * gram_fraction(T, d + 1)
        inst = MEMORY_WEIGHT * (3 * V * d + T * d) + sites[0].fresh_weight * V * d
        method = pick(sites[0].strategy, ghost, inst)
        reason = f"embedding of batch-free ids (positions), T={T} d={d} V={V}: ghost ~2T²d vs instantiate ~3Vd"
        return [NormChoice(method, ghost, inst, reason, T)]
    factorable = len(shape) == 2 and all(c.tokens > 0 for c in choices)
    strategy = sites[0].strategy
    if factorable:
        m, n = int(shape[0]), int(shape[1])
        ts = [c.tokens for c in choices]
        ghost = sum(mm_costs(1, m, n)[0] * ta * tb for ta in ts for tb in ts)
        inst = sum(ts) * 2.0 * m * n + (MEMORY_WEIGHT * 2 + sites[0].fresh_weight) * m * n
        method = pick(strategy if strategy in ("ghost", "instantiate") else "auto", ghost, inst)
        reason = f"shared by {len(sites)} sites, T={ts} m={m} n={n}: cross-term ghost vs instantiation"
        return [NormChoice(method, ghost, inst, reason, c.tokens) for c in choices]
    reason = f"shared by {len(sites)} sites / non-reshape post ops: instantiated for exact cross terms"
    return [NormChoice("instantiate", float("nan"), float("nan"), reason) for _ in choices]


def per_sample_norm_sq(
    grad: ParamGrad, sites: list[SiteContext], choices: list[NormChoice], gm: fx.GraphModule, env: dict
) -> torch.Tensor:
    if grad.isometric:
        return accumulated(rule_for(sites[0].kind).norm_sq(sites[0], choices[0]))
    if grad.disjoint_pieces:  # pieces in disjoint slices: no cross terms
        parts = [accumulated(rule_for(s.kind).norm_sq(s, c)) for s, c in zip(sites, choices)]
        return torch.stack(parts).sum(0)
    if choices[0].method == "ghost":
        lookup = broadcast_lookup(grad, sites)
        if lookup is not None:
            return lookup_norm_sq(sites[0], lookup, rule_for(sites[0].kind).per_sample(sites[0]))
        factored = factored_norm_sq(grad, sites)
        if factored is not None:
            return factored
    per_sample = {c.node: rule_for(c.kind).per_sample(c) for c in sites}
    full = apply_post_batched(grad.post_nodes, grad.out_node, per_sample, gm, env, sites[0].batch_size, grad.name)
    return squared_norms(full)
