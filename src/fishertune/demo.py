"""``fishertune demo``: the offline tiny preset, four methods side by side, on a CPU in minutes.

Trains baseline, NEFTune, token-F and logit-F from the ``tiny`` preset with the method settings
of the ``tiny`` experiment grid (one seed), then prints final train CE, validation loss and the
curvature each model ends with: the token-F penalty ``R`` (the Fisher trace per response token)
measured on the validation split for every method alike.

Works from any folder (the presets ship with the package). Runs go under ``--output_dir``
(default: ``fishertune/demo`` in the user's cache folder), one sub-folder per method holding the
model's per-step log (``train.log``: the trainer's logs and every library message) and its
tensorboard events; the terminal shows one progress bar per method and the final table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fishertune.console import LIBRARY_LOGGERS
from fishertune.errors import FishertuneError

BASE_PRESET = "tiny"  # training preset (fishertune presets)
GRID_PRESET = "tiny"  # experiment grid whose `methods:` the demo runs
METHOD_ORDER = ("baseline", "neftune", "token-f", "logit-f")
VALIDATION_ROWS = 200
LOG_FILE = "train.log"
MARKER = "fishertune_demo.txt"

logger = logging.getLogger(__name__)


def default_output_dir() -> Path:
    """``$XDG_CACHE_HOME/fishertune/demo`` (``~/.cache`` when unset; ``%LOCALAPPDATA%`` on
    Windows): the demo's runs are scratch, so they go where caches go, not into the folder the
    user happens to be in. Written out here rather than adding a dependency (platformdirs) for it.
    """
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        cache = Path(os.environ["LOCALAPPDATA"])
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fishertune" / "demo"


def method_overrides(grid_config: str | Path = GRID_PRESET) -> dict[str, dict[str, Any]]:
    """Per-method overrides of the tiny grid (``methods:`` of the experiment YAML or preset)."""
    from fishertune.experiments.experiment_file import load_experiment

    methods = load_experiment(grid_config).methods
    missing = [m for m in METHOD_ORDER if m not in methods]
    if missing:
        raise FishertuneError(f"{grid_config}: methods {missing} are missing")
    return {name: dict(methods[name]) for name in METHOD_ORDER}


@contextlib.contextmanager
def quiet_libraries(log_file: Path) -> Iterator[None]:
    """Send every log record and warning (ours, transformers', TRL's, datasets', Python
    ``warnings``) to ``log_file`` instead of the terminal, and hide datasets' ``map`` bars, for
    the duration; the previous handlers and settings come back afterwards.

    This is the application's logging configuration (standard ``logging`` handlers, datasets'
    own progress-bar switch), not a redirection of file descriptors, so an exception still
    reaches the terminal with its message.
    """
    import datasets

    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    saved = {}
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        saved[name] = library.handlers[:], library.propagate
        library.handlers, library.propagate = [], True
    bars_were_on = not datasets.are_progress_bars_disabled()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    datasets.disable_progress_bars()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per place, into the log file
            yield
    finally:
        logging.captureWarnings(False)
        if bars_were_on:
            datasets.enable_progress_bars()
        for name, (handlers, propagate) in saved.items():
            library = logging.getLogger(name)
            library.handlers, library.propagate = handlers, propagate
        root.handlers, root.level = saved_root
        handler.close()


def _progress_callback(method: str, total: int) -> Any:
    """A ``TrainerCallback`` drawing one tqdm bar for the run and logging each step's metrics
    (which the trainer would otherwise print) to the run's log file."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class DemoProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps or total, desc=f"{method:<8}", unit="step")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
            logs = logs or {}
            logger.info("step %d: %s", state.global_step, json.dumps(logs, sort_keys=True))
            if self.bar is not None and "ce_loss" in logs:
                self.bar.set_postfix(ce=f"{logs['ce_loss']:.3f}", refresh=False)

        def close(self, **postfix: str) -> None:
            if self.bar is not None:
                self.bar.set_postfix(postfix, refresh=False)
                self.bar.close()

    return DemoProgress()


