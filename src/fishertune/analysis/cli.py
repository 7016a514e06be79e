"""``fishertune analyze``: measure the noise-curvature relation of NEFTune on a model and data.

Examples::

    # the tiny preset, after `fishertune train --config tiny --output_dir runs/tiny`
    fishertune analyze --model runs/tiny --data builtin:tiny-tasks --max_length 128 \\
        --alphas 0.25,0.5,1,5,10,15 --output runs/tiny/analysis
    # any transformers causal LM (bf16 on a GPU, float32 on the CPU)
    fishertune analyze --model meta-llama/Llama-3.1-8B \\
        --data allenai/tulu-3-sft-olmo-2-mixture-0225 --batches 8 --batch_size 2 \\
        --max_length 1024 --probes 32

Per batch and aggregated over batches (``± 1.96 SE``), it reports the CE loss, the measured NEFTune
loss increase ``E_eps[loss(X + eps)] - loss(X)`` at each alpha, the second-order prediction
``(a^2 / 6) Tr(H_X)`` (Hutchinson), ``Tr(F_X)`` (token-F), the Gauss-Newton gap and the
NEFTune-equivalent coefficient ``alpha^2 / (6 L d)`` at the data's median length ``L``. See
:mod:`fishertune.analysis.measure` for the formulas.

Writes ``analysis.json``, ``analysis.csv``, ``analysis.png`` and ``analysis.txt`` (the table that
is also printed) into ``--output``.

``--record FILE`` also writes the curvature record of :mod:`fishertune.analysis.record` (the
experiment runner's ``curvature.json``): the curvature terms of the final model on each split of
``--split a,b`` and, with ``--checkpoints``, of each complete ``checkpoint-N`` of ``--model`` on
the first split; the tables go to ``--output`` only when it is given::

    fishertune analyze --model runs/x/model --data builtin:tiny-tasks --split validation,train \
        --checkpoints --record runs/x/curvature.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from fishertune.errors import FishertuneError
from fishertune.modeling import TINY_MODEL, check_model_source

__all__ = [
    "SIZE_MINIMUMS",
    "build_parser",
    "check_arguments",
    "main",
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


def _torch_dtype(name: str, device: Any) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_for_analysis(
    model: str,
    tokenizer: str | None,
    *,
    device: Any,
    dtype: Any,
    attn_implementation: str,
    merge_adapter: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """The model (eval mode, on ``device`` in ``dtype``) and its tokenizer with a chat template,
    through :func:`fishertune.modeling.load_model_and_tokenizer` (a LoRA run folder loads its
    base with the adapter). :data:`TINY_MODEL` is the tiny preset's architecture, random.

    Raises:
        FishertuneError: a local path that is not a saved model folder, or a model or tokenizer
            that cannot be loaded.
    """
    from fishertune.modeling import load_model_and_tokenizer as load

    try:
        lm, tok = load(
            model,
            tokenizer,
            dtype=dtype,
            attn_implementation=attn_implementation,
            revision=revision,
            trust_remote_code=trust_remote_code,
            merge_adapter=merge_adapter,
            # the tiny preset's architecture (configs/tiny.yaml)
            tiny_sizes={"hidden_size": 128, "num_layers": 2, "num_heads": 4},
        )
    except FishertuneError as err:
        raise _as_option_error(err) from err
    return lm.to(device).eval(), tok


def _as_option_error(err: FishertuneError) -> FishertuneError:
    """``model X: ...`` becomes ``--model X: ...``, naming the option it came from."""
    text = str(err)
    return FishertuneError(f"--{text}" if text.startswith(("model ", "tokenizer ")) else text)


def _target(result: Any, ratio: float) -> dict[str, float]:
    """The alpha with ``a / rms = ratio`` at the measured rms, median length ``L`` (rounded, as
    the alphas' summaries use) and hidden size ``d``, and its matched coefficient."""
    from fishertune.schedules import alpha_for_noise_ratio, neftune_equivalent_coef

    length = int(result.extra["typical_length"])
    alpha = alpha_for_noise_ratio(ratio, result.embedding_rms, length, result.hidden_size)
    return {
        "ratio": ratio,
        "alpha": alpha,
        "scale": ratio * result.embedding_rms,
        "embedding_rms": result.embedding_rms,
        "length": length,
        "hidden_size": result.hidden_size,
        "lambda_equiv": neftune_equivalent_coef(alpha, length, result.hidden_size),
    }


def _target_line(target: dict[str, float]) -> str:
    return (
        f"target a/rms = {target['ratio']:g}: alpha = {target['alpha']:.4g} "
        f"(a = alpha / sqrt(L d) = {target['scale']:.3e}, rms(X) = {target['embedding_rms']:.3e}, "
        f"L = {target['length']}, d = {target['hidden_size']}); matched coefficient "
        f"lambda_eq = alpha^2 / (6 L d) = {target['lambda_equiv']:.4g}"
    )


def _load(
    args: argparse.Namespace, model: str, tokenizer: str | None, device: Any, dtype: Any
) -> tuple[Any, Any]:
    """``model`` (and ``tokenizer``) loaded as the command's loading options say."""
    return load_for_analysis(
        model,
        tokenizer,
        device=device,
        dtype=dtype,
        attn_implementation=args.attn_implementation,
        merge_adapter=args.merge_adapter,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )


def _measure(
    args: argparse.Namespace,
    alphas: list[float],
    model: Any,
    tokenizer: Any,
    data: Any,
    *,
    model_name: str,
    split: str,
    device: Any,
) -> Any:
    """:func:`fishertune.analysis.measure.analyze` with the command's sizes and noise settings
    on ``data`` (conversations or tokenized rows), its settings recorded with the result."""
    from fishertune.analysis.measure import analyze

    return analyze(
        model,
        tokenizer,
        data,
        alphas=alphas,
        batches=args.batches,
        batch_size=args.batch_size,
        probes=args.probes,
        noise_samples=args.noise_samples,
        seed=args.seed,
        max_length=args.max_length,
        fisher_draws=args.fisher_draws,
        length_mode=args.length_mode,
        noise_distribution=args.noise,
        show_progress=not args.no_progress,
        config={
            "model": model_name,
            "data": args.data,
            "split": split,
            "device": str(device),
            "attn_implementation": args.attn_implementation,
        },
    )


def _write_record(
    args: argparse.Namespace,
    alphas: list[float],
    conversations: dict[str, Any],
    *,
    device: Any,
    dtype: Any,
) -> Any:
    """Measure the final model on every split and, with ``--checkpoints``, each checkpoint on
    the first; write ``--record`` (:mod:`fishertune.analysis.record`), last and atomically.

    Each split is tokenized once, with the final model's tokenizer (measured first), so every
    folder is measured on the same rows; one model is held at a time.

    Returns:
        The final model's result on the first split (the one the tables show).
    """
    from fishertune.analysis.measure import measured_rows
    from fishertune.analysis.record import measure_folders, model_folders, record
    from fishertune.files import write_json_atomic

    start = time.time()
    splits = list(conversations)
    loaded: dict[str, Any] = {}
    rows: dict[str, Any] = {}

    def measure(folder: str, split: str) -> Any:
        if loaded.get("folder") != folder:
            loaded.clear()  # the previous model is released before the next one loads
            # a checkpoint is read with the final model's tokenizer (only its padding id is used)
            tokenizer = args.tokenizer if folder == args.model else args.tokenizer or args.model
            loaded.update(folder=folder, model=_load(args, folder, tokenizer, device, dtype))
        model, tokenizer = loaded["model"]
        if split not in rows:
            rows[split] = measured_rows(
                conversations[split],
                tokenizer,
                max_length=args.max_length,
                seed=args.seed,
                batches=args.batches,
                batch_size=args.batch_size,
            )
        return _measure(
            args,
            alphas,
            model,
            tokenizer,
            rows[split],
            model_name=folder,
            split=split,
            device=device,
        )

    folders = model_folders(args.model, checkpoints=args.checkpoints)
    results, trajectory, by_split = measure_folders(
        folders, splits, measure, log=lambda line: print(line, flush=True)
    )
    settings = {
        "model": args.model,
        "data": args.data,
        "split": splits[0],
        "max_length": args.max_length,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "probes": args.probes,
        "fisher_draws": args.fisher_draws,
        "seed": args.seed,
        "dtype": str(dtype).removeprefix("torch."),
    }
    write_json_atomic(Path(args.record), record(settings, trajectory, by_split, start))
    return results[splits[0]]


def main(argv: list[str] | None = None) -> int:
    """Run ``fishertune analyze``; returns the exit status."""
    args = build_parser().parse_args(argv)
    alphas, splits = check_arguments(args)
    ratio = args.target_noise_ratio
    name = args.output if args.output is not None or args.record else "analysis"
    output = None if name is None else Path(name).expanduser()
    if output is not None and output.exists() and not output.is_dir():
        raise FishertuneError(f"--output {name}: exists and is not a folder")
    if args.record is not None and Path(args.record).is_dir():
        raise FishertuneError(f"--record {args.record}: is a folder, not a file")

    import torch

    from fishertune.analysis.report import format_table, write_reports
    from fishertune.data.chat import load_conversations

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise FishertuneError(f"--device {args.device!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FishertuneError(f"--device {args.device}: CUDA is not available")
    dtype = _torch_dtype(args.dtype, device)
    # the model's path and the data first: a bad one fails before a large model is loaded
    try:
        check_model_source(args.model)
    except FishertuneError as err:
        raise _as_option_error(err) from err
    from fishertune.data.options import DataOptions

    options = DataOptions.from_args(args)
    conversations = {split: load_conversations(args.data, split, options) for split in splits}
    if args.record is not None:
        result = _write_record(args, alphas, conversations, device=device, dtype=dtype)
    else:
        model, tokenizer = _load(args, args.model, args.tokenizer, device, dtype)
        data, split = conversations[splits[0]], splits[0]
        result = _measure(
            args, alphas, model, tokenizer, data, model_name=args.model, split=split, device=device
        )
    if ratio is not None:
        result.extra["target_noise_ratio"] = _target(result, ratio)
    table = format_table(result)
    if ratio is not None:
        table += "\n" + _target_line(result.extra["target_noise_ratio"])
    written = [] if args.record is None else [Path(args.record)]
    if output is not None:
        written = [*write_reports(result, output).values(), *written]
        (output / "analysis.txt").write_text(table + "\n")
    print(table)
    print("\nwrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
