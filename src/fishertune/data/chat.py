"""Chat datasets: loading and validation, chat templates, assistant-only tokenization, subsets.

The data format is Tulu 3's: one conversation per row, ``messages`` a list of
``{"role": "system" | "user" | "assistant", "content": str}`` with at least one assistant turn, and
optionally a ``source`` naming the subset it comes from (used for stratified samples).

Assistant-only labels are computed from the chat template itself, for any template, without
``{% generation %}`` markers (most templates lack them): the conversation is rendered up to just
before and just after each assistant message, the characters in between are that message's span
(its content and end-of-turn token), and the tokens of the full rendering that cover a span are
marked. This is open-instruct's ``sft_tulu_tokenize_and_truncate`` done with character offsets
instead of token counts of the rendered prefixes, so it stays exact where a token would straddle a
turn boundary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line
from fishertune.penalties import IGNORE_INDEX

__all__ = [
    "ALLOWED_ROLES",
    "BUILTIN_TINY_TASKS",
    "TULU_CHAT_TEMPLATE",
    "assistant_spans",
    "check_conversations",
    "collate_tokenized",
    "ensure_chat_template",
    "load_conversations",
    "row_labels",
    "stratified_subsample",
    "tiny_tasks_dir",
    "tokenize_conversation",
    "tokenize_dataset",
    "validate_messages",
]

logger = logging.getLogger(__name__)

ALLOWED_ROLES: tuple[str, ...] = ("system", "user", "assistant")
BUILTIN_TINY_TASKS = "builtin:tiny-tasks"
_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")

# open-instruct's "tulu" chat template (open_instruct/dataset_transformation.py, CHAT_TEMPLATES),
# the one its Tulu 3 SFT recipe applies to Llama-3.1-8B, whose base tokenizer has no template:
#   <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}{eos}\n<|user|>\n...
# The last assistant turn ends on the EOS token with no newline after it.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


# --------------------------------------------------------------------------------------------
# Validation


def validate_messages(row: Any, where: str) -> None:
    """Check that one row is a conversation in the Tulu 3 format.

    Args:
        row: the row (a mapping with a ``messages`` field).
        where: how to name the row in an error, e.g. ``"data.jsonl line 7"``.

    Raises:
        FishertuneError: one line naming ``where`` and the field at fault.
    """
    if not isinstance(row, Mapping):
        raise FishertuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" not in row or row["messages"] is None:
        raise FishertuneError(f"{where}: missing field 'messages'")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise FishertuneError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
        )
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise FishertuneError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content'"
            )
        role, content = message["role"], message["content"]
        if role not in ALLOWED_ROLES:
            raise FishertuneError(
                f"{where}: messages[{i}] has unknown role {role!r} "
                f"(allowed: {', '.join(ALLOWED_ROLES)})"
            )
        if not isinstance(content, str):
            raise FishertuneError(
                f"{where}: messages[{i}].content must be a string, got {type(content).__name__}"
            )
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        raise FishertuneError(f"{where}: 'messages' has no assistant turn")


_BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, name: str, lineno: int | None) -> str:
    """UTF-8 text of ``raw`` (one line, or the whole file), a leading BOM dropped; an invalid
    byte becomes one error naming the file, line and column."""
    if lineno in (None, 1) and raw.startswith(_BOM):  # editors on Windows write one
        raw = raw[len(_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = lineno or raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise FishertuneError(
            f"{name} line {line} column {column}: byte 0x{raw[err.start]:02x} is not UTF-8 text; "
            "save the file as UTF-8"
        ) from None


def _no_rows(path: Path, name: str) -> FishertuneError:
    what = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds only blank lines"
    return FishertuneError(f"{name}: no conversations: the file {what}")


def _validate_jsonl(path: Path, name: str) -> None:
    # Read line by line before handing the file to `datasets`, whose JSON reader reports a
    # malformed line as a pyarrow error without the line number.
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, name, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FishertuneError(f"{name} line {lineno}: invalid JSON ({err})") from None
            validate_messages(row, f"{name} line {lineno}")
            rows += 1
    if rows == 0:
        raise _no_rows(path, name)


def _validate_json(path: Path, name: str) -> str | None:
    """Validate a .json file; return the field holding the rows when it is ``{field: [...]}``."""
    text = _decode(path.read_bytes(), name, None)
    if not text.strip():
        raise _no_rows(path, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: JSON Lines in a .json file
            _validate_jsonl(path, name)
            return None
        raise FishertuneError(f"{name} line {err.lineno}: invalid JSON ({err.msg})") from None
    field = None
    if isinstance(data, Mapping) and "messages" not in data:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise FishertuneError(
                f"{name}: expected a list of conversations (or an object with one list field)"
            )
        field = lists[0]
        data = data[field]
    rows = data if isinstance(data, list) else [data]
    if not rows:
        raise FishertuneError(f"{name}: no conversations: the list is empty")
    for i, row in enumerate(rows):
        validate_messages(row, f"{name} row {i}")
    return field


def _validate_dataset(dataset: Any, name: str) -> None:
    if "messages" not in dataset.column_names:
        raise FishertuneError(
            f"{name}: missing field 'messages' (columns: {', '.join(dataset.column_names)})"
        )
    index = 0
    for batch in dataset.select_columns(["messages"]).iter(batch_size=1000):
        for messages in batch["messages"]:
            validate_messages({"messages": messages}, f"{name} row {index}")
            index += 1
    if index == 0:
        raise FishertuneError(f"{name}: no conversations (0 rows)")


# --------------------------------------------------------------------------------------------
# Loading


def _cache_root() -> Path:
    return Path(os.environ.get("FISHERTUNE_CACHE") or "~/.cache/fishertune").expanduser()


def tiny_tasks_dir() -> Path:
    """Directory of the built-in offline tasks, generated on first use.

    ``$FISHERTUNE_CACHE/tiny-tasks-<version>`` (default ``~/.cache/fishertune``), holding
    ``train.jsonl`` (2000), ``validation.jsonl`` (200) and ``test.jsonl`` (200) from
    ``write_tiny_tasks(seed=0)``. Written to a temporary folder and renamed, so processes that
    start together (one per GPU) never read a half-written file.
    """
    from fishertune.data.tasks import SPLITS, TASKS_VERSION, write_tiny_tasks

    target = _cache_root() / f"tiny-tasks-{TASKS_VERSION}"
    if all((target / f"{split}.jsonl").is_file() for split in SPLITS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-tasks-", dir=target.parent))
    try:
        write_tiny_tasks(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy first (the target is not empty): use that one.
            if not all((target / f"{split}.jsonl").is_file() for split in SPLITS):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_file(path: Path, name: str) -> Any:
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _validate_jsonl(path, name)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if suffix == ".json":
        field = _validate_json(path, name)
        kwargs = {"field": field} if field else {}
        return datasets.load_dataset("json", data_files=str(path), split="train", **kwargs)
    if suffix == ".parquet":
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        _validate_dataset(dataset, name)
        return dataset
    raise FishertuneError(
        f"{name}: unsupported file type {suffix or '(none)'!r} "
        f"(expected one of {', '.join(_FILE_SUFFIXES)})"
    )


def _load_folder(folder: Path, split: str) -> Any:
    import datasets

    for suffix in _FILE_SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return _load_file(candidate, str(candidate))
    try:
        dataset = datasets.load_dataset(str(folder), split=split)
    except Exception as err:  # datasets raises several types for "no such split / no data"
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FishertuneError(
            f"{folder}: no {split}.jsonl, {split}.json or {split}.parquet, and datasets cannot "
            f"load split {split!r} from it ({first_line(err)}); it holds: {present}"
        ) from err
    _validate_dataset(dataset, f"{folder} (split {split})")
    return dataset


def _names_a_data_file(source: str) -> bool:
    return source.lower().endswith(_FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~"))


def _check_builtin(source: str, split: str) -> None:
    """A built-in dataset name and split that exist, or one line naming the ones that do."""
    from fishertune.data.tasks import SPLITS

    if source != BUILTIN_TINY_TASKS:
        raise FishertuneError(f"unknown built-in dataset {source!r} (known: {BUILTIN_TINY_TASKS})")
    if split not in SPLITS:
        raise FishertuneError(
            f"{BUILTIN_TINY_TASKS} has no split {split!r} (splits: {', '.join(SPLITS)})"
        )


def load_conversations(source: str, split: str = "train") -> Any:
    """Load conversations as a ``datasets.Dataset`` with a ``messages`` column.

    Args:
        source: one of

            * ``builtin:tiny-tasks``: the offline tasks (generated once into a cache, see
              ``tiny_tasks_dir``), split ``train``, ``validation`` or ``test``;
            * a local ``.jsonl``, ``.json`` (a list of rows, JSON Lines, or ``{field: [rows]}``)
              or ``.parquet`` file: the whole file, whatever ``split`` says;
            * a local folder: ``<split>.jsonl`` / ``.json`` / ``.parquet`` in it, or else whatever
              ``datasets.load_dataset(folder, split=split)`` finds;
            * otherwise a dataset on the Hugging Face hub, e.g.
              ``allenai/tulu-3-sft-olmo-2-mixture-0225``.
        split: split name.

    Returns:
        The dataset, every column kept (``messages``, ``source`` when present, others as is).

    Raises:
        FishertuneError: missing file, malformed JSON (with the line number), a row without a
            valid ``messages`` list (naming the row and field), or a hub dataset that cannot be
            loaded.
    """
    if source == BUILTIN_TINY_TASKS or source.startswith("builtin:"):
        _check_builtin(source, split)
        path = tiny_tasks_dir() / f"{split}.jsonl"
        return _load_file(path, str(path))
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, source)
    if path.is_dir():
        return _load_folder(path, split)
    if _names_a_data_file(source):
        raise FishertuneError(f"data file not found: {source}")
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown name, unknown split, gated repo...
        raise FishertuneError(
            f"cannot load dataset {source!r} (split {split!r}): not a local file or folder, and "
            f"the hub could not provide it ({first_line(err)})"
        ) from err
    _validate_dataset(dataset, f"{source} (split {split})")
    return dataset


def check_conversations(source: str, split: str = "train") -> None:
    """Check a data source as :func:`load_conversations` would, without loading it into
    ``datasets``: a local JSON / JSONL file (or a folder's ``<split>`` file) is read and every row
    validated; a built-in name and split are checked; a hub name is not contacted.

    Raises:
        FishertuneError: as :func:`load_conversations`, one line naming file, line and field.
    """
    if source.startswith("builtin:"):
        _check_builtin(source, split)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        path = next(
            (path / f"{split}{s}" for s in _FILE_SUFFIXES if (path / f"{split}{s}").is_file()), path
        )
        name = str(path)
    else:
        name = source
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            _validate_jsonl(path, name)
        elif suffix == ".json":
            _validate_json(path, name)
        elif suffix != ".parquet":
            raise FishertuneError(
                f"{name}: unsupported file type {suffix or '(none)'!r} "
                f"(expected one of {', '.join(_FILE_SUFFIXES)})"
            )
    elif not path.exists() and _names_a_data_file(source):
        raise FishertuneError(f"data file not found: {source}")


# --------------------------------------------------------------------------------------------
# Chat templates and assistant-only tokenization


def ensure_chat_template(tokenizer: Any, *, add_bos: bool | None = None) -> Any:
    """Give a tokenizer without a chat template the Tulu 3 one (``TULU_CHAT_TEMPLATE``).

    Base models such as Llama-3.1-8B ship no template; open-instruct's Tulu 3 SFT recipe formats
    their conversations with its ``tulu`` template, and so do we. A tokenizer that already has a
    template is left untouched.

    Args:
        tokenizer: a ``transformers`` tokenizer, changed in place.
        add_bos: put ``bos_token`` at the start of the template (open-instruct's ``--add_bos``);
            default: when the tokenizer has a BOS token, since chat templates are tokenized
            without the tokenizer's own special tokens.

    Returns:
        The same tokenizer.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    if tokenizer.eos_token is None:
        raise FishertuneError(
            "the tokenizer has no chat template and no EOS token: the Tulu template needs an EOS "
            "token to end assistant turns"
        )
    if add_bos is None:
        add_bos = tokenizer.bos_token is not None
    tokenizer.chat_template = ("{{ bos_token }}" if add_bos else "") + TULU_CHAT_TEMPLATE
    logger.info("tokenizer has no chat template: installed the Tulu 3 template")
    return tokenizer


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the characters each assistant message adds.

    For the ``i``-th message (an assistant one) the span starts where the rendering of
    ``messages[:i]`` with the generation prompt ends (so the assistant header is not in it) and
    ends where the rendering of ``messages[:i+1]`` ends (so the end-of-turn token is in it).

    Returns:
        ``(text, spans)``: the full rendering and one ``(start, end)`` character range per
        assistant message, in order.

    Raises:
        FishertuneError: the template renders a prefix of the conversation as text that is not a
            prefix of the full rendering, so assistant turns cannot be located.
    """
    text = _render(tokenizer, messages, generation=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = None
        for generation in (True, False):
            # Some templates add more to the generation prompt than to a finished turn (a
            # thinking tag): fall back to the prefix without it, labelling the header too.
            try:
                prefix = _render(tokenizer, messages[:i], generation) if i else ""
            except Exception:  # a template may refuse an empty or system-only conversation
                prefix = ""
            if text.startswith(prefix):
                start = len(prefix)
                break
        end_text = _render(tokenizer, messages[: i + 1], generation=False)
        if start is None or not text.startswith(end_text):
            raise FishertuneError(
                f"the chat template renders the conversation up to message {i} differently from "
                "the full conversation, so assistant tokens cannot be located by rendering "
                "prefixes; use a template that renders earlier turns the same way"
            )
        spans.append((start, max(start, len(end_text))))
    return text, spans


def _mask_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    mask = [0] * len(offsets)
    k = 0
    for j, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        lo, hi = spans[k]
        # A token belongs to the span if their character ranges overlap; a zero-width token
        # (some tokenizers give special tokens empty offsets) if it sits inside the span.
        if max(s, lo) < min(e, hi) or (s == e and lo <= s < hi):
            mask[j] = 1
    return mask


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    max_length: int | None,
    *,
    use_offsets: bool | None = None,
) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template and mark the assistant tokens.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template (see ``ensure_chat_template``).
        messages: the conversation (``[{"role", "content"}, ...]``).
        max_length: keep the first ``max_length`` tokens (None: no truncation).
        use_offsets: locate tokens by character offsets (fast tokenizers; default when
            available) or, if False, by token counts of the rendered prefixes as open-instruct
            does (any tokenizer; assumes tokenizing a prefix gives a prefix of the tokens).

    Returns:
        ``input_ids`` (list of L ints) and ``assistant_masks`` (L ints, 1 on the tokens of
        assistant messages including their end-of-turn token, 0 elsewhere).
    """
    text, spans = assistant_spans(tokenizer, messages)
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    # add_special_tokens=False: the template already holds the special tokens it wants (BOS);
    # apply_chat_template(tokenize=True) tokenizes the same way.
    if use_offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        mask = _mask_from_offsets(enc["offset_mapping"], spans)
    else:
        input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [0] * len(input_ids)
        for start, end in spans:
            lo = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
            hi = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
            for j in range(lo, min(hi, len(mask))):
                mask[j] = 1
    if max_length is not None:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def _tokenize_row(row: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    return tokenize_conversation(tokenizer, row["messages"], max_length)


def tokenize_dataset(
    dataset: Any, tokenizer: Any, max_length: int, num_proc: int | None = None
) -> Any:
    """Tokenize every conversation of a dataset for assistant-only training.

    The result can be given to TRL's ``SFTTrainer`` as a pre-tokenized dataset: it builds
    ``labels`` from ``assistant_masks`` (``-100`` where the mask is 0).

    Args:
        dataset: a ``datasets.Dataset`` with ``messages`` (and optionally ``source``).
        tokenizer: a tokenizer with a chat template.
        max_length: truncation length (the start of each conversation is kept).
        num_proc: worker processes for ``Dataset.map``.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``assistant_masks`` and ``source`` (if
        present). Rows left with no assistant token after truncation are dropped, with a logged
        warning that counts them.

    Raises:
        FishertuneError: every row lost its assistant tokens (``max_length`` too small).
    """
    if max_length is None or max_length < 1:
        raise FishertuneError(f"max_length must be a positive integer, got {max_length}")
    keep = [c for c in ("source",) if c in dataset.column_names]
    tokenized = dataset.map(
        _tokenize_row,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=[c for c in dataset.column_names if c not in keep],
        num_proc=num_proc,
        desc="Tokenizing conversations",
    )
    total = len(tokenized)
    tokenized = tokenized.filter(
        lambda mask: any(mask), input_columns="assistant_masks", num_proc=num_proc
    )
    dropped = total - len(tokenized)
    if total and not len(tokenized):
        raise FishertuneError(
            f"all {total} conversations lost every assistant token to truncation at "
            f"max_length={max_length}; raise max_length"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d conversations left with no assistant token after truncation to "
            "max_length=%d",
            dropped,
            total,
            max_length,
        )
    return tokenized


# --------------------------------------------------------------------------------------------
# Stratified subsets


def row_labels(row: Mapping[str, Any]) -> list[int]:
    """A tokenized row's labels: its ``labels``, or its input ids on assistant tokens
    (``assistant_masks == 1``) and ``-100`` elsewhere."""
    if "labels" in row and row["labels"] is not None:
        return list(row["labels"])
    if "assistant_masks" not in row:
        raise FishertuneError(
            "tokenized examples need 'input_ids' and 'assistant_masks' (or 'labels'); got "
            f"fields {sorted(row)}"
        )
    return [
        token if keep else IGNORE_INDEX
        for token, keep in zip(row["input_ids"], row["assistant_masks"], strict=True)
    ]


def collate_tokenized(rows: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenized rows into ``input_ids``, ``attention_mask`` and ``labels`` (B, L)
    tensors; ``labels`` are :func:`row_labels`, ``-100`` on padding."""
    import torch

    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        ids = list(row["input_ids"])
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        labels[b, : len(ids)] = torch.tensor(row_labels(row), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _strata(values: Iterable[Any]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    return groups


def stratified_subsample(dataset: Any, fraction: float, seed: int, key: str = "source") -> Any:
    """Sample a fraction of each stratum (rows sharing ``key``), like the paper's 1% / 10% sets.

    Each stratum of ``n`` rows keeps ``max(1, floor(fraction * n + 0.5))`` of them, drawn without
    replacement by ``random.Random(seed)`` over the strata in sorted order; the kept rows stay in
    their original order. Without a ``key`` column the whole dataset is one stratum.

    Args:
        dataset: a ``datasets.Dataset``.
        fraction: in (0, 1].
        seed: seed of the draw (same seed, same rows).
        key: column to stratify by.

    Returns:
        ``dataset.select(indices)``.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise FishertuneError(f"fraction must be in (0, 1], got {fraction}")
    if key in dataset.column_names:
        groups = _strata(dataset[key])
    else:
        logger.warning("no %r column to stratify by: sampling the dataset as one stratum", key)
        groups = {None: list(range(len(dataset)))}
    rng = random.Random(seed)
    chosen: list[int] = []
    for value in sorted(groups, key=lambda v: (v is None, str(v))):
        indices = groups[value]
        k = min(len(indices), max(1, math.floor(fraction * len(indices) + 0.5)))
        chosen.extend(rng.sample(indices, k))
    return dataset.select(sorted(chosen))
