"""Chat datasets, the offline instruction-task generator and the shipped tiny tokenizer.

The names below are imported from their modules on first use (PEP 562): ``fishertune.data.options``
and the readers must stay importable without torch, so that command-line ``--help`` and argument
errors answer before the heavy stack loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "BUILTIN_TINY_TASKS": "chat",
    "FAMILIES": "tasks",
    "INSTRUCTION_CHECKERS": "instructions",
    "TINY_CHAT_TEMPLATE": "tokenizer",
    "TINY_TOKENIZER": "tokenizer",
    "TULU_CHAT_TEMPLATE": "chat",
    "assistant_spans": "chat",
    "build_tiny_tokenizer": "tokenizer",
    "check_response": "instructions",
    "ensure_chat_template": "chat",
    "generate_examples": "tasks",
    "generate_splits": "tasks",
    "load_chat_tokenizer": "tokenizer",
    "load_conversations": "chat",
    "load_tiny_tokenizer": "tokenizer",
    "reference_answer": "instructions",
    "stratified_subsample": "chat",
    "tiny_tasks_dir": "chat",
    "tokenize_conversation": "chat",
    "tokenize_dataset": "chat",
    "validate_messages": "chat",
    "write_tiny_tasks": "tasks",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fishertune.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fishertune.data.{home}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BUILTIN_TINY_TASKS",
    "FAMILIES",
    "INSTRUCTION_CHECKERS",
    "TINY_CHAT_TEMPLATE",
    "TINY_TOKENIZER",
    "TULU_CHAT_TEMPLATE",
    "assistant_spans",
    "build_tiny_tokenizer",
    "check_response",
    "ensure_chat_template",
    "generate_examples",
    "generate_splits",
    "load_chat_tokenizer",
    "load_conversations",
    "load_tiny_tokenizer",
    "reference_answer",
    "stratified_subsample",
    "tiny_tasks_dir",
    "tokenize_conversation",
    "tokenize_dataset",
    "validate_messages",
    "write_tiny_tasks",
]
