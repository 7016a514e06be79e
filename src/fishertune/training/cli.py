"""``fishertune train --config FILE.yaml|PRESET [--key value ...]``: fine-tune with a method.

``--config`` takes a YAML file or a shipped preset's name (``tiny``, ``paper/token-f``: see
``fishertune presets``); a file of that name wins.

Flags are TRL's (``trl sft``: ``--dataset_name``, ``--output_dir``, ``--max_steps``, ``--seed``,
``--model_name_or_path`` ...) plus the fields of :class:`FisherSFTConfig` and of
:class:`FisherScriptArguments` below; precedence is defaults < YAML < command line (``TrlParser``).

Run management (what ``fishertune train`` guarantees):

* Everything is validated (arguments, data, model) before anything in ``output_dir`` changes. With
  ``--overwrite_output_dir`` the previous run is moved aside to a hidden sibling folder and deleted
  only once the new run has written its first complete checkpoint (or finished); a run that fails
  before that puts the previous one back.
* ``fishertune_run.json`` holds the run's settings (method, data and its checksum, seed, model,
  every option that changes the math) and its status: ``running``, then ``completed`` or
  ``failed`` (with the error). A failed run exits non-zero and never saves a final model.
* ``--resume`` continues from the latest complete checkpoint (named in the log) with the same
  settings only (a difference is refused, naming it), reaches the same weights as an
  uninterrupted run, never trains past ``max_steps`` (also after a stop during the final
  save), and reports ``train_loss`` over the whole run; on a completed run it does nothing.
* One process per output folder (:func:`~fishertune.training.output_dir.output_lock`). Ctrl-C,
  SIGTERM and I/O faults (a full disk, a read-only folder) end in one line and exit status 130,
  143 or 1, with the record marked ``failed`` (space for that write is reserved at the start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fishertune.errors import describe_fault, first_line
from fishertune.files import (
    CHECKPOINT_RECORD,
    DATA_REPORT,
    RECORD_RESERVE,
    RUN_RECORD,
    TRAIN_LOG,
    latest_checkpoint,
    read_json_record,
    reserve_space,
    write_json_atomic,
    write_json_reserved,
)
from fishertune.training.arguments import (
    build_parser,
    check_values,
    parse_args,
    validate_train_argv,
)
from fishertune.training.build import build_trainer, save_merged_model, tokenizer_from_args
from fishertune.training.output_dir import (
    OutputPlan,
    Replacement,
    output_lock,
    place_staged_base,
    plan_output_dir,
    staged_base,
)

# What other modules and tests import from the command (its parts live in arguments.py,
# output_dir.py and build.py).
__all__ = [
    "RUN_RECORD",
    "build_parser",
    "build_trainer",
    "latest_checkpoint",
    "main",
    "parse_args",
    "tokenizer_from_args",
    "validate_train_argv",
]

logger = logging.getLogger(__name__)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _describe(err: BaseException, output_dir: Path) -> str:
    fault = describe_fault(err, output_dir)  # Ctrl-C, SIGTERM, a full disk: the console's line
    return fault[0] if fault is not None else first_line(err)


@contextlib.contextmanager
def _signals_held() -> Any:
    """Ctrl-C and SIGTERM wait until the block is done (a record write is not cut short)."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # nested blocks keep the outer's


def _write_record(output_dir: str | os.PathLike, payload: dict[str, Any]) -> None:
    """The run record, atomically, with the space reserved at the start (:func:`_run`) freed
    for it if the disk is full; signals wait until it is written."""
    with _signals_held():
        write_json_reserved(
            Path(output_dir) / RUN_RECORD,
            payload,
            Path(output_dir) / RECORD_RESERVE,
            sort_keys=True,
        )


