"""Checkpoint completion records: a checkpoint counts only once its record is written.

``FisherSFTTrainer`` adds :class:`CheckpointRecord` to its own callbacks, so a trainer built in a
script (the README's library example) writes the same records as ``fishertune train`` and can be
resumed; :func:`restore_totals` continues the whole-run totals from a checkpoint's record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from fishertune.files import CHECKPOINT_RECORD, write_json_atomic

__all__ = ["CheckpointRecord", "restore_totals"]


class CheckpointRecord(TrainerCallback):
    """Marks each checkpoint complete once transformers has written all of it, with the run's
    totals so far (a resumed run continues them); ``on_first`` runs after the first one.

    Args:
        accelerator: the trainer's (every rank writes its part before the record).
        totals: returns the run's totals (``FisherSFTTrainer.run_totals``).
    """

    def __init__(self, accelerator: Any, totals: Callable[[], dict[str, Any]]) -> None:
        self.accelerator = accelerator
        self.totals = totals
        self.on_first: Callable[[], None] | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # every rank has written its part (RNG state, optimizer shards) before the record
        self.accelerator.wait_for_everyone()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            record = {"step": state.global_step, **self.totals()}
            write_json_atomic(folder / CHECKPOINT_RECORD, record, sort_keys=True)
            if self.on_first is not None:
                self.on_first()
        self.on_first = None


def restore_totals(totals: dict[str, Any], checkpoint: Path) -> dict[str, Any] | None:
    """Update ``totals`` in place from ``checkpoint``'s record; the record, or ``None`` when the
    checkpoint has none (written by another tool: the totals then cover this session only)."""
    path = Path(checkpoint) / CHECKPOINT_RECORD
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    totals.update({key: saved[key] for key in totals if key in saved})
    return saved
