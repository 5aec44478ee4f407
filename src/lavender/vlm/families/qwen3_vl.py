"""Qwen3-VL (``qwen3_vl``): merged 16-px patches in the LLM's self-attention, plus DeepStack.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (Qwen3-VL-8B, 36 layers → 7 of them, layers 9–27).

Geometry: as Qwen2-VL with 16-px patches. The image processor (``Qwen2VLImageProcessor`` with
``patch_size=16``) resizes the WHOLE image with ``smart_resize`` (aspect ratio kept up to rounding to
multiples of ``patch · merge`` = 32 px; very wide or tall images within the 200:1 limit keep their
shape, tiny ones are scaled up to ``min_pixels``), cuts it into 16-px patches
(``image_grid_thw = (1, h, w)``) emitted in 2×2 merge windows, and the merger fuses each window into
one ``<|image_pad|>`` token: ``h/2 · w/2`` tokens, row-major over ``(h/2, w/2)``. The learned
position embedding is interpolated in the same window order, so the token order is the merger's.
The grid covers the whole original image (no crop, no padding).

DeepStack: the vision tower also emits features of intermediate ViT layers
(``deepstack_visual_indexes``, 8/16/24 in the released models) through their own mergers; the
language model ADDS them to the hidden states at the image-token positions after its first
``len(deepstack_visual_indexes)`` decoder layers. They create no extra tokens and move none, so the
keys of every layer are the same ``<|image_pad|>`` positions with the same grid; watched layers past
the injection (all default ones) see keys that carry the multi-level features. Nothing is mapped or
dropped for them.

Video (``t > 1``) is refused, as for Qwen2-VL. The ``mm_token_type_ids`` the processor returns pass
through to the model unchanged.

Chat format (released Qwen3-VL-Instruct, :mod:`lavender.vlm.formats`): ChatML
``<|im_start|>role\\n…<|im_end|>\\n`` with NO default system prompt (Qwen2-VL wrote one), images as
``<|vision_start|><|image_pad|><|vision_end|>``.

Processor: ``Qwen3VLProcessor`` type-checks a video processor that needs torchvision; without it
:class:`ImageOnlyQwen3VLProcessor` drops that attribute (as for Qwen2-VL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Qwen3VLProcessor

from lavender.vlm.families._tokens import image_token_positions
from lavender.vlm.families.base import Family, ImageGrid, config_value, image_token_id, register_family
from lavender.vlm.tiny import load_image_only_processor

_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (which needs torchvision); images only."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def merged_shapes(image_grid_thw: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                  merge: int, name: str) -> list[list[tuple[int, int]]]:
    """Per sample, per image: the ``(rows, cols)`` of merged tokens from ``image_grid_thw`` (batch order).

    Still images only (``t == 1``): a video's frames would be further grids of the same keys' kind.
    """
    thw = torch.as_tensor(image_grid_thw).tolist()
    shapes: list[list[tuple[int, int]]] = []
    k = 0
    for b, sizes in enumerate(image_sizes):
        shapes.append([])
        for _ in sizes:
            if k >= len(thw):
                raise ValueError(f"{name}: image_sizes lists more images than image_grid_thw has ({len(thw)})")
            t, h, w = thw[k]
            if t != 1:
                raise ValueError(f"{name}: sample {b}: image_grid_thw {thw[k]} has t={t}; only still images "
                                 "are supported")
            shapes[b].append((h // merge, w // merge))
            k += 1
    return shapes


@register_family
class Qwen3VLFamily(Family):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        merge = int(config_value(config_value(config, "vision_config"), "spatial_merge_size"))
        shapes = merged_shapes(inputs["image_grid_thw"], image_sizes, merge, self.name)
        positions = image_token_positions(inputs["input_ids"], token, [[r * c for r, c in s] for s in shapes])
        return [ImageGrid(b, pos, r, c, (0.0, 0.0, float(w), float(h)), (int(w), int(h)))
                for b, sizes in enumerate(image_sizes)
                for pos, (r, c), (w, h) in zip(positions[b], shapes[b], sizes)]

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return load_image_only_processor(path, ImageOnlyQwen3VLProcessor, Qwen2VLImageProcessorPil, **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny Qwen3-VL: 16-px patches merged 2×2 (32 px per token), 64 to 256² pixels (2×2 to 8×8
        tokens), a 2-layer ViT whose both layers feed DeepStack (into LLM layers 0 and 1), 4 text
        layers of width 64 with interleaved M-RoPE; the released mean/std of 0.5."""
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        tok = tokenizer or build_tokenizer(list(_SPECIALS), simple_chat_template(_IMAGE))
        ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS}
        config = Qwen3VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
            text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                             # interleaved mrope sections (t, h, w) must sum to head_dim / 2 = 8
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                              "mrope_interleaved": True, "rope_theta": 5e5},
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                   min_pixels=64 * 64, max_pixels=256 * 256)
        processor = ImageOnlyQwen3VLProcessor(image_processor, tok, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return Qwen3VLForConditionalGeneration(config), processor
