"""The tiny byte-level BPE tokenizer shipped with the package, for offline runs and tests.

It is trained on the text of the offline tasks (``fishertune.data.tasks``), so a conversation
takes a few dozen tokens, and carries a Tulu-style chat template::

    <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}</s>\\n<|user|>\\n...

The assistant content and its end-of-turn ``</s>`` sit inside ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks them, the end-of-turn token
included: a model trained on that mask learns to stop. Digits are split one per token, which is
what lets a small model learn some arithmetic.

``scripts/build_tiny_tokenizer.py`` regenerates ``src/fishertune/assets/tiny-tokenizer``
byte-identically by calling ``build_tiny_tokenizer``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "TINY_TOKENIZER",
    "TINY_VOCAB_SIZE",
    "build_tiny_tokenizer",
    "load_chat_tokenizer",
    "load_tiny_tokenizer",
    "tiny_tokenizer_dir",
    "train_chat_tokenizer",
]

TINY_VOCAB_SIZE = 1024
TINY_TOKENIZER = "builtin:tiny-tokenizer"  # the name that selects the shipped tokenizer
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
# Ids 0..5 in this order.
TINY_SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *ROLE_TOKENS)
# Number of conversations of generated text the BPE merges are learned from.
_CORPUS_SIZE = 4000
_CORPUS_SEED = 0

# open-instruct's "tulu" template with a leading BOS, generation markers around the assistant
# content + EOS, and an error for unknown roles.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)


def tiny_tokenizer_dir() -> Path:
    """Directory of the shipped tokenizer files inside the installed package."""
    return Path(str(importlib.resources.files("fishertune") / "assets" / "tiny-tokenizer"))


def load_tiny_tokenizer() -> Any:
    """Load the shipped tokenizer (a fresh ``PreTrainedTokenizerFast`` on each call).

    Vocabulary of ``TINY_VOCAB_SIZE`` (1024) tokens: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2,
    ``<|system|>``, ``<|user|>``, ``<|assistant|>`` = 3, 4, 5. Plain ``tokenizer(text)`` adds no
    special token; the chat template adds ``<s>``.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer_dir()))


def _corpus() -> list[str]:
    from fishertune.data.tasks import generate_examples

    examples = generate_examples(_CORPUS_SIZE, seed=_CORPUS_SEED, split="tokenizer")
    return [m["content"] for ex in examples for m in ex["messages"]]


def build_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train the tiny byte-level BPE tokenizer and save it with ``save_pretrained``.

    Deterministic: the corpus is generated from a fixed seed and the BPE trainer breaks ties by
    token ids, so the saved files are the same bytes on every run (with the same ``tokenizers`` and
    ``transformers`` versions).

    Args:
        out_dir: directory to write ``tokenizer.json``, ``tokenizer_config.json`` and
            ``chat_template.jinja`` into.
        vocab_size: size of the vocabulary, special tokens and the 256 byte symbols included.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    return train_chat_tokenizer(_corpus(), out_dir, vocab_size=vocab_size)


def train_chat_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = TINY_VOCAB_SIZE
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (the ``tokenizers`` library) with the tiny
    preset's special tokens and chat template, and save it as a Hugging Face tokenizer folder.

    Digits are split one per token; ``<pad>``, ``<s>``, ``</s>``, ``<|system|>``, ``<|user|>``,
    ``<|assistant|>`` get ids 0..5. Deterministic for the same texts (ties broken by token ids).

    Args:
        texts: the training corpus, one document per item.
        out_dir: directory to write ``tokenizer.json``, ``tokenizer_config.json`` and
            ``chat_template.jinja`` into.
        vocab_size: size of the vocabulary, special tokens and the 256 byte symbols included.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return out


def load_chat_tokenizer(
    name: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """A tokenizer ready for chat SFT: the shipped one for :data:`TINY_TOKENIZER`, otherwise
    ``AutoTokenizer.from_pretrained(name, revision=, trust_remote_code=)``; given a chat
    template if it has none (open-instruct's Tulu template) and EOS as padding if it has no pad
    token. A tokenizer that cannot be loaded raises a one-line ``FishertuneError``."""
    from fishertune.data.chat import ensure_chat_template

    if name == TINY_TOKENIZER:
        tokenizer = load_tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            extra = {"revision": revision} if revision is not None else {}
            tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code, **extra
            )
        except (OSError, ValueError) as err:
            first = first_line(err)
            raise FishertuneError(
                f"cannot load tokenizer {name!r} (not a local folder, and the hub could not "
                f"provide it): {first}"
            ) from err
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
