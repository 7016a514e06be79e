"""Conversational datasets given to ``FisherSFTTrainer`` tokenized as ``fishertune train`` does."""

from __future__ import annotations

from typing import Any

from fishertune.data.formats import DataOptions
from fishertune.training.config import FisherSFTConfig

__all__ = ["tokenize_conversations"]


def tokenize_conversations(arguments: dict[str, Any], config: FisherSFTConfig) -> None:
    """Tokenize conversational datasets among ``arguments`` (``SFTTrainer.__init__``'s, bound)
    for assistant-only training, as ``fishertune train`` does, in place.

    A ``datasets.Dataset`` with no ``input_ids`` whose fields name a format the reader knows
    (``messages``, ShareGPT ``conversations``, Alpaca, prompt/completion, ``text``: see
    :mod:`fishertune.data.formats`) is read through it (mappings detected, bad rows dropped and
    counted, the summary logged) and goes through :func:`fishertune.data.chat.tokenize_dataset`
    (``input_ids`` and ``assistant_masks``, from which TRL builds the labels): the loss then
    covers assistant tokens and each turn's end-of-turn token, whatever the chat template (every
    token of a text row). The tokenizer (``processing_class``, or the
    model's when not given) gets a chat template and a pad token as the CLI's does.
    """
    from datasets import Dataset

    from fishertune.data.chat import tokenize_dataset
    from fishertune.data.formats import detect_format, prepare_rows
    from fishertune.data.tokenizer import load_chat_tokenizer
    from fishertune.errors import FishertuneError

    def conversational(dataset: Any) -> bool:
        if not isinstance(dataset, Dataset) or "input_ids" in dataset.column_names:
            return False
        try:
            detect_format(dataset.column_names, DataOptions())
        except FishertuneError:
            return False
        return True

    def tokenized(dataset: Any) -> Any:
        return tokenize_dataset(prepare_rows(dataset).load(), tokenizer, max_length)

    train, evaluation = arguments.get("train_dataset"), arguments.get("eval_dataset")
    eval_sets = evaluation if isinstance(evaluation, dict) else {"": evaluation}
    if not conversational(train) and not any(map(conversational, eval_sets.values())):
        return
    from fishertune.modeling import set_chat_template_file

    tokenizer = arguments.get("processing_class")
    if tokenizer is None:
        model = arguments.get("model")
        name = model if isinstance(model, str) else model.config._name_or_path
        tokenizer = arguments["processing_class"] = load_chat_tokenizer(name)
    else:
        from fishertune.data.chat import ensure_chat_template

        ensure_chat_template(tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if config.chat_template_path is not None:  # TRL sets it later: the data needs it now
        set_chat_template_file(tokenizer, config.chat_template_path)
    # TRL's max_length None means no truncation
    max_length = config.max_length or 2**31 - 1
    if conversational(train):
        arguments["train_dataset"] = tokenized(train)
    done = {key: tokenized(ds) if conversational(ds) else ds for key, ds in eval_sets.items()}
    if evaluation is not None:
        arguments["eval_dataset"] = done if isinstance(evaluation, dict) else done[""]
