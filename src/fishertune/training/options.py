"""``fishertune train``'s options without importing the training stack: their table, ``--help``
and ``--help-all`` printed from it, the command line's names and values checked, all in well
under a second (:mod:`fishertune.training.argv` applies them to a command line).

The options are TRL's and transformers' dataclasses plus fishertune's; listing them needs those
imported (about 15 s). Their table (names, kinds, choices, defaults, help) ships as
``fishertune/assets/train_options.json``, valid for the TRL and transformers versions and the
fishertune sources it was made from; any other combination gets its own table made once (the
slow import) and kept in the user's cache. ``python -m fishertune.training.options`` remakes the
shipped one.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "train_options.json"
# the fishertune sources whose fields and help texts the table holds
SOURCES = ("training/arguments.py", "training/config.py", "data/options.py")
# TRL's and transformers' options a first run needs, shown by the short --help
COMMON = (
    "model_name_or_path",
    "dataset_name",
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
    "use_cpu",
    "bf16",
    "activation_checkpointing",
    "dtype",
    "use_peft",
    "logging_steps",
    "save_steps",
    "eval_strategy",
    "report_to",
    "resume_from_checkpoint",
)
CONFIG_OPTION = {"flags": ["--config"], "dest": "config", "kind": "str", "nargs": None,
                 "choices": None}  # fmt: skip
TRUE = ("yes", "true", "t", "y", "1")
FALSE = ("no", "false", "f", "n", "0")


def _key() -> dict[str, str]:
    """What the table depends on: the library versions and the fishertune sources."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((package / name).read_bytes())
    try:
        versions = {name: metadata.version(name) for name in ("trl", "transformers")}
    except metadata.PackageNotFoundError as err:
        raise FishertuneError(
            f"fishertune train needs {err.name}: pip install 'fishertune[train]'"
        ) from None
    return {**versions, "sources": digest.hexdigest()[:16]}


def build_table() -> dict[str, Any]:
    """The options of ``fishertune train``'s parser (imports TRL and transformers)."""
    from dataclasses import fields

    from transformers import TrainingArguments
    from trl import ModelConfig, ScriptArguments, SFTConfig

    from fishertune.training.arguments import build_parser, script_arguments_class
    from fishertune.training.config import FisherSFTConfig

    def names(cls: type) -> set[str]:
        return {f.name for f in fields(cls)}

    groups = {
        **{name: "transformers" for name in names(TrainingArguments)},
        **{name: "trl" for name in names(SFTConfig) - names(TrainingArguments)},
        **{name: "trl" for name in names(ScriptArguments) | names(ModelConfig)},
        **{name: "method" for name in names(FisherSFTConfig) - names(SFTConfig)},
        **{name: "run" for name in names(script_arguments_class()) - names(ScriptArguments)},
    }
    options = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        kind = getattr(action.type, "__name__", "")
        kind = {"string_to_bool": "bool", "int": "int", "float": "float", "str": "str"}.get(
            kind, "other"
        )
        choices = None
        if action.choices is not None:
            choices = [str(getattr(c, "value", c)) for c in action.choices]
        default = getattr(action.default, "value", action.default)
        options.append(
            {
                "flags": list(action.option_strings),
                "dest": action.dest,
                "group": groups.get(action.dest, "transformers"),
                "kind": kind if action.nargs != 0 else "flag",
                "nargs": action.nargs,
                "choices": choices,
                "default": default if isinstance(default, (int, float, str, bool)) else None,
                "help": (action.help or "").replace("%%", "%"),
            }
        )
    return {"key": _key(), "options": options}


def load_table() -> dict[str, Any]:
    """The shipped table when it fits the installed versions and sources, else the cached one,
    else a new one (made once, slowly, and cached)."""
    key = _key()
    for path in (SHIPPED, _cache_path(key)):
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if table.get("key") == key:
            return table
    table = build_table()
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(table), encoding="utf-8")
        temporary.replace(path)
    except OSError:
        pass  # a read-only cache: the table is made again next time
    return table


def _cache_path(key: dict[str, str]) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / "fishertune" / f"train-options-{name}.json"


def help_text(table: dict[str, Any], full: bool = False) -> str:
    """``--help``: fishertune's options, ``--config`` and the common TRL ones; ``--help-all``:
    every option, TRL's and transformers' after fishertune's."""
    parser = argparse.ArgumentParser(
        prog="fishertune train",
        usage="fishertune train [--config FILE.yaml|PRESET] [--OPTION VALUE ...]",
        description="Fine-tune a causal LM with baseline, NEFTune, token-F, logit-F or "
        "hessian-trace. Options come from defaults < the --config YAML < the command line; "
        "every option is also a YAML key.",
        add_help=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=36, width=100
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE|PRESET",
        help="YAML file of option: value, or a shipped preset's name (`fishertune presets`)",
    )
    parser.add_argument("-h", "--help", action="store_true", help="this list")
    parser.add_argument(
        "--help-all", action="store_true", help="every option, TRL's and transformers' too"
    )
    by_group: dict[str, list[dict[str, Any]]] = {}
    for option in table["options"]:
        by_group.setdefault(option["group"], []).append(option)
    titles = {
        "method": "method options (fishertune)",
        "run": "data and run options (fishertune)",
    }
    if full:
        titles |= {"trl": "TRL options (trl sft)", "transformers": "transformers options"}
    for group, title in titles.items():
        section = parser.add_argument_group(title)
        for option in by_group.get(group, []):
            if full or not option["flags"][0].startswith("--no_"):  # a bool's negation
                _add(section, option)
    if not full:
        section = parser.add_argument_group("common TRL and transformers options")
        for name in COMMON:
            for option in table["options"]:
                if option["dest"] == name:
                    _add(section, option)
        parser.epilog = (
            f"`fishertune train --help-all` lists all {len(table['options'])} options (TRL's "
            "and transformers' too)."
        )
    return parser.format_help()


