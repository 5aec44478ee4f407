"""Gemma 3 (``gemma3``): pooled image soft tokens inside the language model's self-attention.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (Gemma-3-4B, 34 layers → 7 of them mid-stack).
Gemma 3 interleaves sliding-window and global layers; the capture reads whatever mask the model
builds for the watched layer (a sliding-window layer's answer rows may not see an image far back;
those keys then get probability 0, exactly as in the model).

Geometry: the image processor RESIZES the whole image to ``image_size``×``image_size`` (896 for the
released checkpoints; no crop, so a non-square image is squashed), SigLIP cuts it into
``(image_size / patch)²`` patches (64×64), and the projector average-pools them
``k``×``k`` into ``mm_tokens_per_image`` soft tokens (256 = 16×16), row-major. The processor writes
each image as ``\\n\\n<start_of_image>`` + 256 × ``<image_soft_token>`` + ``<end_of_image>\\n\\n``;
the soft tokens are the keys (``config.image_token_id``), and the grid covers the whole original
image. Pan-and-scan (``do_pan_and_scan``, off by default) adds crops as further images and is
refused here with a message: their layout is not mapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lavender.vlm.families._tokens import square_grids
from lavender.vlm.families.base import Family, ImageGrid, image_token_id, register_family


@register_family
class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        if processor is not None and getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ValueError("gemma3: do_pan_and_scan adds crops whose layout Lavender does not map; "
                             "turn it off in the processor (its default)")
        n = int(config.mm_tokens_per_image if not isinstance(config, dict) else config["mm_tokens_per_image"])
        return square_grids(inputs["input_ids"], image_sizes, token, math.isqrt(n),
                            lambda w, h: (0.0, 0.0, float(w), float(h)))

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny Gemma 3: SigLIP 56/7 → 8×8 patches pooled 2×2 → 4×4 = 16 soft tokens; 4 text layers
        (sliding window 64 on layers 0–2, global on 3), hidden 64."""
        import torch
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3Processor,
            PreTrainedTokenizerFast,
            SiglipVisionConfig,
        )
        from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        template = GEMMA3_TEMPLATE
        if tokenizer is None:
            base = build_tokenizer([*named.values(), "<start_of_turn>", "<end_of_turn>"])
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token=base.bos_token,
                                                eos_token=base.eos_token, pad_token=base.pad_token,
                                                unk_token=base.unk_token, extra_special_tokens=named)
        else:
            template = tokenizer.chat_template or template
        tok = tokenizer
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in named.items()}
        text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                                sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=56, patch_size=7)
        config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                              boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                              image_token_index=ids["image_token"])
        image_processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
        processor = Gemma3Processor(image_processor, tok, image_seq_length=16, chat_template=template)
        torch.manual_seed(seed)
        return Gemma3ForConditionalGeneration(config), processor


# Gemma 3's turn format (written here): <bos><start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n…;
# a system message is prepended to the first user turn; images are <start_of_image>.
GEMMA3_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set first = (messages[0]['content'] if messages[0]['content'] is string else "
    "messages[0]['content'][0]['text']) + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for m in loop_messages %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') }}"
    "{%- if m['content'] is string %}{{- m['content'] | trim }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<start_of_image>' }}{%- elif c['type'] == 'text' %}{{- c['text'] | trim }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
