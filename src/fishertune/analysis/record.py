"""``fishertune analyze --record FILE``: a trained model's curvature on several splits and along
its checkpoints, in one JSON record (the experiment runner's ``measure`` stage writes it as the
run folder's ``curvature.json``).

The final model and, with ``--checkpoints``, each complete ``checkpoint-N`` beside it are
measured by :func:`fishertune.analysis.measure.analyze` on the same rows: each split is tokenized
once, with the final model's tokenizer, and the batches, probes and draws are drawn with
``--seed``, so every folder is measured on the same tokens with the same random directions. An
entry holds, with each aggregate's between-batch and estimator standard errors:

* ``loss``: the mean CE over the assistant tokens of those batches;
* ``trace_f``: ``Tr(F_X)``, the token-F estimator (mean over scored tokens);
* ``trace_h``: ``Tr(H_X)`` by Hutchinson (Rademacher probes through Hessian-vector products);
* ``gap``: ``Tr(H_X) - Tr(F_X)``, the Gauss-Newton residual;
* ``embedding_rms``, ``median_length``, ``typical_length`` (the ``L`` of
  ``a = alpha / sqrt(L d)``), ``hidden_size``.

The record has the settings, ``final`` (the final model on the first split), ``trajectory`` (one
entry per checkpoint, by step, then the final model, on the first split) and ``splits`` (the
final model on each split).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fishertune.analysis.results import AnalysisResult
from fishertune.files import TRAINER_STATE, read_json_record
from fishertune.files import checkpoints as complete_checkpoints

__all__ = ["curvature_entry", "measure_folders", "model_folders", "record"]


def model_folders(model: str, *, checkpoints: bool) -> list[tuple[int | None, str]]:
    """``(step, folder)`` of each complete checkpoint of the training output folder ``model``
    (by step; the one checkpoint rule of :func:`fishertune.files.checkpoints`), then ``model``.

    The final model's step is read from its ``trainer_state.json`` (``None`` if absent, as for a
    hub name); a checkpoint at that step holds the final model and is measured once, as it.
    """
    folder = Path(model)
    found = complete_checkpoints(folder) if checkpoints else []
    state = read_json_record(folder / TRAINER_STATE)
    step = None
    if isinstance(state, dict):
        try:
            step = int(state.get("global_step"))
        except (ValueError, TypeError):
            step = None
    return [*((s, str(path)) for s, path in found if s != step), (step, model)]


def curvature_entry(result: AnalysisResult) -> dict[str, Any]:
    """The curvature terms of one measurement, under the record's names."""
    out = result.to_dict()
    return {
        "loss": out["loss"],
        "trace_f": out["trace_fisher"],
        "trace_h": out["trace_hessian"],
        "gap": out["gauss_newton_gap"],
        "embedding_rms": out["embedding_rms"],
        "median_length": out["median_length"],
        "typical_length": out["typical_length"],
        "hidden_size": out["hidden_size"],
    }


def _entry(
    step: int | None, folder: str, split: str, result: AnalysisResult, log: Callable[[str], None]
) -> dict[str, Any]:
    """One folder's entry on one split, logged in one line."""
    entry = {"step": step, "folder": Path(folder).name, **curvature_entry(result)}
    log(
        f"{split} step {step}: loss {entry['loss']['mean']:.4f} Tr(F_X) "
        f"{entry['trace_f']['mean']:.4g} Tr(H_X) {entry['trace_h']['mean']:.4g}"
    )
    return entry


def measure_folders(
    folders: Sequence[tuple[int | None, str]],
    splits: Sequence[str],
    measure: Callable[[str, str], AnalysisResult],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, AnalysisResult], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Measure the final model (the last of ``folders``) on every split, then each checkpoint
    on the first split; ``measure(folder, split)`` measures one folder on one split.

    Returns:
        The final model's results by split, the trajectory (each folder's entry on the first
        split, in the order of ``folders``) and the final model's entry by split.
    """
    step, final = folders[-1]
    results = {split: measure(final, split) for split in splits}
    by_split = {split: _entry(step, final, split, results[split], log) for split in splits}
    trajectory = [
        _entry(at, folder, splits[0], measure(folder, splits[0]), log)
        for at, folder in folders[:-1]
    ]
    return results, [*trajectory, by_split[splits[0]]], by_split


def record(
    settings: Mapping[str, Any],
    trajectory: list[dict[str, Any]],
    by_split: dict[str, dict[str, Any]],
    start: float,
) -> dict[str, Any]:
    """The record: ``settings`` (model, data, first split, sizes), ``final``, ``trajectory``,
    ``splits`` and the wall time since ``start`` (``time.time()``)."""
    return {
        **settings,
        "final": trajectory[-1],
        "trajectory": trajectory,
        "splits": by_split,
        "wall_time_s": round(time.time() - start, 2),
    }
