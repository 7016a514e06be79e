"""``fishertune demo``: the offline tiny preset, four methods side by side, on a CPU in minutes.

Trains baseline, NEFTune, token-F and logit-F from ``configs/tiny.yaml`` with the method settings
of ``configs/experiments/tiny.yaml`` (one seed), then prints final train CE, validation loss and
the curvature each model ends with: the token-F penalty ``R`` (the Fisher trace per response token)
measured on the validation split for every method alike.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from fishertune.errors import FishertuneError

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs" / "tiny.yaml"
GRID_CONFIG = REPO / "configs" / "experiments" / "tiny.yaml"
METHOD_ORDER = ("baseline", "neftune", "token-f", "logit-f")
VALIDATION_ROWS = 200


def method_overrides(grid_config: Path = GRID_CONFIG) -> dict[str, dict[str, Any]]:
    """Per-method overrides of the tiny grid (``methods:`` of the experiment YAML)."""
    from fishertune.experiments.grid import load_experiment

    if not grid_config.is_file():
        raise FishertuneError(f"{grid_config} not found: run the demo from a fishertune checkout")
    methods = load_experiment(grid_config).methods
    missing = [m for m in METHOD_ORDER if m not in methods]
    if missing:
        raise FishertuneError(f"{grid_config}: methods {missing} are missing")
    return {name: dict(methods[name]) for name in METHOD_ORDER}


@torch.no_grad()
def _validation_scores(model: Any, validation: Any, pad_token_id: int) -> dict[str, float]:
    """Validation CE and the token-F Fisher trace, both per response token, on the final model.

    ``validation`` is the tokenized split (``input_ids`` + ``assistant_masks``): labels are the
    assistant tokens only, as in training.
    """
    from fishertune.data.chat import collate_tokenized
    from fishertune.noise import EmbeddingCapture, find_input_embeddings
    from fishertune.penalties import label_mask_from_labels, token_fisher

    model.eval()
    device = next(model.parameters()).device
    capture = EmbeddingCapture()
    ce_sum = ce_count = fisher_sum = 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    rows = list(validation)[:VALIDATION_ROWS]
    with capture.attached(find_input_embeddings(model)):
        for start in range(0, len(rows), 16):
            batch = collate_tokenized(rows[start : start + 16], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.enable_grad():
                logits = model(**batch, use_cache=False).logits
                mask = label_mask_from_labels(labels)
                targets = labels[:, 1:][mask[:, :-1]]
                log_probs = torch.log_softmax(logits[mask].float(), -1)
                ce_sum += -log_probs.gather(1, targets[:, None]).sum().item()
                ce_count += mask.sum().item()
                fisher_sum += token_fisher(
                    capture.embeds,
                    logits,
                    mask,
                    reduction="sum",
                    generator=generator,
                    create_graph=False,
                ).item()
    return {"val_loss": ce_sum / max(ce_count, 1), "val_fisher": fisher_sum / max(ce_count, 1)}


def _last(log_history: list[dict[str, Any]], key: str) -> float:
    values = [entry[key] for entry in log_history if key in entry]
    return float(values[-1]) if values else math.nan


def run(output_dir: Path, max_steps: int | None, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    from transformers import set_seed

    from fishertune.data.chat import load_conversations, tokenize_dataset
    from fishertune.experiments.runner import override_flags
    from fishertune.training.cli import build_trainer, load_tokenizer, parse_args

    overrides = method_overrides()
    rows = []
    validation = None
    for method in methods:
        argv = ["--config", str(BASE_CONFIG), *override_flags(overrides[method])]
        argv += ["--output_dir", str(output_dir / method), "--overwrite_output_dir", "true"]
        argv += ["--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"]
        if max_steps is not None:
            argv += ["--max_steps", str(max_steps)]
        script_args, training_args, model_args = parse_args(argv)
        if validation is None:
            tokenizer = load_tokenizer(script_args, model_args)
            validation = tokenize_dataset(
                load_conversations(script_args.dataset_name, split="validation"),
                tokenizer,
                training_args.max_length,
            )
        set_seed(training_args.seed)
        start = time.time()
        trainer = build_trainer(script_args, training_args, model_args)
        trainer.train()
        seconds = time.time() - start
        history = trainer.state.log_history
        rows.append(
            {
                "method": method,
                "train_ce": _last(history, "ce_loss"),
                "train_penalty": _last(history, "penalty"),
                **_validation_scores(trainer.model, validation, tokenizer.pad_token_id),
                "seconds": seconds,
            }
        )
        print(
            f"[{method}] train CE {rows[-1]['train_ce']:.4f}  val loss {rows[-1]['val_loss']:.4f}"
            f"  val Tr(F)/token {rows[-1]['val_fisher']:.3f}  ({seconds:.0f} s)",
            flush=True,
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| method | final train CE | val loss | train penalty R | val Tr(F)/token | time (s) |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        penalty = "-" if math.isnan(row["train_penalty"]) else f"{row['train_penalty']:.3f}"
        lines.append(
            f"| {row['method']} | {row['train_ce']:.4f} | {row['val_loss']:.4f} | {penalty} | "
            f"{row['val_fisher']:.3f} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fishertune demo", description=__doc__)
    parser.add_argument("--output_dir", default="runs/demo", type=Path)
    parser.add_argument("--max_steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHOD_ORDER]
    if unknown:
        raise FishertuneError(f"unknown methods {unknown}; choose from {', '.join(METHOD_ORDER)}")
    start = time.time()
    rows = run(args.output_dir, args.max_steps, methods)
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {time.time() - start:.0f} s")
    return 0
