"""The output folder's lifecycle: the run's settings and record, the plan for a folder (new run,
resume, or replacement of a previous run moved aside until the new one has a checkpoint), and
the staged base of an adapter whose base has no name."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.files import RUN_RECORD, latest_checkpoint, read_json_record
from fishertune.locks import HeldFolder, check_no_holders_inside, folder_lock
from fishertune.modeling import TINY_MODEL

logger = logging.getLogger(__name__)


# Options that change what a run computes: a resume must give the same ones (bit-identical runs).
_SCRIPT_SETTINGS = (
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_fraction",
    "dataset_subsample_seed",
    "data_format",
    "data_columns",
    "data_roles",
    "on_bad_rows",
    "keep_truncated_records",
    "drop_too_long",
    "tokenizer_name_or_path",
    "tiny_hidden_size",
    "tiny_num_layers",
    "tiny_num_heads",
)
_TRAINING_SETTINGS = (
    "method",
    "loss_reduction",
    "seed",
    "data_seed",
    "max_length",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "bf16",
    "fp16",
    "packing",
    "assistant_only_loss",
    "completion_only_loss",
    "average_tokens_across_devices",
    "on_nonfinite",
    "master_weights",
    "assistant_only",
    "chat_template_path",
)
_MODEL_SETTINGS = (
    "model_name_or_path",
    "model_revision",
    "dtype",
    "attn_implementation",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "use_dora",
)


def _data_fingerprint(source: str) -> str | None:
    """sha256 of a local data file (of each file of a folder), so a resume on other data is
    refused even under the same name; a built-in dataset by its generator's version."""
    if source.startswith("builtin:"):
        from fishertune.data.tasks import TASKS_VERSION

        return f"{source}@{TASKS_VERSION}"
    path = Path(source).expanduser()
    head, sep, _ = source.rpartition(":")
    if not path.exists() and sep and Path(head).expanduser().is_dir():
        path = Path(head).expanduser()  # DIR:ENTRY of a dataset_info.json: the whole folder
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not path.exists() or not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_settings(script_args: Any, training_args: Any, model_args: Any) -> dict[str, Any]:
    """What a resume must keep: the method and its options, data (with a checksum of local
    files), seed, model, and every option that changes the updates; JSON values."""
    from fishertune.training.config import NEFTUNE_FIELDS, PENALTY_FIELDS

    groups = (
        (script_args, _SCRIPT_SETTINGS),
        (training_args, _TRAINING_SETTINGS + PENALTY_FIELDS + NEFTUNE_FIELDS),
        (model_args, _MODEL_SETTINGS),
    )
    settings = {name: getattr(args, name, None) for args, names in groups for name in names}
    settings["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    settings["data_sha256"] = _data_fingerprint(script_args.dataset_name or "")
    return json.loads(json.dumps(settings, default=str))


def read_run_record(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FishertuneError(f"{path}: unreadable run record ({err})") from err


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ. An option added after the run was recorded, left at its
    unset or false default now, is not a difference: a run recorded before it existed can
    resume (``penalty_fd_fused_ce``: such a run took the CE at X + h v; it resumes with the CE
    at X, the corrected gradient)."""
    return [
        f"{name}={recorded.get(name)!r} (now {current.get(name)!r})"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
        and not (name not in recorded and current.get(name) in (None, False))
    ]


@dataclass
class OutputPlan:
    """What to do with ``output_dir``: resume from ``checkpoint``, replace a previous run,
    nothing (``done``: the run completed), or start in an empty folder."""

    checkpoint: Path | None = None
    replace: bool = False
    done: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def plan_output_dir(script_args: Any, training_args: Any, model_args: Any) -> OutputPlan:
    """Decide, without changing anything, how this run uses ``output_dir``."""
    path = Path(training_args.output_dir)
    settings = run_settings(script_args, training_args, model_args)
    plan = OutputPlan(settings=settings)
    if path.exists() and not path.is_dir():
        raise FishertuneError(f"output_dir {path} is a file, not a folder")
    check_writable(path)
    for aside in sorted(path.parent.glob(f".{path.name}.replaced-*")):
        logger.warning(
            "%s holds the run that was in %s before an interrupted --overwrite_output_dir: "
            "move it back or delete it",
            aside,
            path,
        )
    non_empty = path.is_dir() and any(path.iterdir())
    if script_args.resume:
        record = read_run_record(path) or {}
        recorded = record.get("settings")
        if recorded is not None:
            differences = _differences(recorded, settings)
            if differences:
                raise FishertuneError(
                    f"--resume: {path} was started with other settings: "
                    f"{'; '.join(differences)}; resume with the same ones or start a new "
                    "output_dir"
                )
        if record.get("status") == "completed":
            plan.done = (
                f"{path}: the run already completed ({record.get('global_step')} steps); "
                "nothing to resume"
            )
            return plan
        plan.checkpoint = latest_checkpoint(path)
        if plan.checkpoint is None:
            raise FishertuneError(
                f"--resume: no complete checkpoint in {path} to resume from; start the run "
                "again with --overwrite_output_dir true instead of --resume (and a save_steps "
                "that keeps checkpoints)"
            )
        return plan
    if non_empty:
        if not script_args.overwrite_output_dir:
            raise FishertuneError(f"output_dir {path} exists and is not empty: {_choices(path)}")
        # the replaced folder is deleted once this run has a checkpoint: not while a trainer or
        # a runner works inside it (this run's lock keeps new ones out from now on)
        check_no_holders_inside(path, "--overwrite_output_dir")
        plan.replace = True
    return plan


def _choices(path: Path) -> str:
    """What a user can do with a non-empty output folder: only the flags that would work."""
    record = read_json_record(path / RUN_RECORD)
    status = record.get("status") if isinstance(record, dict) else None
    checkpoint = latest_checkpoint(path)
    if status == "completed":
        return (
            "it holds a completed run; pass --overwrite_output_dir true to replace it, or "
            "choose another directory"
        )
    if checkpoint is not None:
        return (
            f"pass --resume true to continue it from {checkpoint.name}, "
            "--overwrite_output_dir true to replace it, or choose another directory"
        )
    return (
        f"it holds {'a run with no complete checkpoint' if status else 'no fishertune run'}; "
        "pass --overwrite_output_dir true to replace it (a run is started again from its "
        "beginning), or choose another directory"
    )


def check_writable(path: Path) -> None:
    """The output folder (or its nearest existing parent) can be written, before anything loads."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):  # EROFS for a read-only mount, root included
        raise FishertuneError(
            f"output_dir {path}: {existing} is not writable (a read-only file system or "
            "another user's folder)"
        )


def output_lock(output_dir: str | os.PathLike) -> HeldFolder:
    """The lock that keeps one ``fishertune train`` per output folder, and none in or around a
    live grid or another live trainer's folder: :class:`~fishertune.locks.HeldFolder`
    (``.NAME.lock`` beside the folder, naming its holder's PID), the runners' protocol too."""
    path = Path(output_dir).resolve()
    check_writable(path)
    return folder_lock(path, "fishertune train")


class Replacement:
    """The previous run, moved aside to a hidden sibling until the new one has a checkpoint."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.aside = output_dir.parent / f".{output_dir.name}.replaced-{stamp}-{os.getpid()}"
        os.replace(output_dir, self.aside)
        logger.info("previous run moved to %s until this one writes a checkpoint", self.aside)

    def commit(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside)
            logger.info("previous run in %s replaced", self.output_dir)

    def restore(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.output_dir, ignore_errors=True)
            os.replace(self.aside, self.output_dir)
            print(f"the previous run in {self.output_dir} was kept", file=sys.stderr)


def staged_base(output_dir: str | os.PathLike) -> Path:
    """Where a new run's unnamed base waits until the run owns ``output_dir`` (beside it: the
    folder may still hold a previous run that is only replaced once this one is validated)."""
    path = Path(output_dir).resolve()
    return path.parent / f".{path.name}.base-staging"


def save_unnamed_base(
    model: Any, tokenizer: Any, model_args: Any, training_args: Any, *, resume: bool
) -> None:
    """Give a new adapter a base it can be reloaded from.

    An adapter records its base by name (``adapter_config.json``). The random tiny model and a
    LoRA run merged into its base exist under no name (the merged model would otherwise name the
    first base, and reloading would silently drop the first adapter), so they are saved as
    ``OUTPUT_DIR/base`` and the adapter names that folder. The save goes to
    :func:`staged_base` first; :func:`place_staged_base` moves it in once the run owns the
    folder. A resumed run keeps the base it saved when it started.
    """
    from fishertune.modeling import is_adapter_folder

    name = model_args.model_name_or_path or TINY_MODEL
    if name != TINY_MODEL and not is_adapter_folder(name):
        return
    base = (Path(training_args.output_dir) / "base").resolve()
    if not resume and os.environ.get("RANK", "0") == "0":  # the others would race it
        staged = staged_base(training_args.output_dir)
        shutil.rmtree(staged, ignore_errors=True)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    model.name_or_path = str(base)  # what PEFT writes as base_model_name_or_path


def place_staged_base(output_dir: Path) -> None:
    staged = staged_base(output_dir)
    if staged.is_dir():
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(output_dir / "base", ignore_errors=True)
        os.replace(staged, output_dir / "base")