@torch.no_grad()
def _validation_scores(model: Any, validation: Any, pad_token_id: int) -> dict[str, float]:
    """Validation CE and the token-F Fisher trace, both per response token, on the final model.

    ``validation`` is the tokenized split (``input_ids`` + ``assistant_masks``): labels are the
    assistant tokens only, as in training.
    """
    from fishertune.data.collate import collate_tokenized
    from fishertune.noise import EmbeddingCapture, find_input_embeddings
    from fishertune.penalties import label_mask_from_labels, scored_cross_entropy, token_fisher

    model.eval()
    device = next(model.parameters()).device
    capture = EmbeddingCapture()
    ce_sum = ce_count = fisher_sum = 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    rows = list(validation)[:VALIDATION_ROWS]
    with capture.attached(find_input_embeddings(model)):
        for start in range(0, len(rows), 16):
            batch = collate_tokenized(rows[start : start + 16], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.enable_grad():
                logits = model(**batch, use_cache=False).logits
                mask = label_mask_from_labels(labels)
                ce_sum += scored_cross_entropy(logits, labels, mask).item()
                ce_count += mask.sum().item()
                fisher_sum += token_fisher(
                    capture.embeds,
                    logits,
                    mask,
                    reduction="sum",
                    generator=generator,
                    create_graph=False,
                ).item()
    return {"val_loss": ce_sum / max(ce_count, 1), "val_fisher": fisher_sum / max(ce_count, 1)}


def _last(log_history: list[dict[str, Any]], key: str) -> float:
    values = [entry[key] for entry in log_history if key in entry]
    return float(values[-1]) if values else math.nan


def _fresh_run_dir(output_dir: Path, run_dir: Path) -> None:
    """Empty ``run_dir`` for a new demo run, but only inside a folder the demo made (it holds
    ``MARKER``): a user's folder given by mistake is refused, never cleared."""
    marker = output_dir / MARKER
    if output_dir.is_dir() and any(output_dir.iterdir()) and not marker.is_file():
        raise FishertuneError(
            f"--output_dir {output_dir} is not empty and was not made by fishertune demo; "
            "choose an empty or new folder"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("runs of `fishertune demo`: each method's folder is replaced on rerun\n")
    shutil.rmtree(run_dir, ignore_errors=True)


def run(output_dir: Path, max_steps: int | None, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Train each method in turn under ``output_dir/METHOD``; one row of scores per method."""
    from transformers import PrinterCallback, set_seed

    from fishertune.data.chat import load_conversations, tokenize_dataset
    from fishertune.experiments.commands import override_flags
    from fishertune.presets import resolve_config
    from fishertune.training.cli import build_trainer, parse_args, tokenizer_from_args

    base_config = resolve_config(BASE_PRESET, "train")
    overrides = method_overrides()
    rows = []
    validation = None
    for method in methods:
        run_dir = output_dir / method
        argv = ["--config", str(base_config), *override_flags(overrides[method])]
        argv += ["--output_dir", str(run_dir)]
        argv += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "tensorboard"]
        argv += ["--disable_tqdm", "true"]  # the demo draws its own bar, one per method
        if max_steps is not None:
            argv += ["--max_steps", str(max_steps)]
        script_args, training_args, model_args = parse_args(argv)
        _fresh_run_dir(output_dir, run_dir)
        with quiet_libraries(run_dir / LOG_FILE):
            logger.info("fishertune demo, %s: fishertune train %s", method, " ".join(argv))
            if validation is None:
                tokenizer = tokenizer_from_args(script_args, model_args)
                validation = tokenize_dataset(
                    load_conversations(script_args.dataset_name, split="validation"),
                    tokenizer,
                    training_args.max_length,
                )
            set_seed(training_args.seed)
            start = time.time()
            trainer = build_trainer(script_args, training_args, model_args)
            trainer.remove_callback(PrinterCallback)  # prints every log line to the terminal
            progress = _progress_callback(method, training_args.max_steps)
            trainer.add_callback(progress)
            try:
                trainer.train()
            except BaseException:
                progress.close(status="failed")
                logger.exception("training failed")
                print(f"{method} failed; its log: {run_dir / LOG_FILE}", file=sys.stderr)
                raise
            seconds = time.time() - start
            history = trainer.state.log_history
            row = {
                "method": method,
                "train_ce": _last(history, "ce_loss"),
                "train_penalty": _last(history, "penalty"),
                **_validation_scores(trainer.model, validation, tokenizer.pad_token_id),
                "seconds": seconds,
            }
            logger.info("scores: %s", json.dumps(row, sort_keys=True))
        progress.close(ce=f"{row['train_ce']:.3f}", val=f"{row['val_loss']:.3f}")
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| method | final train CE | val loss | train penalty R | val Tr(F)/token | time (s) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        penalty = "-" if math.isnan(row["train_penalty"]) else f"{row['train_penalty']:.3f}"
        lines.append(
            f"| {row['method']} | {row['train_ce']:.4f} | {row['val_loss']:.4f} | {penalty} | "
            f"{row['val_fisher']:.3f} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fishertune demo", description=__doc__)
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        default=None,
        help=f"folder of the runs (default {default_output_dir()}); each method's sub-folder is "
        "replaced on every demo run",
    )
    parser.add_argument(
        "--max_steps",
        "--max-steps",
        type=int,
        default=None,
        help="training steps per method (the preset's 200 by default; 5 for a quick look)",
    )
    parser.add_argument(
        "--methods", default=",".join(METHOD_ORDER), help="comma-separated subset to train"
    )
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHOD_ORDER]
    if unknown:
        raise FishertuneError(f"unknown methods {unknown}; choose from {', '.join(METHOD_ORDER)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise FishertuneError(f"--max_steps must be at least 1, got {args.max_steps}")
    output_dir = (args.output_dir or default_output_dir()).expanduser().absolute()
    print(f"runs under {output_dir} (per-step logs: METHOD/{LOG_FILE} and tensorboard)", flush=True)
    start = time.time()
    rows = run(output_dir, args.max_steps, methods)
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {time.time() - start:.0f} s")
    return 0