def _finish_run(
    trainer: Any,
    script_args: Any,
    training_args: Any,
    record: dict[str, Any],
    result: Any,
    replacement: Replacement | None,
) -> None:
    """After training: evaluate, save the model, state and tokenizer, mark the run completed."""
    output_dir = Path(training_args.output_dir)
    metrics = dict(result.metrics)  # train_loss: the whole run's (run_totals, resumed parts too)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if script_args.save_merged_model:
        save_merged_model(trainer, output_dir / "merged")
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        record.update(
            status="completed",
            global_step=trainer.state.global_step,
            skipped_steps=trainer.run_totals["skipped_steps"],
            wall_time_s=round(trainer.run_totals["wall_time_s"], 2),  # all sessions
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        )
        _write_record(training_args.output_dir, record)
        (output_dir / RECORD_RESERVE).unlink(missing_ok=True)
        if replacement is not None:
            replacement.commit()
        print(f"saved to {training_args.output_dir}")


def main(argv: list[str] | None = None) -> int:
    from fishertune.training.argv import prepare_argv

    prepared, notes = prepare_argv(list(sys.argv[1:] if argv is None else argv))
    if prepared is None:
        return 0  # a help was printed
    argv = prepared
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    script_args, training_args, model_args = parse_args(argv, notes)
    for note in notes:
        logger.info("%s", note)
    check_values(script_args, training_args)
    # held from before output_dir is looked at until the run ends: a second process on the same
    # folder is refused instead of deciding, too, that the folder is free
    main_process = os.environ.get("RANK", "0") == "0"
    with output_lock(training_args.output_dir) if main_process else contextlib.nullcontext():
        return _plan_and_run(argv, script_args, training_args, model_args, notes)


def _plan_and_run(
    argv: list[str],
    script_args: Any,
    training_args: Any,
    model_args: Any,
    notes: list[str] | None = None,
) -> int:
    plan = plan_output_dir(script_args, training_args, model_args)
    if plan.done:
        print(plan.done)
        return 0
    from transformers import set_seed

    set_seed(training_args.seed)
    start = time.time()
    # arguments, data and model are validated here, before anything in output_dir changes
    on_first: list[Callable[[], None]] = []
    trainer = build_trainer(
        script_args,
        training_args,
        model_args,
        on_first_checkpoint=lambda: [hook() for hook in on_first],
    )
    record: dict[str, Any] = {
        "status": "running",
        "method": training_args.method,
        "seed": training_args.seed,
        "settings": plan.settings,
        "argv": argv,
    }
    return _run(trainer, plan, script_args, training_args, record, on_first, start, notes or [])


@contextlib.contextmanager
def _run_log(output_dir: Path, trainer: Any, notes: list[str]) -> Any:
    """``OUTPUT_DIR/train.log`` (appended to on resume): what the terminal shows (fishertune's
    lines, the libraries' messages, Python warnings) and every logged step, timestamped."""
    from transformers import TrainerCallback

    from fishertune.console import LIBRARY_LOGGERS

    output_dir.mkdir(parents=True, exist_ok=True)  # a replaced run's folder is aside by now
    handler = logging.FileHandler(output_dir / TRAIN_LOG, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    steps = logging.getLogger("fishertune.training.steps")
    steps.propagate = False  # the terminal has its own progress display
    steps.setLevel(logging.INFO)
    # transformers keeps its messages off the root logger: its own logger gets the file too
    loggers = [logging.getLogger(), steps]
    loggers += [logging.getLogger(n) for n in LIBRARY_LOGGERS if not logging.getLogger(n).propagate]
    for each in loggers:
        each.addHandler(handler)

    class StepLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any):
            steps.info("step %d: %s", state.global_step, json.dumps(logs or {}, sort_keys=True))

    for note in notes:  # said on the terminal before the folder was there
        steps.info("%s", note)
    callback = StepLog()
    trainer.add_callback(callback)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        trainer.remove_callback(callback)
        for each in loggers:
            each.removeHandler(handler)
        handler.close()


def _write_data_reports(trainer: Any, output_dir: Path) -> None:
    """Each split's rows read, kept and dropped by reason into the run folder, one line each."""
    reports = getattr(trainer, "data_reports", {})
    write_json_atomic(output_dir / DATA_REPORT, reports, sort_keys=True)
    for split, report in reports.items():
        dropped = sum(report.get("dropped", {}).values())
        logger.info(
            "data (%s): %d rows kept, %d dropped; counts by reason in %s",
            split,
            report.get("rows_kept", 0),
            dropped,
            output_dir / DATA_REPORT,
        )


