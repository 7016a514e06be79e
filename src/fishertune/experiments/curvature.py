"""The ``measure`` stage of an experiment run: input-space curvature on validation data.

For a run's final model and (``--checkpoints``) each of its saved ``checkpoint-N`` folders, it
calls :func:`fishertune.analysis.measure.analyze` -- the estimators of ``fishertune analyze``, not
a copy of them -- on the same validation batches (drawn with ``--seed``, so every run and every
checkpoint is measured on the same tokens with the same probes and draws) and records:

* ``loss``: the mean CE over the assistant tokens of those batches;
* ``trace_f``: ``Tr(F_X)``, the token-F estimator (mean over scored tokens);
* ``trace_h``: ``Tr(H_X)`` by Hutchinson (Rademacher probes through Hessian-vector products);
* ``gap``: ``Tr(H_X) - Tr(F_X)``, the Gauss-Newton residual;
* ``embedding_rms``, ``median_length`` (the ``L`` of ``a = alpha / sqrt(L d)``), ``hidden_size``.

Each aggregate is stored with its between-batch and estimator standard errors. The output
``curvature.json`` (written atomically, last) has ``final`` (the trained model) and
``trajectory`` (one entry per checkpoint, by step, then the final model), both on the first
``--split``, and ``splits`` (the final model on each split of ``--split a,b``)::

    python -m fishertune.experiments.curvature --model runs/x/model \\
        --output runs/x/curvature.json --dataset builtin:tiny-tasks --split validation \\
        --batches 2 --batch_size 8 --probes 4   # --no-checkpoints: the final model only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import TRAINER_STATE, read_json_record, write_json_atomic
from fishertune.files import checkpoints as complete_checkpoints

__all__ = ["main", "measure_model", "model_folders"]


def model_folders(model_dir: Path, *, checkpoints: bool) -> list[tuple[int | None, Path]]:
    """``(step, folder)`` of each complete checkpoint (by step; the one checkpoint rule of
    :func:`fishertune.files.checkpoints`) and then the final model.

    The final model's step is read from its ``trainer_state.json`` (``None`` if absent).
    """
    found: list[tuple[int | None, Path]] = (
        list(complete_checkpoints(model_dir)) if checkpoints else []
    )
    state = read_json_record(model_dir / TRAINER_STATE)
    step = None
    if isinstance(state, dict):
        try:
            step = int(state.get("global_step"))
        except (ValueError, TypeError):
            step = None
    # a checkpoint at the final step holds the final model: measured once, as the final model
    found = [(s, folder) for s, folder in found if s != step]
    found.append((step, model_dir))
    return found


def measure_model(
    folder: Path,
    tokenizer: Any,
    data: Any,
    *,
    batches: int,
    batch_size: int,
    probes: int,
    fisher_draws: int | None,
    seed: int,
) -> dict[str, Any]:
    """CE, ``Tr(F_X)``, ``Tr(H_X)`` and the gap of the model saved in ``folder`` (float32, CPU or
    the default device, eager attention for the double backward), on tokenized ``data``."""
    import torch

    from fishertune.analysis.cli import load_for_analysis
    from fishertune.analysis.measure import analyze

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_for_analysis(
        str(folder), str(tokenizer), device=device, dtype=torch.float32, attn_implementation="eager"
    )
    result = analyze(
        model,
        tok,
        data,
        # One alpha and the minimum of noise pairs: only the curvature terms are used here.
        alphas=[1.0],
        batches=batches,
        batch_size=batch_size,
        probes=probes,
        noise_samples=2,
        seed=seed,
        fisher_draws=fisher_draws,
        show_progress=False,
    )
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


def _int_at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low`` (a size the estimators cannot do with less)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _splits(text: str) -> str:
    if not any(name.strip() for name in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected a split name, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The measure stage's options; an experiment's ``measure:`` block is checked by this parser
    (:func:`fishertune.experiments.blocks.measure_block`), so its defaults are the block's."""
    parser = argparse.ArgumentParser(
        prog="python -m fishertune.experiments.curvature",
        description="Measure CE, Tr(F_X), Tr(H_X) of a trained model (and its checkpoints) on "
        "validation data with fishertune analyze's estimators.",
    )
    add = parser.add_argument
    add("--model", required=True, help="the run's model folder (fishertune train --output_dir)")
    add("--output", required=True, help="curvature.json to write")
    add(
        "--dataset",
        "--data",
        dest="dataset",
        default="builtin:tiny-tasks",
        help="conversations (as fishertune analyze's --data; in a grid: the run's training data)",
    )
    add("--split", type=_splits, default="validation", help="split(s), comma-separated")
    from fishertune.data.formats import add_data_arguments

    add_data_arguments(add)
    add("--batches", type=_int_at_least(1), default=2, help="batches measured")
    add("--batch_size", type=_int_at_least(1), default=8, help="sequences per batch")
    add("--probes", type=_int_at_least(2), default=4, help="Rademacher probes per batch")
    add(
        "--fisher_draws",
        type=_int_at_least(2),
        default=None,
        help="token-F draws per batch (default: --probes)",
    )
    add("--max_length", type=_int_at_least(2), default=128, help="truncation length")
    add("--seed", type=_int_at_least(0), default=0, help="seeds the batches, probes and draws")
    add(
        "--checkpoints",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure every checkpoint-N (the curvature trajectory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure and write ``--output``; returns the exit status."""
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FishertuneError(f"--model {model_dir}: not a saved model folder (no config.json)")

    from fishertune.data.chat import ensure_chat_template, load_conversations, tokenize_dataset
    from fishertune.data.formats import DataOptions
    from fishertune.data.tokenizer import load_chat_tokenizer

    start = time.time()
    splits = [name.strip() for name in args.split.split(",") if name.strip()]
    if not splits:
        raise FishertuneError(f"--split {args.split!r}: no split named")
    # Tokenized once with the final model's tokenizer: every folder sees the same token ids.
    tokenizer = load_chat_tokenizer(str(model_dir))
    ensure_chat_template(tokenizer)
    options = DataOptions.from_args(args)
    settings = {
        "batches": args.batches,
        "batch_size": args.batch_size,
        "probes": args.probes,
        "fisher_draws": args.fisher_draws,
        "seed": args.seed,
    }
    trajectory = []
    by_split: dict[str, Any] = {}
    for index, split in enumerate(splits):
        data = tokenize_dataset(
            load_conversations(args.dataset, split, options), tokenizer, args.max_length
        )
        # the checkpoints only on the first split: the trajectory is one split's
        folders = model_folders(model_dir, checkpoints=args.checkpoints and index == 0)
        for step, folder in folders:
            entry = measure_model(folder, model_dir, data, **settings)
            if index == 0:
                trajectory.append({"step": step, "folder": folder.name, **entry})
            print(
                f"{split} step {step}: loss {entry['loss']['mean']:.4f} Tr(F_X) "
                f"{entry['trace_f']['mean']:.4g} Tr(H_X) {entry['trace_h']['mean']:.4g}",
                flush=True,
            )
        by_split[split] = {"step": step, "folder": model_dir.name, **entry}
    record = {
        "model": str(model_dir),
        "data": args.dataset,
        "split": splits[0],
        "max_length": args.max_length,
        **settings,
        "final": trajectory[-1],
        "trajectory": trajectory,
        "splits": by_split,
        "wall_time_s": round(time.time() - start, 2),
    }
    write_json_atomic(Path(args.output), record)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FishertuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
