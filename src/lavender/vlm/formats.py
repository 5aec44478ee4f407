"""Tiny tokenizers and chat templates that speak each family's RELEASED format.

The default tiny models (:mod:`lavender.vlm.tiny`) use a word-level tokenizer whose offsets never
include spaces and one simple template for every family. Released checkpoints do neither: a word's
token carries the space before it (``'ĠRed'`` byte-level, ``'▁Red'`` sentencepiece-style), their
offsets include that space, and each family has its own turn markup. Bugs in locating labels and
words hide behind the simple format, so the layout tests and ``lavender tiny-vlm --real-format`` use
these instead.

Each tokenizer is built offline: a small BPE trained here on a built-in corpus, with the released
tokenizer's pre-tokenisation (Llama-3 / Qwen2: their split regex, then byte-level; LLaVA-1.5's
Llama-2: sentencepiece-style ``▁``) and special tokens. Each template is written here to render the
text the released template renders for the conversations Lavender trains on (text and image items;
string system messages where the released template reads a string) — the rendered strings are
pinned in ``tests/test_layout_check.py``. No third-party file is vendored.

- ``mllama`` (Llama-3.2-Vision-Instruct): ``<|begin_of_text|>``, a system block with the knowledge and
  today's date only for conversations WITHOUT images (an error for a system message with images),
  ``<|start_header_id|>role<|end_header_id|>\\n\\n`` headers, ``<|eot_id|>`` after every turn.
- ``llava`` (llava-1.5-hf): ``USER: <image>\\n… ASSISTANT: …`` with a space after every turn and NO
  end-of-turn marker (the BOS comes from the tokenizer).
- ``qwen2_vl`` (Qwen2-VL-Instruct): ChatML, ``<|im_start|>role\\n…<|im_end|>\\n``, a default system
  prompt "You are a helpful assistant." when none is given, images as
  ``<|vision_start|><|image_pad|><|vision_end|>``.
- ``idefics3`` (Idefics3-8B-Llama3; SmolVLM uses the same turn format over a GPT-2-style
  tokenizer): ``<|begin_of_text|>User:<image>…<end_of_utterance>\\nAssistant: …<end_of_utterance>\\n``.
- ``minicpmv`` (MiniCPM-V 4.6): ChatML over a Qwen tokenizer, one ``<|image_pad|>`` per image, no default
  system prompt (written from the processor's API; see :mod:`lavender.vlm.families.minicpmv`).
- ``paligemma`` (no chat template; a prefix-LM): the processor's own text, images first,
  ``<image>…<bos>prompt\\n`` (the bidirectional prefix) then ``answer<eos>`` (the causal suffix);
  see :mod:`lavender.vlm.families.paligemma`.
- ``qwen3_vl`` (Qwen3-VL-Instruct): ChatML as Qwen2-VL with the same Qwen2 tokenizer, but NO default
  system prompt.
- ``llava_onevision`` (llava-onevision-qwen2-*-ov-hf): ChatML over the Qwen2 tokenizer, no default
  system prompt; a message's images come FIRST, each as ``<image>\\n``, then its text (as LLaVA-1.5).
- ``llava_next`` (llava-v1.6-mistral-7b-hf, the most used LLaVA-NeXT): Mistral's ``[INST] … [/INST]``
  over a Llama-2-style sentencepiece tokenizer; a message's images first as ``<image>\\n``; the answer
  as `` answer</s> ``; a system message as ``<<SYS>>\\n…\\n<</SYS>>\\n\\n``; no generation prompt (the
  user turn ends with `` [/INST]``). The Vicuna checkpoints speak ``llava``'s format.
- ``internvl`` (InternVL3 / 3.5 ``-hf``): ChatML over the Qwen2 tokenizer, no default system prompt;
  images in place as ``<IMG_CONTEXT>\\n`` (the processor writes ``<img>`` + tokens + ``</img>``).
"""

from __future__ import annotations

from typing import Any

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_TEXT = ("{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- IMAGE }}{%- elif c['type'] == 'text' %}"
         "{{- c['text'] }}{%- endif %}{%- endfor %}")

