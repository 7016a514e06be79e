"""fishertune: instruction tuning with NEFTune noise and Fisher-trace curvature penalties.

The names below are imported on first use (PEP 562), so ``fishertune --version``, ``fishertune
presets`` and ``--help`` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place: pyproject.toml reads it

_EXPORTS = {
    "NEFTuneNoise": "fishertune.noise",
    "neftune": "fishertune.noise",
    "logit_fisher": "fishertune.penalties",
    "token_fisher": "fishertune.penalties",
    "neftune_equivalent_coef": "fishertune.schedules",
    "warmup_coefficient": "fishertune.schedules",
}

__all__ = [
    "NEFTuneNoise",
    "__version__",
    "logit_fisher",
    "neftune",
    "neftune_equivalent_coef",
    "token_fisher",
    "warmup_coefficient",
]

if TYPE_CHECKING:
    from fishertune.noise import NEFTuneNoise, neftune
    from fishertune.penalties import logit_fisher, token_fisher
    from fishertune.schedules import neftune_equivalent_coef, warmup_coefficient


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fishertune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
