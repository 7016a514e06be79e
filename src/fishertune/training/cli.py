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
* One process per output folder (:func:`output_lock`). Ctrl-C, SIGTERM and I/O faults (a full
  disk, a read-only folder) end in one line and exit status 130, 143 or 1, with the record
  marked ``failed`` (space for that write is reserved at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fishertune.data.tokenizer import TINY_TOKENIZER
from fishertune.errors import FishertuneError, describe_fault, first_line
from fishertune.files import (
    CHECKPOINT_RECORD,
    RECORD_RESERVE,
    RUN_RECORD,
    FolderLock,
    read_json_record,
    reserve_space,
    write_json_reserved,
)
from fishertune.modeling import TINY_MODEL
from fishertune.training.numbers import check_number, check_numbers, number_fields

logger = logging.getLogger(__name__)


def _script_arguments_class() -> type:
    from trl import ScriptArguments

    @dataclass
    class FisherScriptArguments(ScriptArguments):
        """Data, tokenizer, run-management and tiny-model options of ``fishertune train``."""

        dataset_fraction: float | None = field(
            default=None,
            metadata={"help": "Stratified (by `source`) subsample of the train split: (0, 1]."},
        )
        dataset_subsample_seed: int = field(
            default=0, metadata={"help": "Seed of the stratified subsample."}
        )
        tokenizer_name_or_path: str | None = field(
            default=None,
            metadata={
                "help": f"Tokenizer (default: the model's). {TINY_TOKENIZER} is the shipped one."
            },
        )
        resume: bool = field(
            default=False,
            metadata={"help": "Continue from the latest complete checkpoint in output_dir."},
        )
        overwrite_output_dir: bool = field(
            default=False,
            metadata={
                "help": "Replace an existing, non-empty output_dir: the old run is moved aside "
                "and deleted once the new one has written its first checkpoint."
            },
        )
        save_merged_model: bool = field(
            default=False,
            metadata={
                "help": "With use_peft: also save the base with the adapter merged in, in the "
                "loaded dtype, to OUTPUT_DIR/merged (a plain transformers model)."
            },
        )
        tiny_hidden_size: int = field(default=128, metadata={"help": f"{TINY_MODEL}: hidden size."})
        tiny_num_layers: int = field(default=2, metadata={"help": f"{TINY_MODEL}: layers."})
        tiny_num_heads: int = field(default=4, metadata={"help": f"{TINY_MODEL}: heads."})

    return FisherScriptArguments


def build_parser() -> Any:
    from trl import ModelConfig, TrlParser

    from fishertune.training.config import FisherSFTConfig

    return TrlParser(
        (_script_arguments_class(), FisherSFTConfig, ModelConfig), prog="fishertune train"
    )


def parse_args(argv: list[str]) -> tuple[Any, Any, Any]:
    """Parse YAML + overrides; bad values become a one-line ``FishertuneError`` that names the
    YAML file and line when the value came from there."""
    lines: dict[str, int] = {}
    path = None
    if "--config" in argv:
        from fishertune.presets import resolve_config

        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise FishertuneError(
                "--config needs a YAML file or a preset name (fishertune presets)"
            )
        path = resolve_config(argv[index + 1], "train")  # a file, else a preset (`tiny`)
        argv = [*argv[: index + 1], str(path), *argv[index + 2 :]]
        lines = _check_config_keys(path)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if path is not None:
        _check_yaml_numbers(path, lines, given)

    def where(message: str, name: str | None = None) -> str:
        # the option's YAML line, unless the command line overrides it
        if name is None:
            name = next((k for k in lines if message.startswith((k, f"--{k}"))), None)
        if path is not None and name in lines and name not in given:
            return f"{path} line {lines[name]}: {message}"
        return message

    parser = build_parser()
    parser.exit_on_error = False  # argparse's usage dump + SystemExit becomes one line below
    try:
        return parser.parse_args_and_config(argv)
    except FishertuneError as err:
        raise FishertuneError(where(str(err))) from err
    except argparse.ArgumentError as err:
        name = (err.argument_name or "").split("/")[0].lstrip("-") or None
        message = str(err)
        if name in lines and name not in given:
            message = f"{name}: {err.message}"
        raise FishertuneError(where(message, name)) from err
    except (ValueError, TypeError) as err:
        raise FishertuneError(where(str(err).splitlines()[0])) from err


def _check_config_keys(path: Path) -> dict[str, int]:
    """Name the unknown YAML key and its line instead of argparse's generic message; return the
    line of each key."""
    import yaml

    from fishertune.training.config import FisherSFTConfig

    try:
        node = yaml.compose(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FishertuneError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from err
    if node is None or not isinstance(node, yaml.MappingNode):
        raise FishertuneError(f"{path}: must be a YAML mapping of option: value")
    from trl import ModelConfig

    known = {
        f.name
        for cls in (_script_arguments_class(), FisherSFTConfig, ModelConfig)
        for f in fields(cls)
    } | {"env"}
    lines = {}
    for key_node, _ in node.value:
        if key_node.value not in known:
            raise FishertuneError(
                f"{path} line {key_node.start_mark.line + 1}: unknown option {key_node.value!r}"
            )
        lines[key_node.value] = key_node.start_mark.line + 1
    return lines


def _check_yaml_numbers(path: Path, lines: dict[str, int], overridden: set[str]) -> None:
    """YAML values reach the options unconverted (a bool, a list, null, text argparse converts
    with ``float``: ``1e400``): check the numeric ones here, where their line is known."""
    import yaml
    from trl import ModelConfig

    from fishertune.training.config import FisherSFTConfig

    numbers = {
        name: kind
        for cls in (_script_arguments_class(), FisherSFTConfig, ModelConfig)
        for name, kind in number_fields(cls).items()
    }
    for key, value in yaml.safe_load(path.read_text(encoding="utf-8-sig")).items():
        if key in numbers and key not in overridden:
            try:
                check_number(key, value, *numbers[key])
            except FishertuneError as err:
                raise FishertuneError(f"{path} line {lines[key]}: {err}") from None


def check_values(script_args: Any, training_args: Any) -> None:
    """Numbers of the right type and finite (:mod:`.numbers`); sizes and rates that TRL /
    transformers accept but cannot train with."""
    check_numbers(script_args)  # the training options checked theirs when they were built
    positive = {
        "max_length": training_args.max_length,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "tiny_hidden_size": script_args.tiny_hidden_size,
        "tiny_num_layers": script_args.tiny_num_layers,
        "tiny_num_heads": script_args.tiny_num_heads,
    }
    for name, value in positive.items():
        if value is not None and value < 1:
            raise FishertuneError(f"{name} must be >= 1, got {value}")
    if training_args.max_steps == 0 or (
        training_args.max_steps < 0 and training_args.num_train_epochs <= 0
    ):
        raise FishertuneError(
            f"nothing to train: max_steps={training_args.max_steps}, "
            f"num_train_epochs={training_args.num_train_epochs}"
        )
    if training_args.learning_rate < 0:
        raise FishertuneError(f"learning_rate must be >= 0, got {training_args.learning_rate}")
    fraction = script_args.dataset_fraction
    if fraction is not None and not 0 < fraction <= 1:
        raise FishertuneError(f"dataset_fraction must be in (0, 1], got {fraction}")
    if script_args.resume and script_args.overwrite_output_dir:
        raise FishertuneError("--resume and --overwrite_output_dir exclude each other")


def validate_train_argv(argv: list[str], *, check_output_dir: bool = True) -> tuple[Any, Any, Any]:
    """Validate a ``fishertune train`` argument list without loading a model or training.

    Parses it (YAML + overrides, the method's option checks of
    :class:`~fishertune.training.config.FisherSFTConfig`), checks sizes and rates, reads every
    row of a local data file (train split, and the test split when evaluation is on), and with
    ``check_output_dir`` checks that ``output_dir`` can be used as asked (``--resume`` with the
    same settings, ``--overwrite_output_dir``, or empty). Changes nothing on disk.

    Returns:
        ``(script_args, training_args, model_args)``.

    Raises:
        FishertuneError: one line naming the file, line or option at fault.
    """
    from fishertune.data.chat import check_conversations

    script_args, training_args, model_args = parse_args(argv)
    check_values(script_args, training_args)
    check_model_options(script_args, model_args)
    if not script_args.dataset_name:
        raise FishertuneError("dataset_name is required (a hub name, a local file or folder)")
    check_conversations(script_args.dataset_name, script_args.dataset_train_split)
    if training_args.eval_strategy != "no":
        check_conversations(script_args.dataset_name, script_args.dataset_test_split)
    if check_output_dir:
        plan_output_dir(script_args, training_args, model_args)
    return script_args, training_args, model_args


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The latest ``checkpoint-N`` whose save completed (it holds our record, written last)."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        suffix = child.name.split("-", 1)[1]
        if suffix.isdigit() and (child / CHECKPOINT_RECORD).is_file():
            found.append((int(suffix), child))
    return max(found)[1] if found else None


# Options that change what a run computes: a resume must give the same ones (bit-identical runs).
_SCRIPT_SETTINGS = (
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "dataset_fraction",
    "dataset_subsample_seed",
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
    return [
        f"{name}={recorded.get(name)!r} (now {current.get(name)!r})"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
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
    _check_writable(path)
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


class _Replacement:
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


def tokenizer_from_args(script_args: Any, model_args: Any, training_args: Any = None) -> Any:
    """The tokenizer the data is tokenized with (``chat_template_path`` applied first)."""
    from fishertune.modeling import load_tokenizer as load

    return load(
        model_args.model_name_or_path or TINY_MODEL,
        script_args.tokenizer_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=bool(getattr(training_args, "trust_remote_code", False)),
        chat_template_path=getattr(training_args, "chat_template_path", None),
    )


def check_model_options(script_args: Any, model_args: Any) -> None:
    """Refuse, one line each, the ``trl sft`` model options ``fishertune train`` cannot honour
    (and numbers that are not finite numbers of their type)."""
    check_numbers(model_args)
    name = model_args.model_name_or_path
    # an existing folder's weights and run record, before the data is read; a folder that does
    # not exist yet (a grid's base run, validated before it is trained) is the loader's to refuse
    if name and name != TINY_MODEL and Path(name).expanduser().is_dir():
        from fishertune.modeling import check_model_source

        check_model_source(name)
    for name in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, name, False):
            raise FishertuneError(
                f"{name}: quantized (QLoRA) training is not supported (the penalties "
                "differentiate through every layer); use --use_peft true on a bf16 model"
            )
    if script_args.save_merged_model and not model_args.use_peft:
        raise FishertuneError("save_merged_model needs use_peft=true (no adapter to merge)")


def model_from_args(script_args: Any, training_args: Any, model_args: Any, tokenizer: Any) -> Any:
    """The model to fine-tune, in ``--dtype`` (the dtype it is saved back in).

    A LoRA run folder as ``--model_name_or_path`` is loaded with its adapter merged into its
    base: fine-tuning continues from the adapted model (fully, or with a new adapter under
    ``--use_peft``). Exact penalty gradients default to eager attention (double backward).
    """
    from fishertune.modeling import load_model as load

    exact = training_args.method in ("token-f", "logit-f") and training_args.penalty_grad == "exact"
    return load(
        model_args.model_name_or_path or TINY_MODEL,
        tokenizer,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation or ("eager" if exact else None),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        merge_adapter=True,
        tiny_sizes={
            "hidden_size": script_args.tiny_hidden_size,
            "num_layers": script_args.tiny_num_layers,
            "num_heads": script_args.tiny_num_heads,
        },
        seed=training_args.seed,
    )


def _staged_base(output_dir: str | os.PathLike) -> Path:
    """Where a new run's unnamed base waits until the run owns ``output_dir`` (beside it: the
    folder may still hold a previous run that is only replaced once this one is validated)."""
    path = Path(output_dir).resolve()
    return path.parent / f".{path.name}.base-staging"


def _save_unnamed_base(
    model: Any, tokenizer: Any, model_args: Any, training_args: Any, *, resume: bool
) -> None:
    """Give a new adapter a base it can be reloaded from.

    An adapter records its base by name (``adapter_config.json``). The random tiny model and a
    LoRA run merged into its base exist under no name (the merged model would otherwise name the
    first base, and reloading would silently drop the first adapter), so they are saved as
    ``OUTPUT_DIR/base`` and the adapter names that folder. The save goes to
    :func:`_staged_base` first; :func:`_place_staged_base` moves it in once the run owns the
    folder. A resumed run keeps the base it saved when it started.
    """
    from fishertune.modeling import is_adapter_folder

    name = model_args.model_name_or_path or TINY_MODEL
    if name != TINY_MODEL and not is_adapter_folder(name):
        return
    base = (Path(training_args.output_dir) / "base").resolve()
    if not resume and os.environ.get("RANK", "0") == "0":  # the others would race it
        staged = _staged_base(training_args.output_dir)
        shutil.rmtree(staged, ignore_errors=True)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    model.name_or_path = str(base)  # what PEFT writes as base_model_name_or_path


def _place_staged_base(output_dir: Path) -> None:
    staged = _staged_base(output_dir)
    if staged.is_dir():
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(output_dir / "base", ignore_errors=True)
        os.replace(staged, output_dir / "base")


def save_merged_model(trainer: Any, folder: Path) -> None:
    """The trained adapter merged into its base (``merge_and_unload``), saved with the tokenizer
    in the dtype the base was loaded in."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        merged.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)


def load_datasets(script_args: Any, training_args: Any, tokenizer: Any) -> tuple[Any, Any]:
    from fishertune.data.chat import load_conversations, stratified_subsample, tokenize_dataset

    if not script_args.dataset_name:
        raise FishertuneError("dataset_name is required (a hub name, a local file or folder)")
    max_length = training_args.max_length or 1024
    train = load_conversations(script_args.dataset_name, split=script_args.dataset_train_split)
    if script_args.dataset_fraction is not None:
        train = stratified_subsample(
            train, script_args.dataset_fraction, seed=script_args.dataset_subsample_seed
        )
    train = tokenize_dataset(train, tokenizer, max_length)
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = load_conversations(
            script_args.dataset_name, split=script_args.dataset_test_split
        )
        evaluation = tokenize_dataset(evaluation, tokenizer, max_length)
    return train, evaluation


def build_trainer(
    script_args: Any,
    training_args: Any,
    model_args: Any,
    *,
    on_first_checkpoint: Callable[[], None] | None = None,
) -> Any:
    """Tokenizer, data, model and trainer from parsed arguments (presets are checked with it).

    ``on_first_checkpoint`` runs on the main process once the first complete checkpoint exists.
    """
    from trl import get_peft_config

    from fishertune.training.trainer import FisherSFTTrainer

    check_values(script_args, training_args)
    check_model_options(script_args, model_args)
    tokenizer = tokenizer_from_args(script_args, model_args, training_args)
    train, evaluation = load_datasets(script_args, training_args, tokenizer)
    if not training_args.assistant_only:  # TRL then scores every token, as the library does
        train, evaluation = (
            ds.remove_columns("assistant_masks") if ds is not None else None
            for ds in (train, evaluation)
        )
    model = model_from_args(script_args, training_args, model_args, tokenizer)
    if model_args.use_peft:
        _save_unnamed_base(model, tokenizer, model_args, training_args, resume=script_args.resume)
    trainer = FisherSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if script_args.save_merged_model and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # merge_and_unload on sharded parameters would write a wrong or empty model
        raise FishertuneError(
            "save_merged_model is not supported with FSDP or DeepSpeed (sharded parameters): "
            "merge after training, e.g. fishertune.modeling.load_model_and_tokenizer(RUN_DIR, "
            "merge_adapter=True) then save_pretrained"
        )
    trainer.checkpoint_record.on_first = on_first_checkpoint
    return trainer


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
    replacement: _Replacement | None,
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(flag in argv for flag in ("-h", "--help")):
        build_parser().print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    script_args, training_args, model_args = parse_args(argv)
    check_values(script_args, training_args)
    # held from before output_dir is looked at until the run ends: a second process on the same
    # folder is refused instead of deciding, too, that the folder is free
    main_process = os.environ.get("RANK", "0") == "0"
    with output_lock(training_args.output_dir) if main_process else contextlib.nullcontext():
        return _plan_and_run(argv, script_args, training_args, model_args)


def _check_writable(path: Path) -> None:
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):  # EROFS for a read-only mount, root included
        raise FishertuneError(
            f"output_dir {path}: {existing} is not writable (a read-only file system or "
            "another user's folder)"
        )


def output_lock(output_dir: str | os.PathLike) -> FolderLock:
    """The lock that keeps one ``fishertune train`` per output folder: ``.NAME.lock`` beside the
    folder (a lock inside it would move away with a replaced run), naming its holder's PID."""
    path = Path(output_dir).resolve()
    _check_writable(path)
    return FolderLock(path.parent / f".{path.name}.lock", "fishertune train", path)


def _plan_and_run(argv: list[str], script_args: Any, training_args: Any, model_args: Any) -> int:
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
    return _run(trainer, plan, script_args, training_args, record, on_first, start)


def _run(
    trainer: Any,
    plan: OutputPlan,
    script_args: Any,
    training_args: Any,
    record: dict[str, Any],
    on_first: list[Callable[[], None]],
    start: float,
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
    try:
        if plan.replace and main_process:
            replacement = _Replacement(output_dir)
        if main_process:
            _place_staged_base(output_dir)
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


def _record_failure(
    trainer: Any,
    training_args: Any,
    record: dict[str, Any],
    replacement: _Replacement | None,
    err: BaseException,
    start: float,
) -> None:
    """On the main process after an error: drop the staged base, then put the replaced run back
    if this one has no checkpoint yet, else mark this one ``failed`` with the error."""
    output_dir = Path(training_args.output_dir)
    shutil.rmtree(_staged_base(output_dir), ignore_errors=True)
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