TEMPLATES: dict[str, str] = {
    "mllama": (
        "{{- bos_token }}"
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{%- set ns = namespace(has_images=false) %}"
        "{%- for m in messages %}{%- for c in m['content'] %}{%- if c['type'] == 'image' %}"
        "{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endfor %}"
        "{%- if ns.has_images and not system_message == '' %}"
        "{{- raise_exception('Prompting with images is incompatible with system messages.') }}{%- endif %}"
        "{%- if not ns.has_images %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
        "{{- system_message }}{{- '<|eot_id|>' }}{%- endif %}"
        "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}" + _TEXT.replace("IMAGE", "'<|image|>'")
        + "{%- endif %}{{- '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "llava": (
        "{%- for m in messages %}{%- if m['role'] != 'system' %}{{- m['role'].upper() + ': ' }}{%- endif %}"
        "{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- '<image>\\n' }}{%- endif %}{%- endfor %}"
        "{%- for c in m['content'] %}{%- if c['type'] == 'text' %}{{- c['text'] + ' ' }}{%- endif %}{%- endfor %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}"),
    "qwen2_vl": (
        "{%- for m in messages %}{%- if loop.first and m['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m['content'] is string %}{{- m['content'] }}{%- else %}"
        + _TEXT.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
        + "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
    "idefics3": (
        "<|begin_of_text|>{%- for m in messages %}{{- m['role'] | capitalize }}"
        "{%- if m['content'][0]['type'] == 'image' %}{{- ':' }}{%- else %}{{- ': ' }}{%- endif %}"
        + _TEXT.replace("IMAGE", "'<image>'") + "{{- '<end_of_utterance>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"),
}

TEMPLATES["gemma3"] = ""  # filled below from the family's own template (its released format)
# Qwen3-VL-Instruct: ChatML as Qwen2-VL but WITHOUT a default system prompt
TEMPLATES["qwen3_vl"] = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}"
    + _TEXT.replace("IMAGE", "'<|vision_start|><|image_pad|><|vision_end|>'")
    + "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# LLaVA-OneVision (-ov-hf): ChatML, no default system prompt, a message's images before its text
TEMPLATES["llava_onevision"] = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m['content'] is string %}"
    "{{- m['content'] }}{%- else %}{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- '<image>\\n' }}"
    "{%- endif %}{%- endfor %}{%- for c in m['content'] %}{%- if c['type'] == 'text' %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# LLaVA-NeXT (llava-v1.6-mistral-7b-hf): Mistral [INST] turns, a message's images before its text
