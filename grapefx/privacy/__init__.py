"""Privacy machinery beside the compiler: accounting, Poisson sampling, noise / norm side channels."""

from grapefx.privacy import schedulers
from grapefx.privacy.accounting import Accountant, epsilon, noise_multiplier_for
from grapefx.privacy.sampling import PoissonBatchSampler, collate_with_empty, poisson_loader

__all__ = [
    "Accountant",
    "PoissonBatchSampler",
    "collate_with_empty",
    "epsilon",
    "noise_multiplier_for",
    "poisson_loader",
    "schedulers",
]
