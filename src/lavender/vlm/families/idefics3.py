"""Idefics3 and SmolVLM: image splitting, image tokens in the text model's self-attention.

Watched modules: ``text_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (about 1/5 of the layers, evenly spaced over the
middle half: Idefics3-8B's 32 layers → 8, 11, 14, 18, 21, 24).

Geometry: the image processor resizes the image so its longest edge is ``size.longest_edge``
(aspect kept), then stretches it to ``rows·M × cols·M`` (``M = max_image_size.longest_edge``,
the vision encoder's input size) and cuts ``rows × cols`` crops row-major, plus one GLOBAL view
(the whole image squashed to ``M × M``). Each view becomes ``k × k`` tokens after the pixel
shuffle (``k = M / patch / scale_factor``; Idefics3: 13), row-major. We stitch the crops into one
``(rows·k) × (cols·k)`` grid covering the whole image; the global view is NOT part of the grid
(its tokens are a second, coarser copy of the image). Every image is first resized so its long
side is ``size.longest_edge`` (4·M with the released settings, small images scaled UP), so with
those settings every image is split; only when that resize leaves both sides ≤ ``M`` (a
``longest_edge`` ≤ M, or splitting turned off) is the grid the single global view.

``rows``/``cols`` are recomputed from the original image size with the processor's own resize
rules (the processor drops them from its output), then checked against the number of image
tokens, so a wrong ``image_sizes`` or processor setting fails loudly instead of shearing the grid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import SmolVLMProcessor

from lavender.vlm.families._tokens import image_token_positions
from lavender.vlm.families.base import (
    Family,
    ImageGrid,
    image_token_id,
    register_family,
)
from lavender.vlm.tiny import load_image_only_processor


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """``SmolVLMProcessor`` without the video processor (which needs torchvision); images only."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def split_layout(width: int, height: int, longest_edge: int, crop: int) -> tuple[int, int]:
    """``(rows, cols)`` of crops the Idefics3 image processor cuts from a ``width``×``height`` image.

    Mirrors ``Idefics3ImageProcessor``: longest edge → ``longest_edge`` (other side ``int``-ed and
    made even), then each side rounded UP to a multiple of ``crop``; ``(0, 0)`` = not split.
    """
    aspect = width / height
    if width >= height:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    # resize_for_vision_encoder: the long side is rounded up first, the other follows the aspect
    if w >= h:
        a = w / h
        w = math.ceil(w / crop) * crop
        h = math.ceil(int(w / a) / crop) * crop
    else:
        a = w / h
        h = math.ceil(h / crop) * crop
        w = math.ceil(int(h * a) / crop) * crop
    if h > crop or w > crop:
        return (h - crop) // crop + 1, (w - crop) // crop + 1
    return 0, 0


@register_family
class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    cross_attention = False
    lora_target_regex = r".*text_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?text_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        crop = int(config.vision_config.image_size)
        k = crop // int(config.vision_config.patch_size) // int(config.scale_factor)  # tokens per view side
        if processor is not None:
            ip = processor.image_processor
            crop = int(ip.max_image_size["longest_edge"])
            longest = int(ip.size["longest_edge"])
            splitting = bool(ip.do_image_splitting)
        else:  # the hub checkpoints' defaults: splitting on, longest edge 4 crops
            longest, splitting = 4 * crop, True
        layouts = [[split_layout(w, h, longest, crop) if splitting else (0, 0) for w, h in sizes]
                   for sizes in image_sizes]
        counts = [[(r * c + 1) * k * k for r, c in sample] for sample in layouts]
        try:
            positions = image_token_positions(inputs["input_ids"], token, counts)
        except ValueError as e:
            raise ValueError(f"{e} (crop layouts {layouts} assumed size.longest_edge={longest}; pass the "
                             f"processor to image_grids so its resize settings are used)") from None
        grids = []
        for b, sizes in enumerate(image_sizes):
            for pos, (rows, cols), (w, h) in zip(positions[b], layouts[b], sizes):
                if rows == 0:  # not split: the single (global) view is the grid
                    key, rows, cols = pos, 1, 1
                else:
                    # crops row-major, each k×k row-major, global view last (dropped):
                    # (rows, cols, k, k) → (rows, k, cols, k) → (rows·k · cols·k,)
                    key = pos[: rows * cols * k * k].view(rows, cols, k, k).permute(0, 2, 1, 3).reshape(-1)
                grids.append(ImageGrid(b, key, rows * k, cols * k, (0.0, 0.0, float(w), float(h)), (int(w), int(h))))
        return grids

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """Idefics3 loads with ``AutoProcessor``; SmolVLM's processor needs torchvision, else our subclass."""
        model_type = None
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                model_type = json.load(f).get("model_type")
        if model_type == "smolvlm":
            from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

            return load_image_only_processor(path, ImageOnlySmolVLMProcessor, SmolVLMImageProcessorPil, **kwargs)
        return super().load_processor(path, **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny Idefics3: 56-px crops of 8×8 7-px patches → 4×4 tokens per view; ≤ 2×2 crops + global."""
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")

        specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
        specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
        tok = tokenizer or build_tokenizer(specials, simple_chat_template("<image>"))
        config = Idefics3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=56, patch_size=7),
            text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
            scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
        )
        image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
        processor = Idefics3Processor(image_processor, tok, image_seq_len=16, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return Idefics3ForConditionalGeneration(config), processor
