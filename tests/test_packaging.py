"""fishertune as an installed package: presets by name, `fishertune presets`, `--version`,
`python -m fishertune`, and the package data the wheel ships.

The wheel itself is built and run from an empty folder by scripts/check_wheel.sh (CI).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fishertune.cli import COMMANDS
from fishertune.cli import main as cli_main
from fishertune.errors import FishertuneError
from fishertune.presets import preset_names, preset_path, resolve_config

REPO = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = REPO / "src" / "fishertune" / "configs"


def _on_disk() -> set[str]:
    """Every preset under src/fishertune/configs, by its path without .yaml (read directly)."""
    return {
        p.relative_to(PACKAGE_CONFIGS).with_suffix("").as_posix()
        for p in PACKAGE_CONFIGS.rglob("*.yaml")
    }


def test_one_copy_of_the_presets_and_the_wheel_ships_all_of_them() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    # the repository's configs/ is the package's folder, not a copy that can drift
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == PACKAGE_CONFIGS.resolve()
    # every file there is matched by pyproject's package-data glob
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["fishertune"]
    assert "configs/**/*.yaml" in package_data
    assert all(p.suffix == ".yaml" for p in PACKAGE_CONFIGS.rglob("*") if p.is_file())


def test_preset_names_by_kind() -> None:
    names = _on_disk()
    assert {"tiny", "paper/token-f", "experiments/tiny", "accelerate/fsdp"} <= names
    assert set(preset_names()) == names
    assert preset_names("experiment") == ["paper", "sharegpt-equivalence", "tiny", "tiny-ablations"]
    assert set(preset_names("train")) == {
        n for n in names if not n.startswith(("experiments/", "accelerate/"))
    }
    assert preset_names("accelerate") == sorted(n for n in names if n.startswith("accelerate/"))


def test_resolve_config_finds_presets_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny", "train").samefile(PACKAGE_CONFIGS / "tiny.yaml")
    assert resolve_config("paper/token-f", "train").samefile(PACKAGE_CONFIGS / "paper/token-f.yaml")
    # older spellings of the same preset
    assert resolve_config("configs/tiny.yaml", "train").samefile(PACKAGE_CONFIGS / "tiny.yaml")
    assert resolve_config("tiny", "experiment").samefile(PACKAGE_CONFIGS / "experiments/tiny.yaml")
    assert resolve_config("experiments/paper", "experiment").samefile(
        PACKAGE_CONFIGS / "experiments/paper.yaml"
    )
    assert resolve_config("fsdp", "accelerate").samefile(PACKAGE_CONFIGS / "accelerate/fsdp.yaml")


def test_a_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("method: neftune\n")
    assert resolve_config("tiny", "train") == Path("tiny")
    assert resolve_config(str(tmp_path / "tiny"), "experiment") == tmp_path / "tiny"


def test_unknown_names_list_the_presets_that_exist(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FishertuneError) as err:
        resolve_config("tinny", "train")
    message = str(err.value)
    assert message.startswith("tinny: no such file, and no train preset of that name")
    assert "paper/baseline" in message and "tiny" in message and "\n" not in message
    # a grid given to `train` says which command takes it
    with pytest.raises(FishertuneError, match="fishertune experiment --config paper"):
        resolve_config("paper", "train")
    assert preset_path("tiny-ablations", "train") is None
    assert preset_path("paper/../tiny") is None and preset_path("/etc/tiny") is None


def test_train_and_experiment_take_preset_names(tmp_path, monkeypatch, capsys) -> None:
    from fishertune.experiments.experiment_file import load_experiment
    from fishertune.training.cli import parse_args

    monkeypatch.chdir(tmp_path)
    _, training_args, model_args = parse_args(["--config", "tiny", "--max_steps", "3"])
    assert model_args.model_name_or_path == "builtin:tiny-llama"
    assert training_args.max_steps == 3 and training_args.learning_rate == 3e-3
    _, training_args, _ = parse_args(["--config", "paper/token-f", "--use_cpu", "true"])
    assert training_args.method == "token-f" and training_args.penalty_coef == 2e-6

    # the shipped grids name their presets by name, so they load outside a checkout
    grid = load_experiment("tiny")
    assert grid.base_config.samefile(PACKAGE_CONFIGS / "tiny.yaml")
    (tmp_path / "data/mt_bench").mkdir(parents=True)
    (tmp_path / "data/alpaca_eval.json").write_text("[]")
    (tmp_path / "data/mt_bench/question.jsonl").write_text("")
    paper = load_experiment("paper")
    assert paper.method_configs["logit-f"].samefile(PACKAGE_CONFIGS / "paper/logit-f.yaml")
    assert paper.accelerate_config.samefile(PACKAGE_CONFIGS / "accelerate/deepspeed_zero3.yaml")

    assert cli_main(["experiment", "--config", "tiny-ablations", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "token-f-no-warmup-seed0" in out and "tiny.yaml" in out
    assert cli_main(["train", "--config", "nope", "--max_steps", "1"]) == 2
    assert "train presets: paper/baseline" in capsys.readouterr().err


def test_a_grid_naming_an_unknown_preset_says_which_exist(tmp_path) -> None:
    from fishertune.experiments.experiment_file import load_experiment

    path = tmp_path / "grid.yaml"
    path.write_text("base_config: tinyy\noutput_dir: out\nmethods: {a: {}}\nseeds: [0]\n")
    with pytest.raises(FishertuneError, match=r"grid.yaml: base_config: tinyy not found .*tiny"):
        load_experiment(path)


def test_presets_command_lists_names_with_their_first_comment_line(capsys) -> None:
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in _on_disk():
        text = (PACKAGE_CONFIGS / f"{name}.yaml").read_text()
        first = next(line for line in text.splitlines() if line.startswith("#"))
        shown = name.removeprefix("experiments/")
        assert any(
            line.split()[0] == shown and line.endswith(first[1:].strip())
            for line in out.splitlines()
            if line.startswith("  ")
        ), name


def test_presets_path_is_a_file_accelerate_launch_takes(capsys) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    assert cli_main(["presets", "--path", "accelerate/fsdp"]) == 0
    path = capsys.readouterr().out.strip()
    assert Path(path).is_absolute()
    assert load_config_from_file(path).distributed_type.name == "FSDP"
    assert cli_main(["presets", "--show", "tiny"]) == 0
    assert capsys.readouterr().out == (PACKAGE_CONFIGS / "tiny.yaml").read_text()
    assert cli_main(["presets", "--path", "fdsp"]) == 2
    assert "accelerate/fsdp" in capsys.readouterr().err


def test_version_and_python_dash_m(tmp_path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    # one place for the version: __init__.py, which pyproject reads
    (line,) = [
        line
        for line in (REPO / "src/fishertune/__init__.py").read_text().splitlines()
        if line.startswith("__version__ = ")
    ]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" in pyproject["dynamic"] and "version" not in pyproject
    run = subprocess.run(
        [sys.executable, "-m", "fishertune", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert run.stdout.strip() == f"fishertune {line.split(chr(34))[1]}"
    usage = subprocess.run(
        [sys.executable, "-m", "fishertune"], capture_output=True, text=True, cwd=tmp_path
    )
    assert usage.returncode == 0
    lines = usage.stdout.splitlines()
    for name, (_, help_) in COMMANDS.items():
        assert sum(line.split()[:1] == [name] and help_ in line for line in lines) == 1, name
    assert "presets" in COMMANDS


def test_dependency_ranges_bound_transformers_and_trl() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    train = {d.split(">")[0].split("<")[0]: d for d in deps["optional-dependencies"]["train"]}
    assert "<" in train["transformers"] and "<" in train["trl"]
    assert deps["dependencies"] == ["torch>=2.11"]
    from importlib.metadata import version

    from packaging.requirements import Requirement

    # the installed, tested versions are inside the ranges
    for name in ("transformers", "trl"):
        assert Requirement(train[name]).specifier.contains(version(name)), name


def test_version_and_presets_answer_without_importing_torch(tmp_path) -> None:
    """`fishertune presets --path` runs inside `accelerate launch --config_file "$(...)"`: it
    must not pay for torch's import (seconds)."""
    code = (
        "import sys; from fishertune.cli import main; "
        "main(['--version']); main(['presets', '--path', 'accelerate/fsdp']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1].endswith("accelerate/fsdp.yaml")


def test_package_exports_resolve() -> None:
    import fishertune
    from fishertune.penalties import token_fisher

    assert fishertune.token_fisher is token_fisher
    for name in fishertune.__all__:
        assert getattr(fishertune, name) is not None, name
    with pytest.raises(AttributeError):
        _ = fishertune.no_such_name
