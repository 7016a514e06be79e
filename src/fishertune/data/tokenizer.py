"""Tokenizers in one place: the loader of chat tokenizers (:func:`load_chat_tokenizer`), the
chat templates given to them (open-instruct's Tulu template, a template file), and the tiny
byte-level BPE tokenizer shipped with the package, for offline runs and tests.

The tiny tokenizer is trained on the text of the offline tasks (``fishertune.data.tasks``), so a
conversation takes a few dozen tokens, and carries a Tulu-style chat template::

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
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fishertune.errors import FishertuneError, first_line

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "TINY_TOKENIZER",
    "TINY_VOCAB_SIZE",
    "TULU_CHAT_TEMPLATE",
    "build_tiny_tokenizer",
    "ensure_chat_template",
    "load_chat_tokenizer",
    "load_tiny_tokenizer",
    "set_chat_template_file",
    "tiny_tokenizer_dir",
    "train_chat_tokenizer",
]

logger = logging.getLogger(__name__)

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


def set_chat_template_file(tokenizer: Any, path: str) -> Any:
    """Give ``tokenizer`` the chat template in a ``.jinja`` / ``.j2`` file (TRL's
    ``chat_template_path``), before any conversation is tokenized with it.

    TRL also accepts a tokenizer name there, whose template it copies while adding its special
    tokens and resizing the model's embeddings: that changes the model, and is refused here.
    """
    file = Path(path).expanduser()
    if not (file.is_file() and file.suffix in (".jinja", ".j2")):
        raise FishertuneError(
            f"chat_template_path {path}: give a .jinja or .j2 template file (copying another "
            "tokenizer's template, which adds tokens to the model, is not supported)"
        )
    tokenizer.chat_template = file.read_text(encoding="utf-8")
    return tokenizer


def load_chat_tokenizer(
    name: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """A tokenizer ready for chat SFT: the shipped one for :data:`TINY_TOKENIZER`, otherwise
    ``AutoTokenizer.from_pretrained(name, revision=, trust_remote_code=)``; given a chat
    template if it has none (open-instruct's Tulu template) and EOS as padding if it has no pad
    token. A tokenizer that cannot be loaded raises a one-line ``FishertuneError``."""
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
