"""``fishertune`` command line: ``train``, ``analyze``, ``evaluate``, ``compare``, ``experiment``,
``demo``, ``presets``, ``data``; ``fishertune --version``; ``python -m fishertune`` is the same
command.

Each subcommand lives in its own module and is imported only when used, so ``fishertune analyze``
does not pay for TRL's import and ``--help`` is fast.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

from fishertune.errors import TERMINATED, FishertuneError, describe_fault

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fishertune.training.cli", "fine-tune a causal LM with a method (YAML + overrides)"),
    "analyze": ("fishertune.analysis.cli", "measure the noise-curvature relation on a model"),
    "evaluate": ("fishertune.evaluation.cli", "evaluate a trained model (offline or lm-eval)"),
    "compare": ("fishertune.compare", "compare train runs on held-out files: losses, paired diffs"),
    "experiment": ("fishertune.experiments.cli", "run a grid of methods x seeds and report"),
    "demo": ("fishertune.demo", "offline tiny preset: train the four methods and compare"),
    "presets": ("fishertune.presets", "list the shipped presets; print one's path or YAML"),
    "data": ("fishertune.data.cli", "prepare SRC --output DIR: read data, count dropped rows"),
}


def _usage() -> str:
    lines = ["usage: fishertune COMMAND [ARGS...] | --version", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\nrun `fishertune COMMAND --help` for a command's options")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fishertune import __version__

        print(f"fishertune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler's stop, `kill`) unwinds as SystemExit(143), like Ctrl-C, so that a
    # command ends in one line and a training run records how it ended
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        if command == "train":
            # --help, argument errors and TRL's habits answered before the training stack is
            # imported (15 s); the command itself reads its notes again
            from fishertune.training.argv import prepare_argv

            if prepare_argv(rest)[0] is None:
                return 0
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except FishertuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        fault = describe_fault(err)
        if fault is None:
            raise
        print(f"error: {fault[0]}", file=sys.stderr)
        return fault[1]
    finally:
        if main_thread:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(TERMINATED)


if __name__ == "__main__":
    sys.exit(main())
