"""Optimizers whose state for DP-GRAPE-projected weights lives in the rank-r subspace."""

from grapefx.optim.grape import GrapeAdamW, GrapeSGD

__all__ = ["GrapeAdamW", "GrapeSGD"]
