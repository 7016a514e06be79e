"""``fishertune analyze``'s options: the parser (the one declaration of each option, which the
experiment runner's ``measure:`` block is checked by too) and the checks made before anything
is loaded."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from fishertune.errors import FishertuneError
from fishertune.modeling import TINY_MODEL

__all__ = [
    "DTYPES",
    "SIZE_MINIMUMS",
    "build_parser",
    "check_arguments",
    "parse_alphas",
    "parse_splits",
]

DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
# the least each size can be: an error bar needs two probes, draws or noise pairs
SIZE_MINIMUMS = {"batches": 1, "batch_size": 1, "probes": 2, "noise_samples": 2, "max_length": 2,
                 "fisher_draws": 2}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one-line :class:`FishertuneError` s (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise FishertuneError(f"analyze: {message}")


def parse_alphas(text: str) -> list[float]:
    """``"1,5,10"`` -> ``[1.0, 5.0, 10.0]``; each alpha must be a finite number >= 0."""
    alphas = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(item)
        except ValueError:
            raise FishertuneError(
                f"--alphas: expected comma-separated numbers like 1,5,10,15, got {text!r} "
                f"({item!r} is not a number)"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise FishertuneError(f"--alphas: each alpha must be a finite number >= 0, got {item}")
        alphas.append(value)
    if len(set(alphas)) != len(alphas):
        raise FishertuneError(f"--alphas: repeated value in {text!r}")
    return alphas


def parse_splits(text: str) -> list[str]:
    """``"validation,train"`` -> ``["validation", "train"]``: at least one name, none twice."""
    splits = [name.strip() for name in text.split(",") if name.strip()]
    if not splits:
        raise argparse.ArgumentTypeError(f"no split named in {text!r}")
    if len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"repeated split in {text!r}")
    return splits


def _split_list(text: str) -> str:
    """An argparse type: a comma list of split names (:func:`parse_splits`), kept as given."""
    parse_splits(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fishertune analyze``."""
    parser = _Parser(
        prog="fishertune analyze",
        description="Measure NEFTune's loss increase against its curvature prediction "
        "(a^2/6) Tr(H_X), and Tr(F_X), on a causal LM and a chat data set.",
    )
    _add_inputs(parser)
    _add_sizes(parser)
    _add_noise(parser)
    _add_model_loading(parser)
    _add_outputs(parser)
    return parser


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """What is measured: the model, the conversations and their tokenizer."""
    add = parser.add_argument
    add(
        "--model",
        required=True,
        help=f"saved model folder, LoRA run folder (base + adapter), hub name, or {TINY_MODEL} "
        "(random tiny Llama, shipped tokenizer)",
    )
    add(
        "--data",
        required=True,
        help="builtin:tiny-tasks, a .jsonl/.json/.parquet file, a folder or a hub name "
        "(messages, ShareGPT, Alpaca, prompt/completion or text rows)",
    )
    from fishertune.data.options import add_data_arguments

    add_data_arguments(add)
    add(
        "--split",
        type=_split_list,
        default="train",
        help="data split (default: train); several, comma-separated (validation,train), are "
        "measured into --record",
    )
    add("--tokenizer", default=None, help="tokenizer (default: the model's)")


def _add_sizes(parser: argparse.ArgumentParser) -> None:
    """How much is measured: alphas, batches, probes, draws, noise pairs, truncation."""
    add = parser.add_argument
    add("--alphas", default="1,5,10,15", help="comma-separated NEFTune alphas (default: 1,5,10,15)")
    add("--batches", type=int, default=8, help="batches to measure (default: 8)")
    add("--batch_size", type=int, default=4, help="sequences per batch (default: 4)")
    add(
        "--probes",
        type=int,
        default=16,
        help="Rademacher probes (Hessian-vector products) per batch (default: 16)",
    )
    add(
        "--fisher_draws",
        type=int,
        default=None,
        help="token-F draws y' ~ p per batch for Tr(F_X) (default: --probes)",
    )
    add(
        "--noise_samples",
        type=int,
        default=16,
        help="antithetic noise pairs per batch and alpha (default: 16)",
    )
    add("--max_length", type=int, default=512, help="truncation length (default: 512)")


def _add_noise(parser: argparse.ArgumentParser) -> None:
    """NEFTune's length convention and noise distribution, and the seed of every draw."""
    add = parser.add_argument
    add(
        "--length_mode",
        choices=("per_sequence", "padded"),
        default="per_sequence",
        help="NEFTune's L: each sequence's real length (NEFTune's code, default) or the padded "
        "batch length (transformers/TRL)",
    )
    add(
        "--noise",
        choices=("uniform", "gaussian"),
        default="uniform",
        help="noise distribution (gaussian: same variance as NEFTune's uniform)",
    )
    add("--seed", type=int, default=0, help="seeds data order, noise, probes and draws")


def _add_model_loading(parser: argparse.ArgumentParser) -> None:
    """Where and how the model is loaded."""
    add = parser.add_argument
    add("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    add(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="model dtype (default auto: bfloat16 on a GPU, float32 on the CPU)",
    )
    add(
        "--attn_implementation",
        choices=("eager", "sdpa"),
        default="eager",
        help="attention kernel; it must support double backward (default: eager; sdpa is "
        "forced to its math kernel)",
    )
    add(
        "--merge_adapter",
        action="store_true",
        help="LoRA run folder: merge the adapter into its base before measuring",
    )
    add("--revision", default=None, help="hub revision of the model")
    add("--trust_remote_code", action="store_true", help="allow a hub model's own code to run")


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    """What is reported besides the measurement, and where."""
    add = parser.add_argument
    add(
        "--target_noise_ratio",
        type=float,
        default=None,
        metavar="R",
        help="also print the alpha that puts NEFTune's noise at a/rms = R on this model and data "
        "(a = alpha / sqrt(L d), L the median length, rms the embeddings' rms), and its "
        "matched coefficient alpha^2 / (6 L d); the Taylor relation holds for R well below 1",
    )
    add(
        "--output",
        default=None,
        help="output folder of the tables and the plot (default: ./analysis; with --record: "
        "none unless given)",
    )
    add(
        "--record",
        default=None,
        metavar="FILE",
        help="also write the curvature record (loss, Tr(F_X), Tr(H_X), their gap, rms, lengths; "
        "the experiment runner's curvature.json) of the final model on each --split, and of "
        "its checkpoints with --checkpoints, to FILE",
    )
    add(
        "--checkpoints",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="with --record: also measure each complete checkpoint-N of --model on the first "
        "split (the curvature trajectory; default: the final model only)",
    )
    add("--no_progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> tuple[list[float], list[str]]:
    """The checks made before anything is loaded (sizes, alphas, splits, the target ratio,
    what needs ``--record``); returns the alphas and the splits.

    Raises:
        FishertuneError: one line naming the option.
    """
    alphas = parse_alphas(args.alphas)
    _check_sizes(args)
    splits = parse_splits(args.split)
    if args.record is None and (len(splits) > 1 or args.checkpoints):
        what = "--checkpoints" if args.checkpoints else f"--split {args.split}"
        raise FishertuneError(f"{what}: measured only into a record; give --record FILE")
    ratio = args.target_noise_ratio
    if ratio is not None and (not math.isfinite(ratio) or ratio <= 0):
        raise FishertuneError(f"--target_noise_ratio must be a positive number, got {ratio}")
    return alphas, splits


def _check_sizes(args: argparse.Namespace) -> None:
    for name, low in SIZE_MINIMUMS.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise FishertuneError(f"--{name} must be >= {low}, got {value}")
