"""PaliGemma (``paligemma``): a prefix-LM — image + prompt bidirectional, the answer causal.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (PaliGemma-3B, 18 Gemma layers → 4 of them mid-stack;
PaliGemma 2 3B/10B/28B: 26/42/46 Gemma-2 layers).

Geometry: SigLIP's image processor RESIZES the whole image to ``image_size``² (224/448/896 for the
released checkpoints; squashed, no crop), cuts it into 14-px patches and the linear projector keeps
every patch: ``(image_size / 14)²`` ``<image>`` tokens (256 / 1024 / 4096), row-major. The grid
covers the whole original image. Several images of one record are several such grids, in order.

Sequence and mask (the prefix-LM): the released processor writes every image first, then ``<bos>``,
the prompt and ``\\n`` — the PREFIX (``token_type_ids`` 0), in which image and prompt tokens attend
to each other BIDIRECTIONALLY — and then the answer ``suffix + <eos>`` (``token_type_ids`` 1), causal.
Only the suffix may hold trained tokens: an answer inside the prefix would be seen by the rows that
predict it. :meth:`PaliGemmaFamily.encode` therefore cuts every rendered conversation at its first
trained token (the first assistant turn) and hands the processor ``text=`` the prompt and
``suffix=`` everything from there on (later turns included, all causal); a prompt without an answer
(generation) is all prefix. ``tests/test_families.py`` checks on the model's own attention that no row
before a label token sees it.

Per record (:meth:`PaliGemmaFamily.record_layout`, where the collator skips a bad record with a
one-line reason instead of failing the batch in :meth:`PaliGemmaFamily.encode`): an image, an answer,
a prompt before it; turns after the last answer are CUT (no label, causal after every label: nothing a
label row sees changes), or the record refused when such a turn holds an image. ``encode`` refuses a
sample without an image (``lavender generate`` too): the processor would write ``<bos>`` inside it.

Chat format: PaliGemma has no chat template. The one written here (:data:`PALIGEMMA_TEMPLATE`,
attached by :meth:`PaliGemmaFamily.load_processor` to a processor saved without one) renders
exactly the processed text: ``<image>``× images, ``<bos>``, each user/system text followed by
``\\n``, each answer followed by ``<eos>``. The prompt is used verbatim: for the released ``-mix``
/ ``-pt`` checkpoints write their task prefix (``answer en …``, ``caption en``) in the user message.

PaliGemma 2's Gemma-2 text model soft-caps attention logits (50) in its eager path; the SDPA path
it trains with does not, and neither does the capture (its maps are the SDPA model's);
:func:`lavender.vlm.backend.enable_capture` warns once when ``attn_logit_softcapping`` is set. The
tiny model is PaliGemma 1 (a Gemma text model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lavender.vlm.families._tokens import square_grids
from lavender.vlm.families.base import Family, ImageGrid, config_value, image_token_id, register_family

logger = logging.getLogger(__name__)


def _has_image(message: dict[str, Any]) -> bool:
    content = message["content"]
    if isinstance(content, str):
        return "<image>" in content
    return any(c.get("type") == "image" for c in content)

# Images first (the released processor puts them before <bos>), then the turns: a prompt ends with
# "\n" (the processor's end of prefix), an answer with EOS. No generation prompt: the prefix's "\n" is it.
PALIGEMMA_TEMPLATE = (
    "{%- for m in messages %}{%- if m['content'] is not string %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<image>' }}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for m in messages %}{%- if m['content'] is string %}{{- m['content'] }}{%- else %}"
    "{%- for c in m['content'] %}{%- if c['type'] == 'text' %}{{- c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if m['role'] == 'assistant' %}{{- eos_token }}{%- else %}{{- '\\n' }}{%- endif %}{%- endfor %}"
)


@register_family
class PaliGemmaFamily(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        vision = config_value(config, "vision_config")
        side = int(config_value(vision, "image_size")) // int(config_value(vision, "patch_size"))
        return square_grids(inputs["input_ids"], image_sizes, token, side,
                            lambda w, h: (0.0, 0.0, float(w), float(h)))

    def record_layout(self, processor: Any, messages: Sequence[dict[str, Any]], n_images: int) -> Any:
        """A training record's layout, or a one-line ``ValueError`` the collator skips the record with.

        PaliGemma's processor takes every sample as images + prompt (the prefix) + answer (the suffix,
        for every sample of a batch or for none), so per record: at least one image (a text-only sample
        gets ``<bos>`` inserted mid-prompt), at least one answer (an unanswered record trains nothing
        and would fail the batch), and a prompt before the first answer. Turns AFTER the last answer
        (a trailing user turn) are cut: they hold no label, and the suffix being causal they change
        nothing any label row sees, so the record trains exactly as without them (with
        ``align_on: all`` their words are not aligned). A trailing turn holding an image is refused
        instead (its image would have to be dropped from the record's images).
        """
        from lavender.chat import layout

        msgs = list(messages)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("paligemma: no answer (assistant turn): PaliGemma trains its answer, the "
                             "causal suffix, and a batch takes a suffix for every sample or for none")
        while msgs[-1]["role"] != "assistant":
            if _has_image(msgs.pop()):
                raise ValueError("paligemma: an image in a turn after the last answer (the record must end "
                                 "with an answer; turns after it are cut, their images cannot be)")
        if n_images == 0:
            raise ValueError("paligemma: no image (PaliGemma's processor needs one per sample)")
        lay = layout(processor, msgs)
        self._split(processor, lay.text, lay.label_spans[0][0] if lay.label_spans else len(lay.text), 0)
        return lay

    @staticmethod
    def _split(processor: Any, text: str, start: int | None, b: int) -> tuple[str, str | None]:
        """``(text=, suffix=)`` of one rendered sample for the processor; a one-line ``ValueError`` else."""
        tok = processor.tokenizer
        bos, eos, image = tok.bos_token, tok.eos_token, processor.image_token
        prefix, suffix = (text, None) if start is None else (text[:start], text[start:])
        n = 0
        while prefix.startswith(image, n):
            n += len(image)
        if n == 0:
            raise ValueError(f"paligemma: sample {b} has no image ({image} first): PaliGemma's processor needs "
                             f"one per sample (without, it writes {bos} inside the prompt)")
        head, body = prefix[:n], prefix[n:]
        if not body.startswith(bos) or not body.endswith("\n"):
            raise ValueError(f"paligemma: the prompt must be images, {bos}, text and a newline (the "
                             f"processor's prefix); got {prefix[:80]!r}… — render with PALIGEMMA_TEMPLATE")
        if suffix is not None and not suffix.endswith(eos):
            raise ValueError(f"paligemma: the answer must end with {eos} (the processor adds it): "
                             "the record must end with an answer")
        return head + body[len(bos):-1], None if suffix is None else suffix[: -len(eos)]

    def encode(self, processor: Any, texts: Sequence[str], images: Any,
               answer_starts: Sequence[int | None] | None = None, **kwargs: Any) -> Any:
        """The processor's prefix/suffix call for texts rendered with :data:`PALIGEMMA_TEMPLATE`.

        ``texts[b][:answer_starts[b]]`` (images, ``<bos>``, prompt, ``\\n``) becomes ``text=`` without
        the ``<bos>`` and ``\\n`` the processor writes itself; the rest, without its final EOS (also the
        processor's), becomes ``suffix=``, so its tokens get ``token_type_ids`` 1 (causal). A sample
        without an image is refused (``lavender generate`` included): the processor would silently
        write its ``<bos>`` inside the prompt.
        """
        starts = list(answer_starts) if answer_starts is not None else [None] * len(texts)
        if len({s is None for s in starts}) > 1:
            raise ValueError("paligemma: a batch mixes prompts with and without answers; the processor "
                             "takes a suffix for every sample or for none")
        prefixes, suffixes = [], []
        for b, (text, start) in enumerate(zip(texts, starts)):
            prefix, suffix = self._split(processor, text, start, b)
            prefixes.append(prefix)
            if suffix is not None:
                suffixes.append(suffix)
        return processor(text=prefixes, images=images, suffix=suffixes if suffixes else None, **kwargs)

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """The saved processor; a released one has no chat template and gets :data:`PALIGEMMA_TEMPLATE`.

        Released PaliGemma / PaliGemma 2 folders ship none, while the collator, ``attend`` and
        ``generate`` render through ``processor.apply_chat_template``. A template the folder does
        ship (a Lavender run folder saves the one attached here) is kept.
        """
        processor = super().load_processor(path, **kwargs)
        if not getattr(processor, "chat_template", None):
            logger.info("paligemma: %s has no chat template; using PALIGEMMA_TEMPLATE (the processor's "
                        "prefix/suffix text)", path)
            processor.chat_template = PALIGEMMA_TEMPLATE
            processor.tokenizer.chat_template = PALIGEMMA_TEMPLATE
        return processor

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny PaliGemma: SigLIP 56/14 → 4×4 = 16 image tokens (the released 224/14 → 16×16, scaled
        down), a 4-layer Gemma text model of width 64; the released SigLIP mean/std of 0.5."""
        import torch
        from transformers import (
            GemmaConfig,
            PaliGemmaConfig,
            PaliGemmaForConditionalGeneration,
            PaliGemmaProcessor,
            SiglipVisionConfig,
        )
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        tok = tokenizer or build_tokenizer(["<image>"], PALIGEMMA_TEMPLATE)
        template = tok.chat_template or PALIGEMMA_TEMPLATE
        image_processor = SiglipImageProcessorPil(size={"height": 56, "width": 56}, image_seq_length=16,
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        # the processor adds <image> (if missing) and the 1,152 <locNNNN>/<segNNN> tokens: size the vocab after it
        processor = PaliGemmaProcessor(image_processor, tok, chat_template=template)
        text = GemmaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=14)
        config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64, hidden_size=64,
                                 vocab_size=len(tok), image_token_index=processor.image_token_id)
        torch.manual_seed(seed)
        return PaliGemmaForConditionalGeneration(config), processor
