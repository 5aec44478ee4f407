"""Offline building blocks for tiny random VLMs: a tokenizer every family can share.

No hub access exists on the machines this project is tested on, so every tiny model's tokenizer is
built here in-process: a word-level vocabulary of common English words, every lower-case letter and
digit (so ANY lower-case text tokenises, unknown words falling back to letters), punctuation, and
the family's special tokens. The pre-tokenizer splits words into their own tokens and unknown
words into characters, so ``return_offsets_mapping`` gives exact character spans, which the
word ↔ token code relies on.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerFast

#: Common words of captions and VQA questions, plus the miniature world's vocabulary.
BASIC_WORDS: tuple[str, ...] = tuple(
    """
    a an the and or but of in on at to from with without by for as is are was were be been being
    it its this that these those there here what which who where when how why yes no not
    do does did can could will would should may might must have has had i you he she we they me
    my your his her our their them us one two three four five six seven eight nine ten many few
    some any all each every more most less other another same different
    image picture photo scene view left right top bottom middle center centre above below under over
    next near far behind front back side inside outside between around up down
    red green blue yellow orange purple pink brown black white gray grey color colour colours colors
    circle square triangle star cross ring shape shapes object objects thing things
    big small large tiny little tall short long wide narrow round
    man woman person people child dog cat bird horse car bus bike tree house sky water grass road
    table chair cup plate food ball boat train plane street building window door
    sitting standing walking running holding looking playing eating riding
    describe show tell answer question count number how many there is are
    user assistant system
    """.split()
)

PUNCTUATION: tuple[str, ...] = tuple(".,;:!?'\"()-")


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a tiny random model of a real architecture (``Family.build_tiny``).

    The defaults are the test models'. The world's VLMs and the benchmarks pass their own sizes,
    so every tiny model of a family comes from one function. A field a family does not have is
    ignored: ``vision_global_layers``, ``vision_intermediate`` and ``cross_layers`` are Mllama's.
    Unset MLP widths are twice the hidden size.
    """

    image_size: int = 56  # the vision input side (Mllama: one tile)
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_global_layers: int = 1
    vision_heads: int = 4
    vision_mlp: int | None = None
    vision_intermediate: tuple[int, ...] | None = None  # Mllama's concatenated layers (default: all)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    kv_heads: int = 2
    text_mlp: int | None = None
    cross_layers: tuple[int, ...] = (1, 3)
    max_positions: int = 512


def build_tokenizer(
    special_tokens: Sequence[str] = (),
    chat_template: str | None = None,
    *,
    bos: str = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    extra_words: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over :data:`BASIC_WORDS` + letters + digits + punctuation.

    Text is lower-cased by the normaliser; words in the vocabulary become one token, other words
    are split into single characters (a second word-level pass over the characters), so nothing
    maps to ``<unk>`` except characters outside ``[a-z0-9]`` and the punctuation set.

    Args:
        special_tokens: the family's special tokens (image placeholders, chat markers), added as
            ``extra_special_tokens`` so they are never split.
        chat_template: a Jinja chat template stored on the tokenizer (and copied to the processor).
        bos, eos, pad, unk: the four basic special tokens.
        extra_words: more whole-word vocabulary entries.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    base = [pad, unk, bos, eos]
    words = list(dict.fromkeys([*BASIC_WORDS, *extra_words]))
    chars = list(string.ascii_lowercase + string.digits) + list(PUNCTUATION)
    vocab: dict[str, int] = {}
    for tok in [*base, *chars, *words]:
        vocab.setdefault(tok, len(vocab))
    known = "|".join(sorted((w for w in words if len(w) > 1), key=len, reverse=True))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # whole words first (spaces dropped), then known words stay whole, others become characters
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(rf"^(?:{known})$|."), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        extra_special_tokens=list(special_tokens),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


#: A generic chat template: ``<role>: content`` per turn, images as the family's placeholder.
def simple_chat_template(image_token: str, bos: str = "<s>", eos: str = "</s>") -> str:
    """A small Jinja chat template: structured ``content`` lists or plain strings, one line per turn.

    Image parts become ``image_token`` so the processor expands them exactly as a real model's
    template would; ``add_generation_prompt`` opens an assistant turn.
    """
    return (
        bos + "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image_token + "{% elif c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{% if m['role'] == 'assistant' %}" + eos + "{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )


def save_tiny(model: Any, processor: Any, out: str) -> None:
    """Save a tiny model and its processor side by side, in the standard ``save_pretrained`` layout.

    The model is put in eval mode and float32; generation defaults are reset so ``generate`` works
    with the tiny tokenizer's special ids.
    """
    import os

    os.makedirs(out, exist_ok=True)
    model.eval()
    tok = getattr(processor, "tokenizer", processor)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


def load_image_only_processor(path: str, processor_cls: Any, image_processor_cls: Any, **kwargs: Any) -> Any:
    """Load a processor whose standard class insists on a torchvision video processor.

    With torchvision installed the standard ``AutoProcessor`` is used. Without it,
    ``processor_cls`` (the family's subclass whose ``get_attributes`` lists only the image
    processor and the tokenizer) is rebuilt from the folder: the tokenizer, the PIL image
    processor ``image_processor_cls`` and the processor's own saved options (``processor_config.json``,
    the chat template), exactly what ``ProcessorMixin.from_pretrained`` would pass.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)
    return processor_cls.from_pretrained(path, **kwargs)