def _run(
    trainer: Any,
    plan: OutputPlan,
    script_args: Any,
    training_args: Any,
    record: dict[str, Any],
    on_first: list[Callable[[], None]],
    start: float,
    notes: list[str] | None = None,
) -> int:
    """Train with the run record kept: ``running`` first, ``completed`` at the end; on any error
    (SIGTERM included) ``failed``, or the replaced previous run put back if this one has no
    checkpoint yet. A diverged run exits 1, anything else is raised again."""
    from fishertune.training.guard import TrainingDivergedError

    output_dir = Path(training_args.output_dir)
    main_process = trainer.accelerator.is_main_process
    replacement = None
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so the run is marked failed and a
    # replaced run is put back instead of the process vanishing mid-way
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    stack = contextlib.ExitStack()
    try:
        if plan.replace and main_process:
            replacement = Replacement(output_dir)
        if main_process:
            place_staged_base(output_dir)
            stack.enter_context(_run_log(output_dir, trainer, notes or []))
        trainer.accelerator.wait_for_everyone()
        if replacement is not None:
            on_first.append(replacement.commit)  # once the new run has a checkpoint of its own
        if plan.checkpoint is not None:
            # the trainer continues its totals from this record (FisherSFTTrainer.train)
            saved = json.loads((plan.checkpoint / CHECKPOINT_RECORD).read_text())
            logger.info("resuming from %s (step %s)", plan.checkpoint, saved.get("step"))
        if main_process:
            _write_record(training_args.output_dir, record)
            # room for the record's last word (completed or failed) should the disk fill up
            reserve_space(output_dir / RECORD_RESERVE)
            _write_data_reports(trainer, output_dir)
        result = trainer.train(
            resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None
        )
        _finish_run(trainer, script_args, training_args, record, result, replacement)
        return 0
    except BaseException as err:
        if main_process:
            with _signals_held():  # a second Ctrl-C cannot leave the record saying running
                _record_failure(trainer, training_args, record, replacement, err, start)
        if isinstance(err, TrainingDivergedError):
            print(f"error: {err}", file=sys.stderr)
            return 1
        fault = describe_fault(err, output_dir)  # a signal, a full disk: one line, a status
        if fault is None:
            raise
        print(f"error: {fault[0]}", file=sys.stderr)
        return fault[1]
    finally:
        if main_thread:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, previous_sigterm or signal.SIG_DFL)
        # destroy the process group (and finish trackers) on every rank, also after an error
        trainer.accelerator.end_training()
        stack.close()


def _record_failure(
    trainer: Any,
    training_args: Any,
    record: dict[str, Any],
    replacement: Replacement | None,
    err: BaseException,
    start: float,
) -> None:
    """On the main process after an error: drop the staged base, then put the replaced run back
    if this one has no checkpoint yet, else mark this one ``failed`` with the error."""
    output_dir = Path(training_args.output_dir)
    shutil.rmtree(staged_base(output_dir), ignore_errors=True)
    if replacement is not None and latest_checkpoint(output_dir) is None:
        replacement.restore()
        return
    written = read_json_record(output_dir / RUN_RECORD)
    if isinstance(written, dict) and written.get("status") == "completed":
        return  # stopped after the run was saved and recorded: it did complete
    record.update(
        status="failed",
        error=_describe(err, output_dir),
        global_step=trainer.state.global_step,
        wall_time_s=round(time.time() - start, 2),
    )
    try:
        _write_record(training_args.output_dir, record)
    except OSError as failure:
        print(
            f"error: the run record {output_dir / RUN_RECORD} could not be updated "
            f"({first_line(failure)}); it does not say that this run failed",
            file=sys.stderr,
        )
    else:
        (output_dir / RECORD_RESERVE).unlink(missing_ok=True)
