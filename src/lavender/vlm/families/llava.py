"""LLaVA-1.5 (``llava``): image tokens inside the language model's self-attention.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (about 1/5 of the layers, evenly spaced over
the middle half: 32 layers → 8, 11, 14, 18, 21, 24).

Geometry: the processor expands each ``<image>`` into ``(image_size / patch)²`` placeholder
tokens (24×24 = 576 for CLIP-336/14, CLS dropped by the ``default`` feature strategy), row-major
over the patch grid. CLIP's processor resizes the SHORTEST edge to the crop size and centre-crops a
square: the grid covers only the central square of the original image, which ``covers`` states
(exact when ``size.shortest_edge == crop_size == vision_config.image_size``, as in every LLaVA-1.5
checkpoint). A squash or pad frame on a non-square image therefore has regions the grid never saw;
:func:`lavender.vlm.grid.to_frame` leaves them 0. A ``LlavaImageProcessor`` with ``do_pad=True``
(the original LLaVA-1.5 recipe, "image_aspect_ratio: pad") first pads the image to a centred square:
the grid then covers that square, padding included (``covers`` extends past the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lavender.vlm.families._tokens import square_grids
from lavender.vlm.families.base import (
    Family,
    ImageGrid,
    image_token_id,
    register_family,
)


def clip_center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region ``(x0, y0, x1, y1)`` of a ``width``×``height`` image that CLIP's preprocessing keeps.

    Shortest edge resized to ``size`` (long edge ``int(size · long / short)``, as transformers'
    ``get_resize_output_image_size``), then a ``size``×``size`` centre crop whose offset is
    ``(new_long - size) // 2``; mapped back to original pixels.
    """
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    offset = (new_long - size) // 2
    lo, hi = offset * long / new_long, (offset + size) * long / new_long
    return (lo, 0.0, hi, float(height)) if width >= height else (0.0, lo, float(width), hi)


def pad_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The region of a ``width``×``height`` image that ``LlavaImageProcessor(do_pad=True)`` turns into
    its square: the image padded to ``max(width, height)``, placed at ``(side - short) // 2``."""
    side = max(width, height)
    if width >= height:
        off = (side - height) // 2
        return 0.0, float(-off), float(width), float(side - off)
    off = (side - width) // 2
    return float(-off), 0.0, float(side - off), float(height)


@register_family
class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        size = int(config.vision_config.image_size)
        if processor is not None:  # the crop the processor really makes (LLaVA-1.5: = image_size)
            size = int(processor.image_processor.crop_size["height"])
        side = size // int(config.vision_config.patch_size)  # 24 for CLIP-336/14
        if processor is not None and getattr(processor.image_processor, "do_pad", False):
            return square_grids(inputs["input_ids"], image_sizes, token, side, pad_square_box)
        return square_grids(inputs["input_ids"], image_sizes, token, side,
                            lambda w, h: clip_center_crop_box(w, h, size))

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny LLaVA: CLIP 56/14 → 4×4 = 16 image tokens, Llama text model of 4 layers, hidden 64."""
        import torch
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from lavender.vlm.tiny import TinySizes, build_tokenizer, simple_chat_template

        s = sizes or TinySizes()
        tok = tokenizer or build_tokenizer(["<image>"], simple_chat_template("<image>"))
        side = s.image_size // s.patch_size
        # LLaVA reads the penultimate vision layer (vision_feature_layer=-2): the last one is unused
        vision = CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_mlp or 2 * s.vision_hidden,
                                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                  image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.vision_hidden)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=s.text_hidden,
                           intermediate_size=s.text_mlp or 2 * s.text_hidden, num_hidden_layers=s.text_layers,
                           num_attention_heads=s.text_heads, num_key_value_heads=s.kv_heads,
                           max_position_embeddings=s.max_positions, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=side * side,
                             vision_feature_layer=-2, image_token_index=tok.convert_tokens_to_ids("<image>"))
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": s.image_size},
                                                crop_size={"height": s.image_size, "width": s.image_size})
        processor = LlavaProcessor(image_processor, tok, patch_size=s.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(config), processor

