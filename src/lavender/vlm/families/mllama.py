"""Mllama (Llama-3.2-Vision): cross-attention from text to vision tokens.

Watched modules: ``language_model.layers[i].cross_attn`` for every ``i`` in
``text_config.cross_attention_layers`` (11B: 3, 8, …, 38); all of them by default (the paper's
Sec. 8 ablation). Their keys are vision tokens only, laid out as
``((image · num_tiles) + tile) · tokens_per_tile + p`` with ``p = 0`` the tile's CLS and
``1 … P²`` the tile's P×P patches row-major (560-px tiles / 14-px patches: P = 40, 1601 tokens).

Geometry (docs/pitfalls.md #1, #2): the processor resizes the image, keeping its aspect ratio, to fit a
canvas of rows×cols tiles chosen by ``aspect_ratio_ids``, and zero-pads bottom/right. We drop
each tile's CLS, place the tiles row-major on the canvas, and crop the canvas to the
``ceil(h/14) × ceil(w/14)`` patches that touch the resized image. ``covers`` is that cropped
grid in original-image pixels (it may extend by < 1 patch beyond ``W``/``H``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lavender.vlm.families.base import Family, ImageGrid, image_token_id, register_family

#: (rows, cols) of tiles for aspect-ratio id k ≥ 1 (index k - 1), for max 4 tiles; 0 = no image.
#: Same order as transformers' ``get_all_supported_aspect_ratios(4)`` (first element = tile rows).
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@register_family
class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    cross_attention = True
    lora_target_regex = r".*language_model\.layers\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.cross_attn"

    def default_layers(self, model: nn.Module) -> list[int]:
        return sorted(self.attention_modules(model))

    def first_text_row(self, input_ids: torch.Tensor, config: Any = None) -> torch.Tensor:
        """First ``<|image|>`` position per sample (``T`` when there is none): earlier rows see no image."""
        is_image = input_ids == image_token_id(config)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return torch.where(is_image, positions, input_ids.shape[1]).min(dim=1).values

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )

        patch = int(config.vision_config.patch_size) if config is not None else 14  # every Llama-3.2-Vision
        pixel_values = inputs["pixel_values"]  # (B, n_images, num_tiles, 3, tile, tile)
        aspect_ids = torch.as_tensor(inputs["aspect_ratio_ids"])  # (B, n_images)
        num_tiles, tile = pixel_values.shape[2], pixel_values.shape[-1]
        side = tile // patch  # patches per tile side
        per_tile = side * side + 1  # + CLS
        grids = []
        for b, sizes in enumerate(image_sizes):
            for j, (width, height) in enumerate(sizes):
                aid = int(aspect_ids[b, j])
                if aid < 1:
                    raise ValueError(f"sample {b}, image {j}: aspect_ratio_id is 0 (no image was processed there)")
                if aid > len(ASPECT_RATIOS):
                    raise ValueError(f"sample {b}, image {j}: aspect_ratio_id {aid} needs more than 4 tiles "
                                     "(max_image_tiles > 4); the released checkpoints use 4, the only layout mapped")
                tile_rows, tile_cols = ASPECT_RATIOS[aid - 1]
                canvas = get_optimal_tiled_canvas(height, width, num_tiles, tile)
                if tuple(canvas) != (tile_rows * tile, tile_cols * tile):
                    raise ValueError(
                        f"sample {b}, image {j}: image_sizes says {width}x{height} px, which the processor would "
                        f"tile as {canvas[0] // tile}x{canvas[1] // tile}, but aspect_ratio_id {aid} is "
                        f"{tile_rows}x{tile_cols}: pass the ORIGINAL (W, H) of each image, in order")
                new_h, new_w = get_image_size_fit_to_canvas(height, width, canvas[0], canvas[1], tile)
                rows, cols = math.ceil(new_h / patch), math.ceil(new_w / patch)  # crop canvas padding
                r = torch.arange(rows).view(-1, 1)
                c = torch.arange(cols).view(1, -1)
                tile_idx = (r // side) * tile_cols + (c // side)  # (rows, cols), row-major over tiles
                key = ((j * num_tiles + tile_idx) * per_tile + 1 + (r % side) * side + (c % side)).reshape(-1)
                covers = (0.0, 0.0, float(cols * patch * width / new_w), float(rows * patch * height / new_h))
                grids.append(ImageGrid(b, key, rows, cols, covers, (int(width), int(height))))
        return grids

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny Mllama: 56-px tiles of 4×4 patches (+ CLS = 17 tokens), ≤ 4 tiles, 4 text layers (1, 3 cross)."""
        import torch
        from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
        from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        from lavender.vlm.tiny import TinySizes, build_tokenizer, simple_chat_template

        s = sizes or TinySizes()
        tok = tokenizer or build_tokenizer(["<|image|>", "<|python_tag|>"], simple_chat_template("<|image|>"))
        inter = list(range(s.vision_layers) if s.vision_intermediate is None else s.vision_intermediate)
        vision = MllamaVisionConfig(
            hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers, num_global_layers=s.vision_global_layers,
            attention_heads=s.vision_heads, intermediate_size=s.vision_mlp or 2 * s.vision_hidden,
            image_size=s.image_size, patch_size=s.patch_size, max_num_tiles=4, intermediate_layers_indices=inter,
            vision_output_dim=s.vision_hidden * (len(inter) + 1))
        bad = [i for i in s.cross_layers if not 0 <= i < s.text_layers]
        if bad:
            raise ValueError(f"cross_layers {bad} outside the {s.text_layers} text layers")
        text = MllamaTextConfig(
            vocab_size=len(tok), hidden_size=s.text_hidden, num_hidden_layers=s.text_layers,
            num_attention_heads=s.text_heads, num_key_value_heads=s.kv_heads,
            intermediate_size=s.text_mlp or 2 * s.text_hidden, cross_attention_layers=list(s.cross_layers),
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            max_position_embeddings=s.max_positions)
        config = MllamaConfig(vision_config=vision, text_config=text,
                              image_token_index=tok.convert_tokens_to_ids("<|image|>"))
        image_processor = MllamaImageProcessorPil(size={"height": s.image_size, "width": s.image_size},
                                                  max_image_tiles=4)
        processor = MllamaProcessor(image_processor, tok, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return MllamaForConditionalGeneration(config), processor
