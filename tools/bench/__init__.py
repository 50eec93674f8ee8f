"""grapefx benchmarks: `python -m tools.bench` (or `python tools/bench`); see tools/README.md."""