def _add(section: Any, option: dict[str, Any]) -> None:
    text = option["help"]
    if option["default"] is not None and option["kind"] != "flag":
        text += f" (default: {option['default']})"
    metavar = {"bool": "BOOL", "int": "N", "float": "X"}.get(option["kind"], "VALUE")
    if option["choices"]:
        metavar = "{" + ",".join(option["choices"]) + "}"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if option["kind"] == "flag":
        kwargs["action"] = "store_true"
    else:
        kwargs["metavar"] = metavar
    section.add_argument(option["flags"][0], **kwargs)


def _lookup(table: dict[str, Any], flag: str) -> dict[str, Any] | None:
    exact = [o for o in table["options"] if flag in o["flags"]]
    if exact:
        return exact[0]
    # argparse takes an unambiguous prefix (allow_abbrev)
    found = {o["dest"]: o for o in table["options"] for f in o["flags"] if f.startswith(flag)}
    return next(iter(found.values())) if len(found) == 1 else None


def _is_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:
        float(token)  # argparse reads "-1" as a value: no option looks like a number
    except ValueError:
        return False
    return True


def check_command_line(argv: list[str], table: dict[str, Any]) -> dict[str, list[str]]:
    """Each ``--name [value ...]``: a known option (or an unambiguous prefix, as argparse
    takes) with values of its kind, in argparse's words; returns ``{dest: values}``."""
    found: dict[str, list[str]] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            raise FishertuneError(
                f"unexpected argument {token!r}: options are --name value "
                "(`fishertune train --help`)"
            )
        flag, has_value, inline = token.partition("=")
        if flag == "--config":
            option: dict[str, Any] | None = dict(CONFIG_OPTION)
        else:
            option = _lookup(table, flag)
        if option is None:
            names = [f for o in table["options"] for f in o["flags"]] + ["--config"]
            close = difflib.get_close_matches(flag, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise FishertuneError(
                f"unknown option {flag}{hint} (`fishertune train --help` lists the options)"
            )
        nargs = option["nargs"]
        if has_value:
            values = [inline]
        elif option["kind"] == "flag":
            values = []
        elif nargs in ("?", "*", "+"):
            values = []
            while index < len(argv) and _is_value(argv[index]):
                values.append(argv[index])
                index += 1
                if nargs == "?":
                    break
            if nargs == "+" and not values:
                raise FishertuneError(
                    f"argument {'/'.join(option['flags'])}: expected at least one argument"
                )
        elif index < len(argv) and _is_value(argv[index]):
            values = [argv[index]]
            index += 1
        else:
            raise FishertuneError(f"argument {'/'.join(option['flags'])}: expected one argument")
        for value in values:
            _check_value(option, value)
        found[option["dest"]] = values
    return found


def _check_value(option: dict[str, Any], value: str) -> None:
    flags = "/".join(option["flags"])
    kind = option["kind"]
    if kind == "bool" and value.lower() not in TRUE + FALSE:
        raise FishertuneError(
            f"argument {flags}: Truthy value expected: got {value} but expected one of "
            "yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
        )
    converters = {"int": int, "float": float}
    if kind in converters:
        try:
            converters[kind](value)
        except ValueError:
            raise FishertuneError(f"argument {flags}: invalid {kind} value: {value!r}") from None
    if option["choices"] and value not in option["choices"]:
        raise FishertuneError(
            f"argument {flags}: invalid choice: {value!r} (choose from "
            f"{', '.join(option['choices'])})"
        )


def check_config_keys(path: Path, table: dict[str, Any]) -> dict[str, Any]:
    """The YAML's keys are options (named with their line otherwise); returns its values."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise FishertuneError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from err
    except OSError as err:
        raise FishertuneError(f"{path}: cannot be read ({err.strerror})") from err
    if node is None or not isinstance(node, yaml.MappingNode):
        raise FishertuneError(f"{path}: must be a YAML mapping of option: value")
    known = {o["dest"] for o in table["options"]} | {"env"}
    for key_node, _ in node.value:
        if key_node.value not in known:
            raise FishertuneError(
                f"{path} line {key_node.start_mark.line + 1}: unknown option {key_node.value!r}"
            )
    return yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}


if __name__ == "__main__":
    # remakes the shipped table (after a change of the options or of TRL / transformers)
    SHIPPED.write_text(json.dumps(build_table(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SHIPPED}", file=sys.stderr)
