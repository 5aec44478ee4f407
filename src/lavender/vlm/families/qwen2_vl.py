"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution image tokens in the LLM's self-attention.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (about 1/5 of the layers, evenly spaced over the
middle half: 28 layers → 7, 10, 13, 15, 18, 21).

Geometry: the processor resizes the WHOLE image (``smart_resize``: aspect ratio kept up to rounding
to multiples of 28 px) and cuts it into 14-px patches, ``image_grid_thw[i] = (t, h, w)`` patches;
the vision merger fuses 2×2 neighbours, so the LLM sees ``t·h·w/4`` ``<|image_pad|>`` tokens,
row-major over ``(h/2, w/2)`` (Qwen2.5-VL's window attention is un-permuted after the merger, so
the token order is the same). For a still image ``t = 1``. The grid covers the whole image.

Processor: ``Qwen2VLProcessor`` type-checks a video processor that needs torchvision. Without
torchvision :class:`ImageOnlyQwen2VLProcessor` drops that attribute, and :meth:`load_processor`
rebuilds it from the saved folder (``AutoProcessor`` would return a bare tokenizer there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Qwen2VLProcessor

from lavender.vlm.families._tokens import image_token_positions
from lavender.vlm.families.base import (
    Family,
    ImageGrid,
    image_token_id,
    register_family,
)
from lavender.vlm.tiny import load_image_only_processor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor (which needs torchvision); images only."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


@register_family
class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        merge = int(config.vision_config.spatial_merge_size)
        thw = torch.as_tensor(inputs["image_grid_thw"]).tolist()  # (n_images_in_batch, 3), batch order
        shapes, k = [], 0
        for b, sizes in enumerate(image_sizes):
            shapes.append([])
            for _ in sizes:
                if k >= len(thw):
                    raise ValueError(f"image_sizes lists more images than image_grid_thw has ({len(thw)})")
                t, h, w = thw[k]
                if t != 1:
                    raise ValueError(f"sample {b}: image_grid_thw {thw[k]} has t={t}; only still images are supported")
                shapes[b].append((h // merge, w // merge))
                k += 1
        counts = [[r * c for r, c in s] for s in shapes]
        positions = image_token_positions(inputs["input_ids"], token, counts)
        return [ImageGrid(b, pos, r, c, (0.0, 0.0, float(w), float(h)), (int(w), int(h)))
                for b, sizes in enumerate(image_sizes)
                for pos, (r, c), (w, h) in zip(positions[b], shapes[b], sizes)]

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return load_image_only_processor(path, ImageOnlyQwen2VLProcessor, Qwen2VLImageProcessorPil, **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny Qwen2-VL: 14-px patches merged 2×2, ≤ 16×16 merged tokens, 4 text layers of width 64."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")

        image = "<|vision_start|><|image_pad|><|vision_end|>"
        tok = tokenizer or build_tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
                                           simple_chat_template(image))
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                         "<|video_pad|>")}
        config = Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             # mrope sections (temporal, height, width) must sum to head_dim / 2 = 8
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        # ≤ 224×224 px (16×16 patches, 8×8 merged tokens): small sequences on CPU
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
        processor = ImageOnlyQwen2VLProcessor(image_processor, tok, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return Qwen2VLForConditionalGeneration(config), processor
