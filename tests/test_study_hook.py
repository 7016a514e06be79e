"""The study hook of the experiment runner: a study registered by name parses its own blocks,
has its data written by the launcher under the runner's lock before any run, and writes its
report beside the grid's, with no generic module knowing it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fishertune.errors import FishertuneError
from fishertune.experiments import cli as experiment_cli
from fishertune.experiments import study as study_hook
from fishertune.experiments.experiment_file import parse_experiment
from fishertune.experiments.fields import field_error, mapping
from fishertune.experiments.runner import run_experiment
from fishertune.locks import folder_lock_path, lock_holder
from test_experiments import FakeLauncher, write_yaml


@dataclass(frozen=True)
class CountData:
    out: Path
    rows: int

    @property
    def written(self) -> bool:
        return (self.out / "train.jsonl").is_file()


class CountStudy:
    """A study of its own: its data is ``rows`` copies of one chat row; its report counts the
    runs it was given and compares the count with the report's ``expect``."""

    def __init__(self) -> None:
        self.prepared: list[tuple[Path, bool, str | None]] = []

    def parse_block(
        self,
        path: Path,
        raw: Mapping[str, Any],
        *,
        output_dir: Path,
        report: Mapping[str, Any] | None,
    ) -> study_hook.StudyBlocks:
        data = None
        if raw.get("study_data") is not None:
            block = mapping(path, "study_data", raw["study_data"], ("out", "rows"))
            if not isinstance(block.get("rows"), int):
                raise field_error(path, "study_data.rows", "expected an integer")
            data = CountData(output_dir / block["out"], block["rows"])
        options = None
        if report is not None:
            options = dict(mapping(path, "report", report, ("expect",)))
        return study_hook.StudyBlocks(data=data, report=options)

    def prepare_data(
        self, config: Any, log: Callable[[str], None], *, dry_run: bool = False
    ) -> bool:
        data = config.study_data
        holder = lock_holder(folder_lock_path(config.output_dir))
        self.prepared.append((data.out, dry_run, holder))
        if dry_run or data.written:
            return False
        data.out.mkdir(parents=True)
        row = {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        }
        (data.out / "train.jsonl").write_text((json.dumps(row) + "\n") * data.rows)
        return True

    def write_report(
        self,
        runs_dir: Path,
        names: Sequence[str],
        out_dir: Path,
        *,
        title: str,
        options: Mapping[str, Any],
    ) -> dict[str, Path]:
        out = out_dir / "count.json"
        out.write_text(json.dumps({"title": title, "runs": list(names), **options}))
        return {"count": out}


COUNT = CountStudy()


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> CountStudy:
    monkeypatch.setitem(study_hook.STUDIES, "count", f"{__name__}:COUNT")
    COUNT.prepared.clear()
    return COUNT


def grid(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    base = write_yaml(
        tmp_path / "base.yaml",
        {"method": "baseline", "max_steps": 2, "dataset_name": "builtin:tiny-tasks"},
    )
    return {
        "base_config": str(base),
        "output_dir": str(tmp_path / "out"),
        "study_data": {"out": "rows", "rows": 3},
        "overrides": {"dataset_name": "{study_data}"},
        "methods": {"baseline": {"method": "baseline"}},
        "seeds": [0, 1],
        "evaluation": {"tasks": ["offline"], "limit": 4},
        "report": {"study": "count", "expect": 2},
        **changes,
    }


def test_a_registered_study_prepares_its_data_and_writes_its_report(
    tmp_path: Path, registered: CountStudy
) -> None:
    raw = grid(tmp_path)
    path = write_yaml(tmp_path / "e.yaml", raw)
    config = parse_experiment(raw, path)
    data = tmp_path / "out" / "rows"
    assert config.study == "count" and config.report_options == {"expect": 2}
    assert config.study_data == CountData(data, 3)
    assert config.overrides["dataset_name"] == str(data)
    results = run_experiment(config, launcher=FakeLauncher(), log=lambda _: None)
    assert [r.status for r in results] == ["completed", "completed"]
    # written once, under the runner's lock, before the runs
    assert len(registered.prepared) == 1
    out, dry_run, holder = registered.prepared[0]
    assert out == data and not dry_run and holder is not None
    assert len((data / "train.jsonl").read_text().splitlines()) == 3
    assert experiment_cli.main(["--config", str(path), "--report_only"]) == 0
    report = json.loads((tmp_path / "out" / "report" / "count.json").read_text())
    assert report == {"title": "e", "runs": ["baseline-seed0", "baseline-seed1"], "expect": 2}


def test_the_study_named_by_the_data_block_alone_writes_no_report(
    tmp_path: Path, registered: CountStudy
) -> None:
    raw = grid(tmp_path, report={"metrics": ["offline/val_loss"]})
    raw["study_data"] = {"study": "count", "out": "rows", "rows": 2}
    config = parse_experiment(raw, tmp_path / "e.yaml")
    assert config.study == "count" and config.report_options is None
    assert config.study_data == CountData(tmp_path / "out" / "rows", 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"report": {"study": "nope"}}, r"report\.study: 'nope' is not one of .*count"),
        ({"report": {"expect": 2}, "study_data": None, "overrides": {}}, r"report: unknown key"),
        ({"report": {}}, r"study_data\.study: missing"),
        (
            {"study_data": {"study": "equivalence", "out": "rows", "rows": 3}},
            r"study_data\.study: 'equivalence' differs from report\.study 'count'",
        ),
        ({"study_data": {"out": "rows", "rows": "x"}}, r"study_data\.rows: expected an integer"),
    ],
)
def test_study_blocks_name_the_field(
    tmp_path: Path, registered: CountStudy, change: dict[str, Any], message: str
) -> None:
    raw = grid(tmp_path, **change)
    with pytest.raises(FishertuneError, match=message):
        parse_experiment(raw, tmp_path / "e.yaml")


def test_a_dry_run_only_asks_the_study(tmp_path: Path, registered: CountStudy) -> None:
    raw = grid(tmp_path)
    config = parse_experiment(raw, tmp_path / "e.yaml")
    run_experiment(config, launcher=FakeLauncher(), dry_run=True, log=lambda _: None)
    assert [(out, dry) for out, dry, _ in registered.prepared] == [
        (tmp_path / "out" / "rows", True)
    ]
    assert not (tmp_path / "out").exists()
