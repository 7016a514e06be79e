"""``fishertune train``'s arguments: the parser (TRL's flags, :class:`FisherSFTConfig`'s and the
script's own), the YAML's keys, the values' checks, and :func:`validate_train_argv` (every check
of ``fishertune train`` without training)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fishertune.data.options import HELP as DATA_HELP
from fishertune.data.options import DataOptions
from fishertune.data.tokenizer import TINY_TOKENIZER
from fishertune.errors import FishertuneError
from fishertune.modeling import TINY_MODEL
from fishertune.training.numbers import (
    check_number,
    check_numbers,
    check_ranges,
    number_fields,
    yaml_number_form,
)
from fishertune.training.output_dir import plan_output_dir


def script_arguments_class() -> type:
    """TRL's ``ScriptArguments`` with ``fishertune train``'s run options (made on first use:
    TRL is imported only then)."""
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
        data_format: str = field(default="auto", metadata={"help": DATA_HELP["data_format"]})
        data_columns: str | None = field(default=None, metadata={"help": DATA_HELP["data_columns"]})
        data_roles: str | None = field(default=None, metadata={"help": DATA_HELP["data_roles"]})
        on_bad_rows: str = field(
            default="drop",
            metadata={"help": DATA_HELP["on_bad_rows"], "choices": ["drop", "error"]},
        )
        keep_truncated_records: bool = field(
            default=False, metadata={"help": DATA_HELP["keep_truncated_records"]}
        )
        drop_too_long: bool = field(
            default=False,
            metadata={
                "help": "Drop rows longer than max_length tokens (counted as too_long) instead "
                "of truncating them."
            },
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
        (script_arguments_class(), FisherSFTConfig, ModelConfig), prog="fishertune train"
    )


def parse_args(argv: list[str], notes: list[str] | None = None) -> tuple[Any, Any, Any]:
    """Parse YAML + overrides; bad values become a one-line ``FishertuneError`` that names the
    YAML file and line when the value came from there.

    Without a GPU (or with ``use_cpu``), the config file's ``bf16`` and activation
    checkpointing are turned off unless the command line sets them; ``notes`` gets the line
    that says so."""
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
        argv = _cpu_overrides(argv, path, given, notes)

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


def _cpu_overrides(
    argv: list[str], path: Path, given: set[str], notes: list[str] | None
) -> list[str]:
    """A config file's GPU settings, off where training runs on the CPU (a shipped preset's
    bf16 would be refused there, or autocast on the CPU at several times the cost); the
    command line's own values are kept."""
    import yaml

    values = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    given = {name.replace("-", "_") for name in given}
    checkpointing = {"activation_checkpointing", "gradient_checkpointing"}
    asked = {}
    if values.get("bf16") is True and "bf16" not in given:
        asked["bf16"] = "bf16"
    if any(values.get(name) is True for name in checkpointing) and not given & checkpointing:
        asked["activation_checkpointing"] = "activation checkpointing"
    if not asked:
        return argv
    use_cpu = _flag_value(argv, "use_cpu") if "use_cpu" in given else values.get("use_cpu") is True
    if not use_cpu:
        from fishertune.training.config import accelerator_present

        if accelerator_present():
            return argv
    if notes is not None:
        them = "them" if len(asked) > 1 else "it"
        notes.append(
            f"{' and '.join(asked.values())} off: {'use_cpu' if use_cpu else 'no GPU'} "
            f"({path.name} asks for {them}; "
            f"{' '.join(f'--{name} true' for name in asked)} keeps {them})"
        )
    return [*argv, *(arg for name in asked for arg in (f"--{name}", "false"))]


def _flag_value(argv: list[str], name: str) -> bool:
    """The last command-line value of boolean flag ``--name`` (argparse's reading: alone or
    with yes/true/1)."""
    value = True
    for index, arg in enumerate(argv):
        if arg == f"--{name}":
            after = argv[index + 1] if index + 1 < len(argv) else ""
            value = after.startswith("--") or after.lower() in ("", "yes", "true", "t", "y", "1")
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1].lower() in ("yes", "true", "t", "y", "1")
    return value


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
        for cls in (script_arguments_class(), FisherSFTConfig, ModelConfig)
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
        for cls in (script_arguments_class(), FisherSFTConfig, ModelConfig)
        for name, kind in number_fields(cls).items()
    }
    text = path.read_text(encoding="utf-8-sig")
    nodes = {key.value: node for key, node in yaml.compose(text).value}
    for key, value in yaml.safe_load(text).items():
        if key in numbers and key not in overridden:
            try:
                yaml_number_form(key, numbers[key][0], nodes.get(key))
                check_number(key, value, *numbers[key])
            except FishertuneError as err:
                raise FishertuneError(f"{path} line {lines[key]}: {err}") from None


def check_values(script_args: Any, training_args: Any) -> None:
    """Numbers of the right type and finite (:mod:`.numbers`); sizes and rates that TRL /
    transformers accept but cannot train with."""
    check_numbers(script_args)  # the training options checked theirs when they were built
    check_ranges(script_args)
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


def validate_train_argv(
    argv: list[str], *, check_output_dir: bool = True, unwritten_data: Path | None = None
) -> tuple[Any, Any, Any]:
    """Validate a ``fishertune train`` argument list without loading a model or training.

    Parses it (YAML + overrides, the method's option checks of
    :class:`~fishertune.training.config.FisherSFTConfig`), checks sizes and rates, reads every
    row of a local data file (train split, and the test split when evaluation is on), and with
    ``check_output_dir`` checks that ``output_dir`` can be used as asked (``--resume`` with the
    same settings, ``--overwrite_output_dir``, or empty). Changes nothing on disk. Data inside
    ``unwritten_data`` (a grid's study data, prepared at launch) is not read.

    Returns:
        ``(script_args, training_args, model_args)``.

    Raises:
        FishertuneError: one line naming the file, line or option at fault.
    """
    from fishertune.data.chat import check_conversations

    script_args, training_args, model_args = parse_args(argv)
    check_values(script_args, training_args)
    # a grid checks its runs ahead of its stages (check_output_dir false): a run's model may be
    # the base stage's, not trained yet or interrupted; the run's own train checks it at launch
    check_model_options(script_args, model_args, check_source=check_output_dir)
    if not script_args.dataset_name:
        raise FishertuneError("dataset_name is required (a hub name, a local file or folder)")
    options = DataOptions.from_args(script_args)
    if unwritten_data is not None and Path(
        script_args.dataset_name
    ).expanduser().absolute().is_relative_to(unwritten_data.absolute()):
        return script_args, training_args, model_args
    check_conversations(script_args.dataset_name, script_args.dataset_train_split, options)
    if training_args.eval_strategy != "no":
        check_conversations(script_args.dataset_name, script_args.dataset_test_split, options)
    if check_output_dir:
        plan_output_dir(script_args, training_args, model_args)
    return script_args, training_args, model_args


def check_model_options(script_args: Any, model_args: Any, *, check_source: bool = True) -> None:
    """Refuse, one line each, the ``trl sft`` model options ``fishertune train`` cannot honour
    (and numbers that are not finite numbers of their type); with ``check_source``, a local
    model folder's weights and run record too, before the data is read."""
    check_numbers(model_args)
    name = model_args.model_name_or_path
    # a folder that does not exist is the loader's to refuse (a hub name, or a clear message)
    if check_source and name and name != TINY_MODEL and Path(name).expanduser().is_dir():
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
