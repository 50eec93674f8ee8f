"""Keep Inductor's on-disk FX-graph cache from reusing code that another grapefx version compiled.

Inductor keys its cache on the graph, torch's version and its config, not on the Python behind the
custom ops a graph calls: which `grapefx::` ops may be dropped as dead code, for one, is decided at
compile time (session 11 changed it for `record_norms`, and stale cached code skipped it). A no-op
post-grad pass whose uuid hashes grapefx's sources puts grapefx's version into the key.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = Path(__file__).resolve().parent


@functools.cache
def grapefx_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")) + sorted(_PACKAGE.rglob("*.c")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class GrapefxCacheSalt(CustomGraphPass):
    """Runs the user's own post-grad pass, if any, and salts the cache key with grapefx's sources."""

    def __init__(self, user_pass: Any = None) -> None:
        self.user_pass = user_pass

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.user_pass is not None:
            self.user_pass(graph)

    def uuid(self) -> Any:
        if self.user_pass is None:
            return grapefx_source_hash()
        user = self.user_pass.uuid() if hasattr(self.user_pass, "uuid") else None
        return None if user is None else (grapefx_source_hash(), user)  # None: Inductor skips caching


def salted_config() -> dict[str, Any]:
    """Inductor config entries for grapefx's compiles (use with torch._inductor.config.patch)."""
    return {"post_grad_custom_post_pass": GrapefxCacheSalt(torch._inductor.config.post_grad_custom_post_pass)}
