"""Chat datasets, the offline instruction-task generator and the shipped tiny tokenizer."""

from fishertune.data.chat import (
    BUILTIN_TINY_TASKS,
    TULU_CHAT_TEMPLATE,
    assistant_spans,
    ensure_chat_template,
    load_conversations,
    stratified_subsample,
    tiny_tasks_dir,
    tokenize_conversation,
    tokenize_dataset,
    validate_messages,
)
from fishertune.data.tasks import (
    FAMILIES,
    INSTRUCTION_CHECKERS,
    check_response,
    generate_examples,
    generate_splits,
    reference_answer,
    write_tiny_tasks,
)
from fishertune.data.tokenizer import (
    TINY_CHAT_TEMPLATE,
    TINY_TOKENIZER,
    build_tiny_tokenizer,
    load_chat_tokenizer,
    load_tiny_tokenizer,
)

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
