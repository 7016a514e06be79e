"""``fishertune train``'s command line checked before anything heavy is imported: a help printed
from the option table (:mod:`fishertune.training.options`), the names and values checked, and
TRL's habits (``--neftune_noise_alpha``, ``--resume_from_checkpoint``) answered.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError
from fishertune.training.options import (
    FALSE,
    TRUE,
    check_command_line,
    check_config_keys,
    help_text,
    load_table,
)

__all__ = ["prepare_argv"]


def prepare_argv(argv: list[str]) -> tuple[list[str] | None, list[str]]:
    """``fishertune train``'s command line checked before anything heavy is imported.

    Returns ``(argv, notes)``: ``argv`` with TRL's habits translated (``None`` when a help was
    printed: nothing to run), and one line for each translation made.

    Raises:
        FishertuneError: one line naming the option at fault (or the exact command to run).
    """
    table = load_table()
    if "--help-all" in argv:
        print(help_text(table, full=True))
        return None, []
    if "-h" in argv or "--help" in argv:
        print(help_text(table))
        return None, []
    given = check_command_line(argv, table)
    values: dict[str, Any] = {}
    if "config" in given:
        from fishertune.presets import resolve_config

        values = check_config_keys(resolve_config(given["config"][0], "train"), table)
    notes: list[str] = []
    argv = _neftune_noise_alpha(argv, given, values, notes)
    argv = _resume_from_checkpoint(argv, given, values, notes)
    if "report_to" not in given and "report_to" not in values and _has("tensorboard"):
        # transformers reports nowhere by default; a run folder holds its tensorboard events
        argv = [*argv, "--report_to", "tensorboard"]
    return argv, notes


def _has(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def _without(argv: list[str], flag: str, count: int) -> list[str]:
    """``argv`` without ``flag`` and the ``count`` values after it (or ``flag=value``)."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] == flag:
            index += 1 + count
            continue
        if not argv[index].startswith(f"{flag}="):
            out.append(argv[index])
        index += 1
    return out


def _neftune_noise_alpha(
    argv: list[str], given: dict[str, list[str]], values: dict[str, Any], notes: list[str]
) -> list[str]:
    """TRL's ``--neftune_noise_alpha X`` is fishertune's ``--method neftune --neftune_alpha X``
    (transformers' own NEFTune hook would add noise a second time)."""
    if "neftune_noise_alpha" not in given:
        return argv
    alpha = given["neftune_noise_alpha"][0]
    method = given["method"][0] if "method" in given else values.get("method", "baseline")
    flags = _flag_of(argv, "--neftune_noise_alpha", "--neftune-noise-alpha")
    rest = _without(argv, flags, 1)
    if method not in ("baseline", "neftune"):
        raise FishertuneError(
            f"--neftune_noise_alpha adds NEFTune noise, and method is {method}: for NEFTune "
            f"run fishertune train {shlex.join(_without(rest, '--method', 1))} --method neftune "
            f"--neftune_alpha {alpha}"
        )
    notes.append(
        f"--neftune_noise_alpha {alpha} taken as --method neftune --neftune_alpha {alpha} "
        "(fishertune's NEFTune; transformers' own is not used)"
    )
    return [*_without(rest, "--method", 1), "--method", "neftune", "--neftune_alpha", alpha]


def _flag_of(argv: list[str], *flags: str) -> str:
    """The spelling of an option the command line used."""
    for token in argv:
        name = token.split("=", 1)[0]
        if name in flags:
            return name
    return flags[0]


def _resume_from_checkpoint(
    argv: list[str], given: dict[str, list[str]], values: dict[str, Any], notes: list[str]
) -> list[str]:
    """TRL's ``--resume_from_checkpoint PATH`` is ``--resume true`` when PATH is the run
    folder's latest complete checkpoint (what ``--resume`` continues from); anything else is
    answered with the command that resumes."""
    if "resume_from_checkpoint" not in given:
        return argv
    from fishertune.files import latest_checkpoint

    value = given["resume_from_checkpoint"][0]
    flag = _flag_of(argv, "--resume_from_checkpoint", "--resume-from-checkpoint")
    rest = _without(argv, flag, 1)
    if value.lower() in FALSE:
        return rest
    output_dir = given["output_dir"][0] if "output_dir" in given else values.get("output_dir")
    if value.lower() in TRUE:
        notes.append(f"{flag} {value} taken as --resume true (the latest complete checkpoint)")
        return [*_without(rest, "--resume", 1), "--resume", "true"]
    checkpoint = Path(value).expanduser().absolute()
    folder = checkpoint.parent
    latest = latest_checkpoint(folder) if folder.is_dir() else None
    same_folder = output_dir is not None and Path(output_dir).expanduser().absolute() == folder
    if same_folder and latest is not None and latest.absolute() == checkpoint:
        notes.append(
            f"{flag} {value} taken as --resume true ({checkpoint.name} is the latest complete "
            f"checkpoint of {output_dir})"
        )
        return [*_without(rest, "--resume", 1), "--resume", "true"]
    if not checkpoint.is_dir():
        why = f"{value} does not exist"
    elif latest is None:
        why = f"{folder} has no complete checkpoint"
    elif latest.absolute() != checkpoint:
        why = f"fishertune resumes from a run's latest complete checkpoint, {latest.name} here"
    else:
        why = "fishertune resumes the run folder that holds it"
    command = [*_without(_without(rest, "--output_dir", 1), "--resume", 1)]
    command += ["--output_dir", str(folder), "--resume", "true"]
    raise FishertuneError(
        f"{flag}: {why}; to continue that run: fishertune train {shlex.join(command)}"
    )
