"""grapefx vs non-private training and vs peers (Opacus, torch.func): time and memory, one command.

    python -m tools.bench                    # full suite: M1 M2 M3 M4 H ViT x every config, 2 rounds
    python -m tools.bench --quick            # smoke: M1 + a small GPT, 1 round, a few minutes
    python -m tools.bench --scaling          # + time/memory vs B and vs T on the GPT config, PNG plots
    python -m tools.bench --models M3 --configs np-eager,gx-eager,opacus-ghost --rounds 3
    python -m tools.bench --op-profile M3:gx-eager     # one step's op table (top 20 by self time)
    python -m tools.bench --device cuda      # the same on a GPU (cuda synchronize, max_memory_allocated)

Method (tools/README.md): one torch thread; a fresh subprocess per (model, config); configurations
interleaved within a round, order reversed in odd rounds; ratios are to non-private eager of the same
model in the same round. Configuration names: tools/bench/configs.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/bench`: make `tools.bench` importable, not its files
    _root = Path(__file__).resolve().parents[2]
    sys.path[:] = [str(_root)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

from tools.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
