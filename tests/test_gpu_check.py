"""``benchmarks/gpu_check.py``: the CPU ``--quick`` run takes every code path of the GPU run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402
import gpu_check_measure  # noqa: E402
import gpu_check_training  # noqa: E402
from harness import largest_batch  # noqa: E402


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    raise AssertionError(f"{path}: unexpected {type(value)}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, output


def test_quick_run_passes_and_reports_every_check(quick_run: Any) -> None:
    done, output = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((output / "gpu_check.json").read_text())
    assert report["ok"] is True
    assert list(report["checks"]) == list(gpu_check.CHECKS)
    for name, check in report["checks"].items():
        assert check["ok"] is True and check["error"] is None and not check["skipped"], name
        assert check["wall_s"] > 0
    nonfinite = [(p, x) for p, x in _numbers(report) if not math.isfinite(x)]
    assert not nonfinite
    # the Markdown is written and printed
    markdown = (output / "gpu_check.md").read_text()
    assert markdown.strip() in done.stdout
    headings = ("## Overhead", "## Fused CE", "## fd vs exact", "## Training through")
    for heading in (*headings, "## Environment"):
        assert heading in markdown


def test_quick_run_overhead_rows(quick_run: Any) -> None:
    _, output = quick_run
    result = json.loads((output / "gpu_check.json").read_text())["checks"]["overhead"]["result"]
    batch = result["batch_size"]
    assert next(p["batch"] for p in result["search"]) == 1
    # --quick simulates out-of-memory for exact above batch 1: they fall back to batch 1, and the
    # baseline is measured again there
    assert batch == 2
    rows = {(row["label"], row["batch_size"]): row for row in result["rows"]}
    exact = {label for label, _, _ in gpu_check_measure.TIMED if "exact" in label}
    expected = {(label, 1 if label in exact else 2) for label, _, _ in gpu_check_measure.TIMED}
    assert set(rows) == expected | {("baseline", 1)}
    seq = result["seq_len"]
    for (label, size), row in rows.items():
        assert row["attention"] == ("eager" if "exact" in label else "sdpa")
        assert row["oom_at"] == ([2] if label in exact else [])
        assert row["timed_steps"] == gpu_check.PROFILES["quick"]["steps"]
        assert 0 < row["fwd_bwd_s"] <= row["step_s"]
        assert row["tokens_per_s"] == pytest.approx(size * seq / row["step_s"])
        base = rows[("baseline", size)]
        assert row["step_x"] == pytest.approx(row["step_s"] / base["step_s"])
        assert row["peak_x"] == pytest.approx(row["peak_gb"] / base["peak_gb"])
        # against the best baseline at the same batch: the fastest's step, the lightest's peak
        same = [r for (b, s), r in rows.items() if s == size and b in gpu_check_measure.BASELINES]
        fastest = min(r["step_s"] for r in same)
        assert row["step_x_best"] == pytest.approx(row["step_s"] / fastest)
        assert row["peak_x_best"] == pytest.approx(row["peak_gb"] / min(r["peak_gb"] for r in same))
    assert rows[("baseline", 2)]["step_x"] == pytest.approx(1.0)
    assert {f["name"].split(":")[0] for f in result["floors"]} == {"token-F fd", "logit-F fd"}
    assert result["floors_enforced"] is False


def test_quick_run_fused_ce_rows(quick_run: Any) -> None:
    import fused_ce
    import torch

    _, output = quick_run
    result = json.loads((output / "gpu_check.json").read_text())["checks"]["fused_ce"]["result"]
    assert result["shape"] == gpu_check.PROFILES["quick"]["fused_ce"]
    rows = {row["kernel"]: row for row in result["kernels"]}
    measured = [fused_ce.DENSE, fused_ce.FISHERTUNE]
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        measured.append(fused_ce.TORCH_REFERENCE)
    for name in measured:
        row = rows[name]
        assert row["seconds"] > 0 and "note" not in row, row
        assert row["x_dense"] == pytest.approx(row["seconds"] / rows[fused_ce.DENSE]["seconds"])
        ours = rows[fused_ce.FISHERTUNE]["seconds"]
        assert row["x_fishertune"] == pytest.approx(row["seconds"] / ours)
        assert row["peak_mb"] is None  # CUDA only
    # never dropped: listed with why it is not measured on this machine
    assert rows[fused_ce.LIGER]["seconds"] is None
    assert rows[fused_ce.LIGER]["note"] in ("not installed", "needs CUDA")
    dense = rows[fused_ce.DENSE]["loss"]
    assert rows[fused_ce.FISHERTUNE]["loss"] == pytest.approx(dense, rel=1e-5)
    markdown = (output / "gpu_check.md").read_text()
    section = markdown.split("## Fused CE")[1].split("\n## ")[0]
    assert "| kernel | s | x dense | x fishertune | peak MB | loss |" in section
    for name in (*measured, fused_ce.LIGER):
        assert f"| {name} |" in section
    assert f"| {rows[fused_ce.LIGER]['note']} |" in section


def test_fused_ce_fails_on_a_wrong_loss_not_on_a_faster_kernel(monkeypatch: Any) -> None:
    import fused_ce

    def rows(ours: float) -> list[dict[str, Any]]:
        return [
            {"kernel": fused_ce.DENSE, "seconds": 2.0, "loss": 100.0},
            {"kernel": fused_ce.FISHERTUNE, "seconds": 1.5, "loss": ours},
            {"kernel": fused_ce.LIGER, "seconds": 1.0, "loss": 100.0},  # faster: reported only
        ]

    options = {"device": "cuda", "fused_ce": gpu_check.PROFILES["full"]["fused_ce"]}
    budget = gpu_check_measure.Budget(60)
    # bf16: relative 1e-2; a non-finite loss is a wrong kernel too
    for ours, ok in ((100.5, True), (102.0, False), (float("nan"), False), (float("inf"), False)):
        monkeypatch.setattr(gpu_check_measure, "run_worker", lambda *a, o=ours: [rows(o)])
        result = gpu_check_measure.check_fused_ce(options, budget)
        assert result["ok"] is ok and (result["error"] is None) is ok


def test_each_penalty_is_held_to_its_best_fd_path_against_the_best_baselines() -> None:
    def row(label, step_x, peak_x):
        return {"label": label, "step_x_best": step_x, "peak_x_best": peak_x}

    rows = [
        row("token-F fd, chunked CE", 2.1, 1.2),  # meets the time, not the memory
        row("token-F fd", 2.0, 0.9),  # meets both
        row("logit-F fd", 2.5, 1.0),
        row("logit-F fd, chunked CE", 2.4, 1.3),
    ]
    floors = {f["name"].split(":")[0]: f for f in gpu_check_measure.best_baseline_floors(rows)}
    assert floors["token-F"]["ok"] and "token-F fd vs" in floors["token-F"]["name"]
    assert floors["token-F"]["value"] == pytest.approx(2.0 / 2.2)
    assert not floors["logit-F"]["ok"]
    assert floors["logit-F"]["value"] == pytest.approx(2.5 / 2.2)  # the chunked path, nearer


def test_overhead_report_reads_each_fd_path_against_the_best_and_its_own_baseline() -> None:
    import overhead

    def row(step: float, peak: float) -> dict[str, float]:
        return {"step_s": step, "min_s": step, "peak_mb": peak, "step_mb": peak / 2}

    timings = {
        "baseline": row(1.0, 100.0),  # the default kernel: fastest and lightest
        "baseline, chunked CE": row(1.2, 150.0),
        "baseline, dense CE": row(1.5, 160.0),
        "token-F fd": row(2.1, 104.0),
        "token-F fd, chunked CE": row(2.64, 165.0),
    }
    report = overhead.format_report({"device": "cpu", "model_size": "vocab"}, timings, {}, [])
    goals = report.split("Goals against the best baseline:")[1].split("Floors:")[0]
    assert "token-F fd: step 2.10x the fastest baseline (<= 2.2x), peak 1.04x" in goals
    assert goals.count(": ok") == 1  # the chunked path: 2.64x, 1.65x
    assert "token-F fd, chunked CE: median step 2.20x its baseline" in report


def test_quick_run_accuracy_and_training(quick_run: Any) -> None:
    _, output = quick_run
    checks = json.loads((output / "gpu_check.json").read_text())["checks"]
    accuracy = checks["accuracy"]["result"]
    variants = {(r["kind"], r["dtype"], r["scheme"], r["fd_step"]) for r in accuracy["rows"]}
    assert variants == {
        ("token-f", "fp32", "forward", None),
        ("token-f", "fp32", "central", None),
        ("token-f", "fp32", "central", 3e-4),
        ("token-f", "bf16", "forward", None),
        ("token-f", "bf16", "central", None),
    }
    for row in accuracy["rows"]:
        assert row["fd_attention"] == "sdpa"
        assert -1.0 <= row["cosine"] <= 1.0 + 1e-9
        assert row["draw_noise"] > 0
    fp32 = [r for r in accuracy["rows"] if r["dtype"] == "fp32"]
    # exact float32 gradients are the reference of their own dtype: the two distances agree
    for row in fp32:
        assert row["rel_error"] == pytest.approx(row["rel_error_vs_fp32_exact"])
        assert row["exact_vs_fp32_exact"] == 0.0
    assert len(accuracy["criteria"]) == 3
    runs = {run["name"]: run for run in checks["training"]["result"]["runs"]}
    profile = gpu_check.PROFILES["quick"]
    assert set(runs) == {f"tiny {name}" for name in profile["tiny_runs"]} | {
        f"micro fd + checkpointing, seq {profile['long_seq_len']}"
    }
    for run in runs.values():
        assert run["ok"] and run["returncode"] == 0 and run["status"] == "completed"
        assert run["global_step"] == run["steps"]
        assert math.isfinite(run["final_loss"]) and math.isfinite(run["final_penalty"])
    long = runs[f"micro fd + checkpointing, seq {profile['long_seq_len']}"]
    assert "--activation_checkpointing true" in long["command"]
    assert "--penalty_grad fd" in long["command"]
    # every row truncated to the sequence length: the run really trained at that length
    assert long["num_tokens"] == profile["long_steps"] * profile["long_seq_len"]


def test_largest_batch_doubles_then_bisects() -> None:
    for limit in (0, 1, 2, 5, 8, 13, 64, 100):
        tried: list[int] = []

        def fits(batch: int, limit: int = limit, tried: list[int] = tried) -> bool:
            tried.append(batch)
            return batch <= limit

        assert largest_batch(fits, cap=64) == min(limit, 64)
        assert len(tried) <= 14  # log2 steps, not a linear scan
    assert largest_batch(lambda b: True, cap=6) == 6


def test_failed_run_is_not_reported_as_passing(tmp_path: Path) -> None:
    """A run whose logged loss went NaN, or that stopped early, fails the training check."""
    output = tmp_path / "run"
    output.mkdir()
    (output / "fishertune_run.json").write_text(
        json.dumps({"status": "completed", "global_step": 2})
    )
    history = [{"loss": 1.0, "step": 1}, {"loss": float("nan"), "step": 2}]
    (output / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.0, float("inf")])}, str(output / "model.safetensors"))
    found = gpu_check_training.inspect_run(output, steps=3)
    assert "2 steps of 3" in found["error"]
    assert "not all finite" in found["error"]
    assert "non-finite saved weights: w" in found["error"]


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_missing_device_fails_and_skips_the_rest(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False
    assert "CUDA is not available" in report["checks"]["environment"]["error"]
    for name in ("overhead", "fused_ce", "accuracy", "training"):
        assert report["checks"][name]["skipped"] and not report["checks"][name]["ok"]
    assert "FAILED" in done.stdout
