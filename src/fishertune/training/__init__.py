"""Training integration: :class:`FisherSFTConfig` and :class:`FisherSFTTrainer` on top of TRL.

Imported lazily so that ``import fishertune.training.cli`` stays fast and the pure math never
pulls in TRL.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FisherSFTConfig", "FisherSFTTrainer"]


def __getattr__(name: str) -> Any:
    if name == "FisherSFTConfig":
        from fishertune.training.config import FisherSFTConfig

        return FisherSFTConfig
    if name == "FisherSFTTrainer":
        from fishertune.training.trainer import FisherSFTTrainer

        return FisherSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
