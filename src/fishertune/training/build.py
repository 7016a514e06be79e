"""Building a run from its arguments: tokenizer, model (LoRA included), datasets and the trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fishertune.data.formats import DataOptions
from fishertune.errors import FishertuneError
from fishertune.modeling import TINY_MODEL
from fishertune.training.arguments import check_model_options, check_values
from fishertune.training.output_dir import save_unnamed_base

logger = logging.getLogger(__name__)


def tokenizer_from_args(script_args: Any, model_args: Any, training_args: Any = None) -> Any:
    """The tokenizer the data is tokenized with (``chat_template_path`` applied first)."""
    from fishertune.modeling import load_tokenizer as load

    return load(
        model_args.model_name_or_path or TINY_MODEL,
        script_args.tokenizer_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=bool(getattr(training_args, "trust_remote_code", False)),
        chat_template_path=getattr(training_args, "chat_template_path", None),
    )


def model_from_args(script_args: Any, training_args: Any, model_args: Any, tokenizer: Any) -> Any:
    """The model to fine-tune, in ``--dtype`` (the dtype it is saved back in).

    A LoRA run folder as ``--model_name_or_path`` is loaded with its adapter merged into its
    base: fine-tuning continues from the adapted model (fully, or with a new adapter under
    ``--use_peft``). Exact penalty gradients default to eager attention (double backward).
    """
    from fishertune.modeling import load_model as load
    from fishertune.training.config import PENALTY_METHODS

    exact = training_args.method in PENALTY_METHODS and training_args.penalty_grad == "exact"
    return load(
        model_args.model_name_or_path or TINY_MODEL,
        tokenizer,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation or ("eager" if exact else None),
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        merge_adapter=True,
        tiny_sizes={
            "hidden_size": script_args.tiny_hidden_size,
            "num_layers": script_args.tiny_num_layers,
            "num_heads": script_args.tiny_num_heads,
        },
        seed=training_args.seed,
    )


def save_merged_model(trainer: Any, folder: Path) -> None:
    """The trained adapter merged into its base (``merge_and_unload``), saved with the tokenizer
    in the dtype the base was loaded in."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    merged = model.merge_and_unload()
    if trainer.accelerator.is_main_process:
        merged.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)


def load_datasets(
    script_args: Any,
    training_args: Any,
    tokenizer: Any,
    reports: dict[str, dict[str, Any]] | None = None,
) -> tuple[Any, Any]:
    """The tokenized train (and, with evaluation on, test) split, read through the one reader
    (:mod:`fishertune.data.formats`) with the run's data options; ``reports`` gets each split's
    report (rows read, kept, dropped by reason, tokenization's drops included).

    A run that reads fewer rows than the train split holds gets it tokenized lazily
    (:func:`fishertune.training.data.tokenize_lazily`: the same rows in the same order, each
    tokenized when the trainer first reads it; TRL's preparation skipped, the evaluation split
    given its labels here); otherwise, or where every row's tokens or length are needed
    (:func:`~fishertune.training.data.lazy_plan` says why, in one logged line), in full."""
    from fishertune.data.chat import load_conversations, stratified_subsample, tokenize_dataset
    from fishertune.training.data import lazy_plan, tokenize_lazily, with_labels

    if not script_args.dataset_name:
        raise FishertuneError("dataset_name is required (a hub name, a local file or folder)")
    options = DataOptions.from_args(script_args)
    max_length = training_args.max_length or 1024
    reports = {} if reports is None else reports

    def read(split: str) -> Any:
        found: list[dict[str, Any]] = []
        rows = load_conversations(script_args.dataset_name, split, options, reports=found)
        reports[split] = found[0]
        return rows

    train = read(script_args.dataset_train_split)
    if script_args.dataset_fraction is not None:
        train = stratified_subsample(
            train, script_args.dataset_fraction, seed=script_args.dataset_subsample_seed
        )
    drop = bool(getattr(script_args, "drop_too_long", False))
    report = reports[script_args.dataset_train_split]
    eager = lazy_plan(script_args, training_args, tokenizer, len(train))
    if eager is None:
        train = tokenize_lazily(
            train,
            tokenizer,
            max_length,
            assistant_only=training_args.assistant_only,
            report=report,
        )
        # the rows are trainer-ready: TRL's preparation would read (tokenize) every one
        training_args.dataset_kwargs = {
            **(training_args.dataset_kwargs or {}),
            "skip_prepare_dataset": True,
        }
    else:
        logger.info("train split tokenized in full: %s", eager)
        train = tokenize_dataset(train, tokenizer, max_length, drop_too_long=drop, report=report)
    evaluation = None
    if training_args.eval_strategy != "no":
        split = script_args.dataset_test_split
        evaluation = tokenize_dataset(
            read(split), tokenizer, max_length, drop_too_long=drop, report=reports[split]
        )
        if eager is None:  # prepared here as TRL would, since its preparation is skipped
            evaluation = with_labels(evaluation, training_args.assistant_only)
    return train, evaluation


def build_trainer(
    script_args: Any,
    training_args: Any,
    model_args: Any,
    *,
    on_first_checkpoint: Callable[[], None] | None = None,
) -> Any:
    """Tokenizer, data, model and trainer from parsed arguments (presets are checked with it).

    ``on_first_checkpoint`` runs on the main process once the first complete checkpoint exists.
    """
    from trl import get_peft_config

    from fishertune.training.trainer import FisherSFTTrainer

    check_values(script_args, training_args)
    check_model_options(script_args, model_args)
    tokenizer = tokenizer_from_args(script_args, model_args, training_args)
    reports: dict[str, dict[str, Any]] = {}
    train, evaluation = load_datasets(script_args, training_args, tokenizer, reports)
    if not training_args.assistant_only:  # TRL then scores every token, as the library does
        # (rows tokenized lazily carry their labels already)
        train, evaluation = (
            ds.remove_columns("assistant_masks")
            if ds is not None and "assistant_masks" in ds.column_names
            else ds
            for ds in (train, evaluation)
        )
    model = model_from_args(script_args, training_args, model_args, tokenizer)
    if model_args.use_peft:
        save_unnamed_base(model, tokenizer, model_args, training_args, resume=script_args.resume)
    trainer = FisherSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    if script_args.save_merged_model and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # merge_and_unload on sharded parameters would write a wrong or empty model
        raise FishertuneError(
            "save_merged_model is not supported with FSDP or DeepSpeed (sharded parameters): "
            "merge after training, e.g. fishertune.modeling.load_model_and_tokenizer(RUN_DIR, "
            "merge_adapter=True) then save_pretrained"
        )
    trainer.checkpoint_record.on_first = on_first_checkpoint
    trainer.data_reports = reports  # written to output_dir as DATA_REPORT once the run owns it
    return trainer
