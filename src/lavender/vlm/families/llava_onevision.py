"""LLaVA-OneVision (``llava_onevision``) and LLaVA-NeXT (``llava_next``): "anyres" crops with row separators.

Watched modules: ``language_model.layers[i].self_attn``; default subset
:func:`~lavender.vlm.families.base.middle_layers` (OneVision-7B's Qwen2, 28 layers → 6 of them
mid-stack). The image tokens sit in the language model's self-attention, as in LLaVA-1.5.

Geometry of one image (the processor and the model agree on it; we recompute it from the original
image size and the processor's settings, then check the token count):

1. The image is resized, aspect kept, into the ``image_grid_pinpoints`` resolution that
   ``select_best_resolution`` picks (OneVision-7B: multiples of 384 up to 6×6 crops; NeXT: 336-px
   crops up to 2×2 / 1×3), centred on a zero canvas of that resolution, and cut into ``rows×cols``
   crops row-major. A BASE view, the whole image squashed to one crop, comes first.
2. Each view gives ``s×s`` tokens (OneVision SigLIP-384/14: 27×27; NeXT CLIP-336/14: 24×24, CLS
   dropped). The crops' tokens are stitched into one ``(rows·s)×(cols·s)`` canvas grid; the model
   then UNPADS it: it drops, in whole token rows (or columns), the canvas padding it expects from the
   original aspect ratio, symmetrically (``unpad_image``).
3. OneVision only (``anyres_max_N``, the released checkpoints N = 9): if the unpadded grid has more
   than ``1.1² · N · s²`` tokens it is resized bilinearly to ``int(h/ratio) × int(w/ratio)``; a
   resized grid spans the same region (bilinear, ``align_corners=False``), so only its shape changes.
4. One ``image_newline`` token ends every grid row. All of these — base view, grid, newlines — are
   ``<image>`` placeholders in ``input_ids`` (``config.image_token_id``), in the order
   ``base (s²) | row 0 (cols) newline | row 1 (cols) newline | …``.

Decisions: the grid is the unpadded high-resolution grid; the BASE (global) view is DROPPED (it is
a second, coarser copy of the same image, as Idefics3's global view; one image-wide grid cannot hold
both), and the newline separators are dropped (they are not image regions; they remain image
placeholders, so never words). ``covers`` is the unpadded grid's extent in ORIGINAL pixels: whole
token rows of the canvas mapped back through the processor's centred placement, so it can reach a
fraction of a token beyond the image where the model's unpadding kept some canvas padding (or
slightly inside it where the model cut image rows; :func:`lavender.vlm.grid.to_frame` zeroes
frame pixels outside). OneVision records with SEVERAL images per sample are not cropped at all
(the processor's and model's ``batch_num_images``): each image is padded to a square (centred,
mean-colour) and resized to one view of ``s×s`` tokens plus one newline; that view is the grid and
``covers`` is the padded square. LLaVA-NeXT crops every image, one or several per sample.

Crops that are not a multiple of the patch: released OneVision's SigLIP-384/14 gives ``s = 27`` tokens
that read ``27·14 = 378`` px of each 384-px crop (the patch conv drops the last 6 px). The tokens are
then not evenly spaced over the canvas (a 6-px gap at every crop seam), and ONE uniform grid cannot
represent that gap: ``covers`` is the least-squares uniform fit of the tokens' centres
(:func:`token_span`) — exact inside one view, and over several crops centred with a pitch near
``crop/s``, off by at most about half the gap (released OneVision: ≤ 0.24 cell; the crop-wide pitch
``crop/s`` alone was off by up to 0.43). A one-view grid (multi-image view, thin-image base view)
covers the top-left ``s·patch/crop`` of its box (:func:`read_part`). When the crop is a multiple of the
patch (every released LLaVA-NeXT: 336 = 24·14; the tiny models) the grid is exact and unchanged.

A very thin image (300×20 on the tiny model, whose canvases are at most 12 tokens wide; beyond 162:1
on the released OneVision, 6 crops × 27 tokens) can lose ALL its grid rows to the model's whole-
token unpadding (it rounds the image's height in tokens down to 0 and cuts the padding around it):
the model then sees only the base view (plus newlines if columns remain), and so does Lavender: the
grid is the base view, ``s×s`` over the whole image squashed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlavaOnevisionProcessor

from lavender.vlm.families._tokens import image_token_positions
from lavender.vlm.families.base import Family, ImageGrid, config_value, image_token_id, register_family
from lavender.vlm.tiny import load_image_only_processor


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor (which needs torchvision): images only.

    Without torchvision ``AutoProcessor`` returns a bare tokenizer for a OneVision folder; this class
    loads the same saved files (tokenizer, PIL image processor, ``processor_config.json``)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def token_span(t0: int, t1: int, crop: int, side: int, patch: int) -> tuple[float, float]:
    """Canvas pixels ``(start, end)`` spanned by a UNIFORM grid over tokens ``t0 … t1-1`` of one axis of
    stitched crops, fitted to where the model's tokens read.

    Token ``i`` reads the ``patch`` px at ``(i % side)·patch`` of crop ``i // side``: the patch conv
    covers ``side·patch`` px of each crop and drops the last ``crop - side·patch`` (released OneVision,
    SigLIP-384/14: 27 tokens over 378 of 384 px). When the crop is a multiple of the patch (every
    released LLaVA-NeXT, the tiny models) that is exact: ``t·crop/side``. Otherwise the tokens'
    centres are not evenly spaced (a gap at every crop seam), which no uniform grid holds: the span is
    the least-squares line through the centres (one view: exact, pitch ``patch``; several crops: pitch
    near ``crop/side``, centred, off by at most about half the gap).
    """
    if crop == side * patch or t1 <= t0:
        return t0 * crop / side, t1 * crop / side
    centres = [i // side * crop + (i % side + 0.5) * patch for i in range(t0, t1)]
    n = t1 - t0
    mid_i, mid_x = (t0 + t1 - 1) / 2, sum(centres) / n
    var = sum((i - mid_i) ** 2 for i in range(t0, t1))
    pitch = sum((i - mid_i) * (x - mid_x) for i, x in zip(range(t0, t1), centres)) / var if n > 1 else patch
    return mid_x - pitch * n / 2, mid_x + pitch * n / 2


def anyres_layout(width: int, height: int, pinpoints: Sequence[Sequence[int]], crop: int, side: int,
                  max_crops: int | None, patch: int | None = None) -> tuple[int, int, tuple[float, float, float, float]]:
    """``(rows, cols, covers)`` of the stitched, unpadded high-resolution token grid of one image.

    Args:
        width, height: the original image size.
        pinpoints: the processor's ``image_grid_pinpoints`` (``[height, width]`` each).
        crop: the crop side in pixels (the vision encoder's input side).
        side: tokens per crop side (``crop // patch``).
        max_crops: OneVision's ``anyres_max_N`` N (the grid is shrunk beyond ``N`` crops' worth of
            tokens); ``None`` for LLaVA-NeXT.
        patch: the vision patch side; when ``crop`` is not a multiple of it the tokens read only
            ``side·patch`` px of each crop (:func:`token_span`). ``None``: ``crop / side`` (exact crops).
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    t_h, t_w = best_h // crop * side, best_w // crop * side  # token canvas before unpadding
    # the processor's aspect-kept resize into the canvas (get_patch_output_size), pasted centred
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    # the model's unpadding, in whole tokens, from the original aspect ratio only
    r0, r1, c0, c1 = 0, t_h, 0, t_w
    if width / height > t_w / t_h:
        pad = (t_h - int(round(height * t_w / width, 7))) // 2
        r0, r1 = pad, t_h - pad
    else:
        pad = (t_w - int(round(width * t_h / height, 7))) // 2
        c0, c1 = pad, t_w - pad
    if patch is None or crop == side * patch:
        px, py = best_w / t_w, best_h / t_h  # canvas pixels per token
        x0, x1, y0, y1 = c0 * px, c1 * px, r0 * py, r1 * py
    else:  # the tokens read side·patch px of each crop: the grid fitted to them
        (x0, x1), (y0, y1) = token_span(c0, c1, crop, side, patch), token_span(r0, r1, crop, side, patch)
    covers = ((x0 - paste_x) * width / new_w, (y0 - paste_y) * height / new_h,
              (x1 - paste_x) * width / new_w, (y1 - paste_y) * height / new_h)
    rows, cols = r1 - r0, c1 - c0
    if max_crops is not None:
        ratio = math.sqrt(rows * cols / (max_crops * side * side))
        if ratio > 1.1:  # bilinear resize of the whole grid: same region, fewer tokens
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols, covers


def padded_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The square (in original pixels) that OneVision's multi-image ``pad_to_square`` makes: the image
    centred on a ``max(W, H)`` square, offset ``(max - short) // 2``."""
    side = max(width, height)
    if width > height:
        start = (side - height) // 2
        return 0.0, float(-start), float(width), float(side - start)
    start = (side - width) // 2
    return float(-start), 0.0, float(side - start), float(height)


def read_part(box: tuple[float, float, float, float], crop: int, side: int,
              patch: int | None) -> tuple[float, float, float, float]:
    """The part of ``box`` (squashed into one ``crop``-px view) that the view's tokens read: its top-left
    ``side·patch / crop`` (the patch conv drops the rest); ``box`` itself when the crop is exact."""
    if patch is None or crop == side * patch:
        return box
    x0, y0, x1, y1 = box
    f = side * patch / crop
    return x0, y0, x0 + (x1 - x0) * f, y0 + (y1 - y0) * f


@register_family
class LlavaOnevisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"
    #: OneVision shrinks large grids (``anyres_max_N``); LLaVA-NeXT does not
    shrinks_grid = True
    #: OneVision does not crop images of multi-image samples; LLaVA-NeXT crops every image
    multi_image_unsplit = True

    def _settings(self, config: Any, processor: Any) -> tuple[list, int, int, int | None, int]:
        """``(pinpoints, crop, side, max_crops, patch)`` from the processor (what made the tokens),
        else from the config (the same values in every released checkpoint)."""
        vision = config_value(config, "vision_config")
        crop, patch = int(config_value(vision, "image_size")), int(config_value(vision, "patch_size"))
        pinpoints = config_value(config, "image_grid_pinpoints")
        aspect = config_value(config, "vision_aspect_ratio", "anyres_max_9")
        if processor is not None:
            ip = processor.image_processor
            pinpoints = ip.image_grid_pinpoints
            crop = int((ip.crop_size or {}).get("height") or ip.size.get("height") or ip.size["shortest_edge"])
            aspect = getattr(processor, "vision_aspect_ratio", aspect)
        max_crops = int(aspect.removeprefix("anyres_max_")) if self.shrinks_grid else None
        return [list(p) for p in pinpoints], crop, crop // patch, max_crops, patch

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        pinpoints, crop, side, max_crops, patch = self._settings(config, processor)
        base = side * side
        # the processor's per-sample image counts decide cropping (they skip samples without images;
        # a flat image list counts 1 per image); without them, the images given per sample
        nums = inputs.get("batch_num_images") if hasattr(inputs, "get") else None
        nums = iter([int(n) for n in nums]) if nums is not None else None
        layouts = []  # per sample, per image: (rows, cols, covers, cropped)
        for sizes in image_sizes:
            n = (next(nums, len(sizes)) if nums is not None else len(sizes)) if sizes else 0
            unsplit = self.multi_image_unsplit and n != 1
            layouts.append([(side, side, read_part(padded_square_box(int(w), int(h)), crop, side, patch), False)
                            if unsplit
                            else (*anyres_layout(int(w), int(h), pinpoints, crop, side, max_crops, patch), True)
                            for w, h in sizes])
        counts = [[base + r * (c + 1) if cropped else base + 1 for r, c, _, cropped in s] for s in layouts]
        try:
            positions = image_token_positions(inputs["input_ids"], token, counts)
        except ValueError as e:
            raise ValueError(f"{e} ({self.name}: layouts {[[(r, c) for r, c, _, _ in s] for s in layouts]} from "
                             f"pinpoints {pinpoints}, crop {crop}; pass the processor so its settings are used)"
                             ) from None
        grids = []
        for b, sizes in enumerate(image_sizes):
            for pos, (rows, cols, covers, cropped), (w, h) in zip(positions[b], layouts[b], sizes):
                if cropped and rows * cols > 0:  # base view first (dropped), then grid rows, each + newline
                    key = pos[base:].view(rows, cols + 1)[:, :cols].reshape(-1)
                elif cropped:  # unpadding left no grid (a very thin image): the base view, squashed
                    key, rows, cols = pos[:base], side, side
                    covers = read_part((0.0, 0.0, float(w), float(h)), crop, side, patch)
                else:  # one view, then one newline
                    key = pos[:base]
                grids.append(ImageGrid(b, key, rows, cols, covers, (int(w), int(h))))
        return grids

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """OneVision's standard processor needs torchvision (its video processor); else our subclass."""
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return load_image_only_processor(path, ImageOnlyLlavaOnevisionProcessor, LlavaOnevisionImageProcessorPil,
                                         **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny LLaVA-OneVision: SigLIP 28/7 → 4×4 tokens per view; crops of 28 px on pinpoints up to
        3×3 (the released 6×6 of 384, scaled down) with ``anyres_max_4`` (released: 9), so both a
        plain and a shrunk grid occur; Qwen2 text model of 4 layers, hidden 64."""
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            SiglipVisionConfig,
        )
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        tok = tokenizer or build_tokenizer(["<image>", "<video>"], simple_chat_template("<image>"))
        crop, patch, aspect = 28, 7, "anyres_max_4"
        pinpoints = [[crop * r, crop * c] for r in (1, 2, 3) for c in (1, 2, 3)]
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=crop, patch_size=patch)
        text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                      vision_aspect_ratio=aspect, vision_feature_select_strategy="full",
                                      vision_feature_layer=-1, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      video_token_index=tok.convert_tokens_to_ids("<video>"))
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop},
                                                          image_grid_pinpoints=pinpoints)
        processor = ImageOnlyLlavaOnevisionProcessor(
            image_processor, tok, num_image_tokens=(crop // patch) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio=aspect, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return LlavaOnevisionForConditionalGeneration(config), processor


@register_family
class LlavaNextFamily(LlavaOnevisionFamily):
    """LLaVA-NeXT (LLaVA-1.6): the same anyres layout without OneVision's grid shrinking; every
    image is cropped (also in multi-image samples); CLIP with the CLS token dropped."""

    name = "llava_next"
    model_types = ("llava_next",)
    shrinks_grid = False
    multi_image_unsplit = False

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        return Family.load_processor(self, path, **kwargs)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny LLaVA-NeXT: CLIP 28/7 → 4×4 tokens per view (+CLS, dropped); the released pinpoints
        (336 × {1×2, 2×1, 2×2, 1×3, 3×1}) scaled to 28-px crops; Llama text model of 4 layers."""
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextProcessor,
        )
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        from lavender.vlm.tiny import build_tokenizer, simple_chat_template

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        tok = tokenizer or build_tokenizer(["<image>"], simple_chat_template("<image>"))
        crop, patch = 28, 7
        pinpoints = [[crop * r, crop * c] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=crop, patch_size=patch, projection_dim=32)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                 vision_feature_select_strategy="default", vision_feature_layer=-2,
                                 image_token_index=tok.convert_tokens_to_ids("<image>"))
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                                     crop_size={"height": crop, "width": crop},
                                                     image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor, tok, patch_size=patch, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=tok.chat_template)
        torch.manual_seed(seed)
        return LlavaNextForConditionalGeneration(config), processor
