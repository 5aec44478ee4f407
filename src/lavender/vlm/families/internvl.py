"""InternVL (``internvl``; InternVL3 / InternVL3.5 ``-hf`` checkpoints): dynamic tiles + thumbnail, pixel shuffle.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (InternVL3-8B's Qwen2.5-7B, 28 layers → 7, 10, 13,
15, 18, 21). The image tokens (``<IMG_CONTEXT>``, ``config.image_token_id``) sit in the language
model's self-attention.

Geometry of one image:

1. The image processor (``GotOcr2ImageProcessor``, ``crop_to_patches`` on in ``InternVLProcessor``)
   picks the ``cols × rows`` tile arrangement (``min_patches ≤ cols·rows ≤ max_patches``; released:
   1..12) whose aspect ratio is closest to the image's, STRETCHES the whole image to
   ``cols·T × rows·T`` (``T`` = 448; no padding, no crop: the aspect ratio is not kept exactly) and cuts
   the tiles row-major. When there is more than one tile a THUMBNAIL (the whole image squashed to
   ``T×T``) is appended LAST; a single tile is the whole image and gets no thumbnail.
2. Each tile: InternViT's ``(T/p)²`` patches (CLS dropped), then the pixel shuffle (``downsample_ratio``
   0.5) folds each 2×2 block of patches into one token: ``k×k`` tokens per tile (released 16×16 =
   256 = ``image_seq_length``), row-major, token ``(i, j)`` = patches ``(2i..2i+1, 2j..2j+1)``.
3. The processor writes ``<img>`` + ``<IMG_CONTEXT>`` × (256 · views) + ``</img>`` per image.

Decisions: the tiles are stitched into ONE ``(rows·k) × (cols·k)`` grid covering the whole original
image, ``covers = (0, 0, W, H)`` (the stretch maps the image onto the tile canvas exactly). The
THUMBNAIL is DROPPED (a coarser second copy of the image, as Idefics3's global view and
LLaVA-OneVision's base view); ``<img>``/``</img>`` are not image keys. An image that gets one tile
is its own ``k×k`` grid over the whole image.

The number of views per image is read from ``input_ids`` (each image's ``<IMG_CONTEXT>`` tokens are
one contiguous run, between ``<img>`` and ``</img>``; the processor drops ``num_patches`` from its
output), and the tile arrangement is recomputed with the image processor's own rule from the original
size; a run that does not match that arrangement fails loudly instead of shearing the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import InternVLProcessor

from lavender.vlm.families.base import Family, ImageGrid, config_value, image_token_id, register_family
from lavender.vlm.tiny import load_image_only_processor


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without its video processor (which needs torchvision): images only.

    Without torchvision ``AutoProcessor`` cannot build the standard class; this one loads the same
    saved files (tokenizer, PIL image processor, ``processor_config.json``)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def _side(value: Any) -> int:
    """A square size given as an int or a ``[h, w]`` pair (InternViT's config uses pairs)."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def image_runs(input_ids: torch.Tensor, token_id: int, n_images: Sequence[int]) -> list[list[torch.Tensor]]:
    """Per sample, the positions of each image's placeholders: its contiguous run of ``token_id``."""
    out = []
    for b, n in enumerate(n_images):
        pos = (input_ids[b] == token_id).nonzero().flatten()
        breaks = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist() if pos.numel() else []
        runs = list(torch.tensor_split(pos, breaks)) if pos.numel() else []
        if len(runs) != n:
            raise ValueError(f"sample {b}: {len(runs)} runs of image tokens (id {token_id}) in input_ids but "
                             f"{n} images; was the text truncated, or do image_sizes not match the images?")
        out.append(runs)
    return out


@register_family
class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        token = image_token_id(config)
        vision = config_value(config, "vision_config")
        tile, patch = _side(config_value(vision, "image_size")), _side(config_value(vision, "patch_size"))
        lo, hi = 1, 12  # the released checkpoints' min/max tiles
        if processor is not None:
            ip = processor.image_processor
            tile, lo, hi = int(ip.size["height"]), int(ip.min_patches), int(ip.max_patches)
        k = int(tile // patch * float(config_value(config, "downsample_ratio", 0.5)))  # tokens per tile side
        runs = image_runs(inputs["input_ids"], token, [len(s) for s in image_sizes])
        grids = []
        for b, sizes in enumerate(image_sizes):
            for pos, (w, h) in zip(runs[b], sizes):
                views, extra = divmod(pos.numel(), k * k)
                cols, rows = get_optimal_tiled_canvas((int(h), int(w)), (tile, tile), lo, hi)
                if views == 1:  # one tile (or tiling off): the whole image, squashed
                    key, rows, cols = pos, 1, 1
                elif extra or views != rows * cols + 1:
                    raise ValueError(f"{self.name}: image {w}×{h} of sample {b} has {pos.numel()} image tokens; "
                                     f"expected {k * k}·({cols}×{rows} tiles + thumbnail) for {tile}-px tiles, "
                                     f"{lo}..{hi} tiles (pass the processor so its settings are used)")
                else:  # tiles row-major, each k×k row-major, thumbnail last (dropped)
                    key = pos[: rows * cols * k * k].view(rows, cols, k, k).permute(0, 2, 1, 3).reshape(-1)
                grids.append(ImageGrid(b, key, rows * k, cols * k, (0.0, 0.0, float(w), float(h)), (int(w), int(h))))
        return grids

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """InternVL's standard processor needs torchvision (its video processor); else our subclass."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return load_image_only_processor(path, ImageOnlyInternVLProcessor, GotOcr2ImageProcessorPil, **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny InternVL: InternViT 56/7 → 8×8 patches, pixel shuffle 0.5 → 4×4 = 16 tokens per tile;
        1..6 tiles of 56 px (released: 1..12 of 448) + thumbnail; Qwen2 text model of 4 layers."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
        from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
        from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        template = None
        if tokenizer is None:
            base = build_tokenizer(list(INTERNVL_TOKENS.values()), simple_chat_template("<IMG_CONTEXT>"))
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token=base.bos_token,
                                                eos_token=base.eos_token, pad_token=base.pad_token,
                                                unk_token=base.unk_token, extra_special_tokens=dict(INTERNVL_TOKENS))
            template = base.chat_template
        tok = tokenizer
        template = template or tok.chat_template
        tile, patch = 56, 7
        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=[tile, tile], patch_size=[patch, patch])
        text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        seq = (tile // patch // 2) ** 2
        config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, image_seq_length=seq,
                                image_token_id=tok.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
                                vision_feature_layer=-1, vision_feature_select_strategy="default")
        image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                                   min_patches=1, max_patches=6)
        processor = ImageOnlyInternVLProcessor(image_processor, tok, image_seq_length=seq, chat_template=template)
        torch.manual_seed(seed)
        return InternVLForConditionalGeneration(config), processor


#: the special tokens InternVLProcessor reads BY NAME from the tokenizer
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