TEMPLATES["llava_next"] = (
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{{- '<<SYS>>\\n' + m['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{%- elif m['role'] == 'user' %}"
    "{{- '[INST] ' }}{%- for c in m['content'] %}{%- if c['type'] == 'image' %}{{- '<image>\\n' }}{%- endif %}"
    "{%- endfor %}{%- for c in m['content'] %}{%- if c['type'] == 'text' %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{{- ' [/INST]' }}{%- elif m['role'] == 'assistant' %}"
    "{{- ' ' + m['content'][0]['text'] + '</s> ' }}{%- endif %}{%- endfor %}")

# InternVL (-hf): ChatML, no default system prompt, images where they are, each '<IMG_CONTEXT>\\n'
TEMPLATES["internvl"] = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m['content'] is string %}"
    "{{- m['content'] }}{%- else %}" + _TEXT.replace("IMAGE", "'<IMG_CONTEXT>\\n'")
    + "{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# (pre-tokenisation, bos, eos, pad, special tokens the family's processor needs)
_FAMILY_TOKENS: dict[str, tuple[str, str, str, str, list[str]]] = {
    "mllama": ("llama3", "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|image|>", "<|python_tag|>", "<|end_of_text|>"]),
    "llava": ("sentencepiece", "<s>", "</s>", "<pad>", ["<image>"]),
    "qwen2_vl": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                 ["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]),
    "idefics3": ("llama3", "<|begin_of_text|>", "<end_of_utterance>", "<|finetune_right_pad_id|>",
                 ["<fake_token_around_image>", "<image>", "<global-img>", "<|end_of_text|>"]
                 + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]),
    "qwen3_vl": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                 ["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]),
    "llava_onevision": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>", ["<|im_start|>", "<image>", "<video>"]),
    "llava_next": ("sentencepiece", "<s>", "</s>", "<pad>", ["<image>"]),
    "internvl": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                 ["<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]),
    # PaliGemma: Gemma's tokenizer (sentencepiece-style, no space prepended); its processor adds <image>
    # when missing and the <locNNNN>/<segNNN> tokens, and turns the BOS off (it writes <bos> itself)
    "paligemma": ("gemma", "<bos>", "<eos>", "<pad>", ["<image>"]),
    # MiniCPM-V 4.6: a Qwen3.5 tokenizer (Qwen2's split regex up to combining marks); the processor reads
    # its image markers by name (_NAMED)
    "minicpmv": ("qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>",
                 ["<|im_start|>", "<|image_pad|>", "<|video_pad|>", "<image>", "</image>", "<slice>", "</slice>",
                  "<image_id>", "</image_id>"]),
    # Gemma 3: sentencepiece-style, no space prepended to the text; generation stops at <end_of_turn>
    "gemma3": ("gemma", "<bos>", "<end_of_turn>", "<pad>",
               ["<start_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]),
}
# special tokens a processor reads by NAME (Gemma3Processor: tokenizer.boi_token, .image_token, ...)
_NAMED = {"gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>"},
          # InternVLProcessor reads tokenizer.start_image_token, .context_image_token, ...
          "internvl": {"start_image_token": "<img>", "end_image_token": "</img>",
                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}

# MiniCPMV4_6Processor reads tokenizer.image_token, .slice_start_token, ... by name
_NAMED["minicpmv"] = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
                      "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
                      "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
                      "im_start_token": "<|im_start|>"}

CORPUS = (
    "What colour is the circle? Red. What is the shape of the red object? A square. Is there a cross? Yes, "
    "there is. No. Which one is it? A. B. C. D. Answer in one word. Describe the image. A red circle left of "
    "a blue square and a green triangle. The answer is red. Two circles, three squares. USER ASSISTANT User "
    "Assistant user assistant system You are a helpful assistant. Cutting Knowledge Date: December 2023 "
    "Today Date: 26 Jul 2024 colour color shape left right above below yellow purple orange grey white "
    "black brown pink 0 1 2 3 4 5 6 7 8 9 10 100 2024 ' \" . , ? ! : ; - ( ) "
)


def _gemma3_template() -> str:
    from lavender.vlm.families.gemma3 import GEMMA3_TEMPLATE

    return GEMMA3_TEMPLATE


TEMPLATES["gemma3"] = _gemma3_template()


def _paligemma_template() -> str:
    from lavender.vlm.families.paligemma import PALIGEMMA_TEMPLATE

    return PALIGEMMA_TEMPLATE


TEMPLATES["paligemma"] = _paligemma_template()  # no released chat template: the processor's prefix/suffix text


def _minicpmv_template() -> str:
    from lavender.vlm.families.minicpmv import MINICPMV_TEMPLATE

    return MINICPMV_TEMPLATE


TEMPLATES["minicpmv"] = _minicpmv_template()  # ChatML, one <|image_pad|> per image (see the family)


def families_with_formats() -> list[str]:
    return sorted(TEMPLATES)


def real_format_tokenizer(family: str, vocab_size: int = 600) -> Any:
    """A tiny fast tokenizer with ``family``'s released pre-tokenisation, special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in _FAMILY_TOKENS:
        raise ValueError(f"no released-format tokenizer for {family!r}; families: {', '.join(families_with_formats())}")
    kind, bos, eos, pad, extra = _FAMILY_TOKENS[family]
    specials = list(dict.fromkeys([bos, eos, pad, *extra]))
    if kind in ("sentencepiece", "gemma"):  # '▁' marks a space (Llama-2/LLaVA-1.5: also before the text)
        scheme = "first" if kind == "sentencepiece" else "never"
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        specials = ["<unk>", *specials]
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    else:  # byte-level after the family's split regex (Llama-3, Qwen2): ' Red' is one token 'ĠRed'
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    corpus = [CORPUS, CORPUS.lower(), CORPUS.upper()] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    unnamed = [t for t in extra if t not in (bos, eos, pad)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        unk_token="<unk>" if kind in ("sentencepiece", "gemma") else None,
        extra_special_tokens=_NAMED.get(family, unnamed))
    if kind in ("sentencepiece", "gemma"):  # these tokenizers add BOS themselves (when the text lacks it)
        from tokenizers import processors

        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fast.convert_tokens_to_ids(bos))])
    fast.chat_template = TEMPLATES[family]
    return fast


def build_tiny_real_format(family: str, seed: int = 0) -> tuple[Any, Any]:
    """``family.build_tiny`` with the released-format tokenizer and template (model, processor)."""
    from lavender.vlm.families import families

    tok = real_format_tokenizer(family)
    model, processor = families()[family].build_tiny(tokenizer=tok, seed=seed)
    processor.chat_template = TEMPLATES[family]
    return model, processor
