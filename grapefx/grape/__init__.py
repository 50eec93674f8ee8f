"""DP-GRAPE: privatize weight gradients in a random rank-r subspace (and keep optimizer state there)."""

from grapefx.grape.projection import current_projection, projection_matrix

__all__ = ["current_projection", "projection_matrix"]
