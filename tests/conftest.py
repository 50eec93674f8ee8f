"""Shared test set-up: deterministic seeds, a small thread pool, a fresh Dynamo cache per test."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# `import oracle` / `import zoo` from test modules, whichever directory pytest is started from.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Under pytest-xdist (pyproject's addopts: two workers) one thread per worker keeps the two
# workers from fighting over CI's two cores; run serially (-n 0), a test gets two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# Every compiled model of one class shares the class's `forward` code object, so Dynamo's per-code
# cache collects one entry per compiled instance (and per B=1 / dynamic-B graph). The default limit
# (8) would make later models in a test run fall back or fail for reasons unrelated to grapefx.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
if hasattr(torch._dynamo.config, "cache_size_limit"):
    torch._dynamo.config.cache_size_limit = 256


@pytest.fixture(autouse=True)
def _fresh_state():
    """Seed torch's global RNG and start every test with an empty Dynamo cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
