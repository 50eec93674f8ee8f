"""grapefx: differentially private training as a torch.compile backend."""

from grapefx.api import PrivateModule, compile
from grapefx.config import AdaptiveClipping, PrivacyConfig
from grapefx.dynamo_backend import GrapefxBackend, backend
from grapefx.errors import (
    BatchMixingError,
    ConfigError,
    GrapefxError,
    GraphBreakError,
    UnsupportedOpError,
)
from grapefx.losses import per_sample_token_mean, sequence_cross_entropy
from grapefx.model_fixes import replace_batch_norm
from grapefx.prepare import prepare
from grapefx.privacy.engine import DPOptimizer, PrivacyEngine, make_private

__all__ = [
    "BatchMixingError",
    "ConfigError",
    "DPOptimizer",
    "GrapefxBackend",
    "GrapefxError",
    "GraphBreakError",
    "AdaptiveClipping",
    "PrivacyConfig",
    "PrivacyEngine",
    "PrivateModule",
    "UnsupportedOpError",
    "backend",
    "compile",
    "make_private",
    "per_sample_token_mean",
    "prepare",
    "replace_batch_norm",
    "sequence_cross_entropy",
]
__version__ = "0.1.0"
