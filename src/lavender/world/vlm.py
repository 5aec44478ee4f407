"""The world's VLM: a small Mllama (cross-attention) or LLaVA (self-attention) pre-trained on scenes.

Real Llama-3.2-Vision weights cannot be downloaded here, so the demo needs a VLM that has learnt to
SEE the miniature world before Stage 2 fine-tunes it. This module builds one of the real transformers
architectures at world size, pre-trains it from scratch on in-memory scenes (no disk I/O), saves it
with ``save_pretrained`` + the family's processor (so :func:`lavender.trainer.load_vlm` and
``AutoModelForImageTextToText`` load it like a hub checkpoint), and evaluates greedy VQA answers.

Sizes (see :class:`WorldVLMConfig`): a 64-px image is ONE tile of 8×8-px patches, an 8×8 grid of
image tokens. Objects are 14–28 px, so even a small one covers about 2×2 cells and every object has
at least one cell of its own colour; the 32×32 DM maps are pooled 4×4 onto it. A 16×16 grid (4-px
patches) quadruples the vision tower's tokens (and 16× its attention cost) for no gain in telling
objects apart at this density (≤ 4 objects, ≥ 2 px apart).

What pre-training sees (docs/world_vlm.md): every step draws a fresh batch of train-split scenes
from ``numpy.random.default_rng([seed, 0x564C4D, step])`` — a stream disjoint from the written
records (``record_rng`` seeds with four numbers) — and trains on ``"<image>Describe the image."`` →
its caption, the caption rows' shape. With ``vqa_fraction > 0`` that share of each batch instead
asks one question of the SEEN templates about the scene (the OOD paraphrases are never used).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

ARCHS = ("mllama", "llava")
_DATA_STREAM = 0x564C4D  # "VLM": the pre-training stream's tag in the seed sequence
_EVAL_STREAM = 0x564C45  # held-out caption scenes for token accuracy
STATE_DIR = "training_state"  # resumable state inside OUT; removed when the run completes
METRICS = "pretrain_metrics.jsonl"
RECIPE = "pretrain_recipe.json"


@dataclass(frozen=True)
class WorldVLMConfig:
    """Shape of the world VLM. Defaults: ~2.5 M parameters, ~0.1 s per sample step on one CPU thread.

    Attributes:
        patch_size: pixels per patch side; 64 / patch_size image tokens per side (8 → an 8×8 grid).
        vision_hidden, vision_layers: the vision tower (Mllama: ``vision_layers`` local layers plus
            ``vision_global_layers`` gated global ones; LLaVA: a CLIP encoder of that depth).
        text_hidden, text_layers, heads, kv_heads: the Llama text model.
        cross_layers: Mllama's cross-attention layers (indices into ``text_layers``; they replace
            self-attention there, as in Llama-3.2-Vision). Unused by LLaVA.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_global_layers: int = 1
    text_hidden: int = 160
    text_layers: int = 6
    cross_layers: tuple[int, ...] = (1, 4)
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: int = 3


def _tokenizer(image_token: str, specials: Sequence[str]) -> Any:
    """The tiny word-level tokenizer with every world word (and the caption prompt's) kept whole."""
    from lavender.records import CAPTION_PROMPT
    from lavender.vlm.tiny import build_tokenizer, simple_chat_template
    from lavender.words import split_words
    from lavender.world.questions import vocabulary

    words = [*vocabulary(), *(w.text.lower() for w in split_words(CAPTION_PROMPT))]
    return build_tokenizer(list(specials), simple_chat_template(image_token),
                           extra_words=[w for w in words if w.isalnum()])


def build_world_vlm(arch: str = "mllama", config: WorldVLMConfig | None = None, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised world VLM and its processor: ``(model, processor)``.

    Built offline (no hub): the family's real transformers classes with the world's tokenizer.
    """
    cfg = config or WorldVLMConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"patch_size={cfg.patch_size} must divide image_size={cfg.image_size}")
    torch.manual_seed(seed)
    if arch == "mllama":
        return _build_mllama(cfg)
    if arch == "llava":
        return _build_llava(cfg)
    raise ValueError(f"unknown arch {arch!r}; the world VLM is one of {ARCHS}")


def _build_mllama(cfg: WorldVLMConfig) -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _tokenizer("<|image|>", ["<|image|>", "<|python_tag|>"])
    # transformers' Mllama requires max_num_tiles = 4 and pads every image to 4 tiles, so a 64-px
    # image is cut into 2×2 tiles of 32 px (no resize, no padding tile): 4 × (4×4 patches + CLS)
    tile = cfg.image_size // 2
    inter = list(range(0, cfg.vision_layers, 2))  # intermediate features, concatenated to the output
    vision = MllamaVisionConfig(
        hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_global_layers=cfg.vision_global_layers, attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_ratio * cfg.vision_hidden, image_size=tile,
        patch_size=cfg.patch_size, max_num_tiles=4, intermediate_layers_indices=inter,
        vision_output_dim=cfg.vision_hidden * (len(inter) + 1))
    bad = [i for i in cfg.cross_layers if not 0 <= i < cfg.text_layers]
    if bad:
        raise ValueError(f"cross_layers {bad} outside the {cfg.text_layers} text layers")
    text = MllamaTextConfig(
        vocab_size=len(tok), hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.mlp_ratio * cfg.text_hidden, cross_attention_layers=list(cfg.cross_layers),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=256)
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor, tok, chat_template=tok.chat_template)
    return MllamaForConditionalGeneration(config), processor


def _build_llava(cfg: WorldVLMConfig) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer("<image>", ["<image>"])
    side = cfg.image_size // cfg.patch_size
    # +1 layer: LLaVA reads the penultimate layer (vision_feature_layer=-2), so the last is unused
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.mlp_ratio * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers + 1, num_attention_heads=cfg.heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size,
                              projection_dim=cfg.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.text_hidden,
                       intermediate_size=cfg.mlp_ratio * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=side * side,
                         vision_feature_layer=-2, image_token_index=tok.convert_tokens_to_ids("<image>"))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                            crop_size={"height": cfg.image_size, "width": cfg.image_size})
    processor = LlavaProcessor(image_processor, tok, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=tok.chat_template)
    return LlavaForConditionalGeneration(config), processor
