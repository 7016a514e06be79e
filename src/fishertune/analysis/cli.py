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
import sys
import time
from pathlib import Path
from typing import Any

from fishertune.analysis.options import build_parser, check_arguments, parse_alphas
from fishertune.errors import FishertuneError
from fishertune.modeling import check_model_source

__all__ = ["build_parser", "main", "parse_alphas"]


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
    from fishertune.analysis.record import measure_folders, model_folders, record
    from fishertune.analysis.samples import measured_rows
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
