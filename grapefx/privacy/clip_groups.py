"""Group-wise clipping (clipping="group"): which parameters are clipped together, and to what bound.

Each group's part of a sample's gradient is clipped on its own to C_g, with Σ_g C_g² = C² (C =
max_grad_norm): the whole per-sample gradient keeps norm ≤ C, so noise of std σC per coordinate keeps
the guarantee the accountant computes for σ. Flat clipping is one group; per-layer clipping one group
per parameter tensor (C_g = C/√P). Groups in between — one per module (FastDP's "layer-wise"), or per
block — finish each group as soon as its last norm is known, so its operands need not wait for the
whole backward as flat clipping's do.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grapefx.errors import ConfigError

if TYPE_CHECKING:
    from grapefx.config import PrivacyConfig

GroupSpec = str | Sequence[str | Sequence[str]]
# normalized (PrivacyConfig.clip_groups): "module", or name patterns per group
Groups = str | tuple[tuple[str, ...], ...]


def normalize_clip_groups(spec: GroupSpec) -> Groups:
    """ "module" (one group per module holding parameters directly: a Linear's weight and bias
    together, FastDP's "layer-wise"), or a sequence of groups, each a parameter-name pattern or a
    sequence of them (fnmatch, e.g. "encoder.*")."""
    if isinstance(spec, str):
        if spec != "module":
            raise ConfigError(
                f"clip_groups={spec!r}: give 'module' (one group per module) or a list of groups of "
                "parameter name patterns, e.g. [['embed.*'], ['blocks.*'], ['head.*']]"
            )
        return spec
    groups = tuple((g,) if isinstance(g, str) else tuple(g) for g in spec)
    if not groups or not all(groups) or not all(isinstance(p, str) for g in groups for p in g):
        raise ConfigError(f"clip_groups: every group needs at least one name pattern (a str), got {spec!r}")
    return groups


def resolve_clip_groups(names: Sequence[str], groups: Groups, strict: bool = True) -> list[tuple[str, ...]]:
    """The parameters `names` split into groups, one tuple per declared group (in declaration order;
    "module": in the order of `names`). A parameter joins the first group with a pattern that matches
    it; every parameter must match one. `strict`: every declared group must match some parameter
    (grapefx.compile checks that against the model; a backward may hold only some of them)."""
    if groups == "module":
        by_module: dict[str, list[str]] = {}
        for n in names:
            by_module.setdefault(n.rpartition(".")[0], []).append(n)
        return [tuple(g) for g in by_module.values()]
    members: list[list[str]] = [[] for _ in groups]
    unmatched = []
    for n in names:
        j = next((j for j, pats in enumerate(groups) if any(fnmatch.fnmatchcase(n, p) for p in pats)), None)
        (unmatched.append(n) if j is None else members[j].append(n))
    if unmatched:
        raise ConfigError(
            f"clip_groups: trainable parameters {unmatched[:8]}{' ...' if len(unmatched) > 8 else ''} match no "
            "group; add a pattern for them (a last group '*' collects the rest)"
        )
    empty = [list(pats) for pats, m in zip(groups, members) if not m]
    if strict and empty:
        raise ConfigError(
            f"clip_groups: groups {empty} match no trainable parameter (or only ones an earlier group "
            "took); remove them or fix their patterns"
        )
    return [tuple(m) for m in members]


def group_bounds(names: Sequence[str], config: PrivacyConfig) -> list[tuple[tuple[str, ...], float]]:
    """(members, C_g) for each group of the parameters `names` one backward finishes: per-layer
    clipping makes one group per parameter, clipping="group" splits them by `config.clip_groups`.
    Groups with no parameter in `names` are dropped and C is split over the others in proportion to
    `config.clip_group_shares` (equal by default), so that Σ C_g² = C²."""
    if config.clipping == "per_layer":
        groups, shares = [(n,) for n in names], [1.0] * len(names)
    else:
        assert config.clip_groups is not None
        resolved = resolve_clip_groups(names, config.clip_groups, strict=False)
        all_shares = config.clip_group_shares or (1.0,) * len(resolved)
        kept = [(g, s) for g, s in zip(resolved, all_shares) if g]
        groups, shares = [g for g, _ in kept], [s for _, s in kept]
    total = math.sqrt(sum(s * s for s in shares)) or 1.0
    C = float(config.max_grad_norm)
    return [(g, C * s / total) for g, s in zip(groups, shares)]
