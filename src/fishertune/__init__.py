"""fishertune: instruction tuning with NEFTune noise and Fisher-trace curvature penalties."""

from fishertune.noise import NEFTuneNoise, neftune
from fishertune.penalties import logit_fisher, token_fisher
from fishertune.schedules import neftune_equivalent_coef, warmup_coefficient

__version__ = "0.1.0"

__all__ = [
    "NEFTuneNoise",
    "__version__",
    "logit_fisher",
    "neftune",
    "neftune_equivalent_coef",
    "token_fisher",
    "warmup_coefficient",
]
