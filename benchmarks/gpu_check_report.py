"""``gpu_check.py``'s Markdown report: the check summary, then one table per check."""

from __future__ import annotations

from typing import Any

from fused_ce import table


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The Markdown: check summary, then one table per check."""
    checks = report["checks"]
    env = checks.get("environment", {}).get("result", {})
    options = report["options"]
    lines = ["# fishertune GPU check", ""]
    device = env.get("gpu") or options["device"]
    lines.append(
        f"{device}; torch {env.get('torch', '?')} (CUDA {env.get('cuda_runtime') or '-'}); "
        f"{'quick' if options['quick'] else 'full'} run, {report['wall_s']:.0f} s; "
        f"{'all checks passed' if report['ok'] else 'FAILED'}"
    )
    lines += ["", "| check | result | time (s) | problem |", "|---|---|---:|---|"]
    for name, check in checks.items():
        problem = (check["error"] or "").replace("\n", " ").replace("|", "/")[:300]
        status = "ok" if check["ok"] else "FAILED"
        lines.append(f"| {name} | {status} | {check['wall_s']:.0f} | {problem} |")
    overhead = checks.get("overhead", {}).get("result", {})
    if overhead.get("rows"):
        lines += _overhead_lines(overhead)
    fused = checks.get("fused_ce", {}).get("result", {})
    if fused.get("kernels"):
        lines += _fused_ce_lines(fused)
    accuracy = checks.get("accuracy", {}).get("result", {})
    if accuracy.get("rows"):
        lines += _accuracy_lines(accuracy)
    training = checks.get("training", {}).get("result", {})
    if training.get("runs"):
        lines += _training_lines(training)
    if env:
        lines += _environment_lines(env)
    return "\n".join(lines) + "\n"


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    """The overhead table (one row per method and batch) and the floors."""
    lines = [
        "",
        f"## Overhead: {overhead['model_size']} shape, sequence {overhead['seq_len']}, "
        f"{overhead['dtype']}, largest baseline batch {overhead['batch_size']}",
        "",
        "| method | attention | batch | step (s) | x baseline | x fastest baseline "
        "| fwd+bwd (s), median | x | min, x | peak (GB) | x | x lightest baseline "
        "| above set-up (GB) | x | tokens/s | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in overhead["rows"]:
        note = row.get("error", "")
        if row.get("oom_at"):
            note = f"out of memory at batch {row['oom_at']} {note}"
        lines.append(
            f"| {row['label']} | {row['attention']} | {_fmt(row.get('batch_size'))} "
            f"| {_fmt(row.get('step_s'))} | {_fmt(row.get('step_x'), '.2f')} "
            f"| {_fmt(row.get('step_x_best'), '.2f')} "
            f"| {_fmt(row.get('fwd_bwd_s'))} | {_fmt(row.get('fwd_bwd_x'), '.2f')} "
            f"| {_fmt(row.get('min_fwd_bwd_x'), '.2f')} "
            f"| {_fmt(row.get('peak_gb'), '.2f')} | {_fmt(row.get('peak_x'), '.2f')} "
            f"| {_fmt(row.get('peak_x_best'), '.2f')} "
            f"| {_fmt(row.get('above_setup_gb'), '.2f')} "
            f"| {_fmt(row.get('above_setup_x'), '.2f')} "
            f"| {_fmt(row.get('tokens_per_s'), '.0f')} "
            f"| {note.splitlines()[0][:200] if note else ''} |"
        )
    enforced = "" if overhead.get("floors_enforced") else " (reported, not enforced: --quick)"
    if overhead.get("floors"):
        lines += ["", f"Floors{enforced}:"]
        lines += [
            f"- {f['name']} {f['value']:.2f}x <= {f['floor']}x: {'ok' if f['ok'] else 'MISSED'}"
            for f in overhead["floors"]
        ]
    return lines


def _fused_ce_lines(fused: dict[str, Any]) -> list[str]:
    """``fused_ce.py``'s table: a row a kernel, those not measured here with why."""
    shape = fused["shape"]
    autocast = "bf16 autocast, float32 weights" if shape["dtype"] == "bf16" else "float32"
    return [
        "",
        f"## Fused CE: {shape['rows']} positions, hidden {shape['hidden']}, vocab "
        f"{shape['vocab']}, {autocast}, {fused['device']}, best of {shape['repeats']}",
        "",
        *table(fused["kernels"]),
    ]


def _accuracy_lines(accuracy: dict[str, Any]) -> list[str]:
    """The fd vs exact table (one row per kind, dtype, scheme and step) and the criteria."""
    lines = [
        "",
        f"## fd vs exact penalty gradients: {accuracy['model_size']} shape, sequence "
        f"{accuracy['seq_len']}, batch {accuracy['batch_size']} (fd through SDPA)",
        "",
        "| penalty | dtype | fd scheme | h_rel | cosine | rel. error vs exact (same dtype) "
        "| vs exact fp32 | exact vs exact fp32 | exact, other draw |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in accuracy["rows"]:
        lines.append(
            f"| {row['kind']} | {row['dtype']} | {row['scheme']} "
            f"| {row['fd_step'] or 'default'} | {row['cosine']:.6f} "
            f"| {row['rel_error']:.2e} | {row['rel_error_vs_fp32_exact']:.2e} "
            f"| {row['exact_vs_fp32_exact']:.2e} | {row['draw_noise']:.2e} |"
        )
    enforced = "" if accuracy.get("criteria_enforced") else " (reported, not enforced: --quick)"
    lines += ["", f"Criteria{enforced}:"]
    lines += [
        f"- {c['name']}: {c['value']:.2e} vs {c['bound']:.2e}: {'ok' if c['ok'] else 'MISSED'}"
        for c in accuracy["criteria"]
    ]
    return lines


def _training_lines(training: dict[str, Any]) -> list[str]:
    """One row per ``fishertune train`` run."""
    lines = [
        "",
        "## Training through `fishertune train`",
        "",
        "| run | steps | final loss | final CE | final penalty | tokens | wall (s) | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in training["runs"]:
        result = "ok" if run["ok"] else run["error"].splitlines()[0][:200].replace("|", "/")
        lines.append(
            f"| {run['name']} | {_fmt(run.get('global_step'))}/{run['steps']} "
            f"| {_fmt(run.get('final_loss'), '.4f')} | {_fmt(run.get('final_ce_loss'), '.4f')} "
            f"| {_fmt(run.get('final_penalty'), '.4g')} | {_fmt(run.get('num_tokens'), '.0f')} "
            f"| {_fmt(run.get('wall_s'), '.0f')} | {result} |"
        )
    return lines


def _environment_lines(env: dict[str, Any]) -> list[str]:
    """The environment worker's findings, one row per item."""
    lines = ["", "## Environment", "", "| item | value |", "|---|---|"]
    for key, value in env.items():
        if key in ("packages", "sdpa_backends"):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"| {key} | {_fmt(value)} |")
    return lines
