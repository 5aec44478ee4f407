"""The contract of a model family: what to watch, which keys are image tokens, where they sit.

A family answers three questions about one VLM architecture, and nothing else:

1. Which attention modules to watch (``attention_modules``; default subset ``default_layers``).
2. Which key positions of those modules' attention are image tokens, for each image of each sample.
3. How those positions lie on ONE image-wide spatial grid, and which region of the ORIGINAL image
   that grid covers (``ImageGrid.covers``), so :mod:`lavender.vlm.grid` can bring the grid into the
   attention dataset's frame (squash / pad / center-crop) at 32×32.

Adding a family = one file in this folder decorated with :func:`register_family` + a geometry test
with an index image. The capture backend, aggregation, Aligner, loss and trainer never branch on
the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ImageGrid:
    """Where one image's tokens sit among the watched keys, and what part of the image they cover.

    Attributes:
        batch_index: the sample of the batch the image belongs to.
        key_index: ``(rows * cols,)`` long tensor of key positions in the watched attention,
            row-major over the grid (``key_index[r * cols + c]`` is grid cell ``(r, c)``).
        rows, cols: the grid's shape.
        covers: ``(x0, y0, x1, y1)`` in original-image pixels: the region the whole grid spans.
            A grid over the full image is ``(0, 0, W, H)``; LLaVA's centre crop covers the central
            square; a grid that also spans canvas padding extends beyond ``W``/``H``.
        image_size: ``(W, H)`` of the original image.
    """

    batch_index: int
    key_index: torch.Tensor
    rows: int
    cols: int
    covers: tuple[float, float, float, float]
    image_size: tuple[int, int]


class Family(ABC):
    """One VLM architecture. Subclasses are stateless; one instance is registered per name."""

    name: str = ""
    #: ``config.model_type`` values this family handles.
    model_types: tuple[str, ...] = ()
    #: True when the watched modules are cross-attention (keys are image tokens only).
    cross_attention: bool = False
    #: regex (``re.fullmatch`` on module names) of LoRA targets: the language model's projections.
    lora_target_regex: str = ""

    # --- modules -----------------------------------------------------------------------------
    #: regex (``re.fullmatch`` on module names, group 1 = layer number) of the watchable attention
    #: modules of the language model.
    attention_pattern: str = ""

    def attention_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """All watchable attention modules of the language model, keyed by their ``layer_idx``."""
        return modules_by_layer(model, self.attention_pattern)

    def default_layers(self, model: nn.Module) -> list[int]:
        """The layers watched when the user does not choose: about 1/5 of the layers, mid-stack
        (:func:`middle_layers`); cross-attention families override it (Mllama: all of them)."""
        return middle_layers(len(self.attention_modules(model)))

    def text_config_name(self) -> str:
        """Name of the text sub-config whose attention implementation the capture backend replaces."""
        return "text_config"

    # --- tokens and geometry ------------------------------------------------------------------
    @abstractmethod
    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        """The grid of every image in a processed batch.

        Args:
            inputs: the processor's output for the batch (``input_ids``, ``pixel_values``, …).
            image_sizes: per sample, the ``(W, H)`` of each original image, in order.
            config: the model's config (``model.config``). Needed by the self-attention families
                to know the image token id (tiny and real models differ); families raise a
                clear error when it is required and missing.
            processor: the processor that made ``inputs``. Only Idefics3/SmolVLM use it (its
                resize settings decide the crop layout); pass it whenever you have it.
        """

    def first_text_row(self, input_ids: torch.Tensor, config: Any = None) -> torch.Tensor:
        """Per sample, the first query row whose attention to the image is meaningful (default 0).

        Mllama overrides it: rows before the first ``<|image|>`` token attend uniformly by design.
        """
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    def image_token_mask(self, input_ids: torch.Tensor, config: Any = None) -> torch.Tensor:
        """``(B, T)`` bool: positions of ``input_ids`` that are image placeholders (never words).

        The default marks ``config.image_token_id`` (every supported family's config has it).
        """
        return input_ids == image_token_id(config)

    # --- processors and tiny models -----------------------------------------------------------
    def encode(self, processor: Any, texts: Sequence[str], images: Any,
               answer_starts: Sequence[int | None] | None = None, **kwargs: Any) -> Any:
        """The processor's batch for chat texts rendered with the family's template.

        Args:
            texts: rendered conversations (:func:`lavender.chat.render`).
            images: per sample, its images (or None).
            answer_starts: per text, the character offset of its first trained token (the first
                assistant turn's label span), None for a prompt without an answer. The default
                ignores it; a prefix-LM (PaliGemma) must hand its processor the answer apart, so that it
                is the causal suffix and never inside the bidirectional prefix.
            kwargs: the processor's options (padding, return_tensors, add_special_tokens).
        """
        return processor(text=list(texts), images=images, **kwargs)

    def record_layout(self, processor: Any, messages: Sequence[dict[str, Any]], n_images: int) -> Any:
        """The :class:`lavender.chat.Layout` of one training record (the collator's per-record step).

        Raises ``ValueError`` (one line) for a record this family cannot encode: the collator skips
        that record with the reason and keeps the rest of the batch. The default renders the
        messages as they are; a family whose :meth:`encode` needs more of each sample (PaliGemma's
        prefix-LM) checks it here, where a bad record is skipped, not in :meth:`encode`, where it
        fails the whole batch.
        """
        from lavender.chat import layout

        return layout(processor, messages)

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        """The processor saved with a model (families that need more than ``AutoProcessor`` override)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)

    @abstractmethod
    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """A tiny randomly initialised model of this architecture and its processor (offline).

        Args:
            sizes: :class:`lavender.vlm.tiny.TinySizes` (default: the test models' sizes).
            tokenizer: the tokenizer to use (default: :func:`lavender.vlm.tiny.build_tokenizer` with
                this family's special tokens); the miniature world passes its own.
            seed: ``torch.manual_seed`` right before the weights are created.
        """

    def make_tiny(self, out: str, seed: int = 0, sizes: Any = None, tokenizer: Any = None) -> None:
        """Write :meth:`build_tiny`'s model and processor to ``out`` (the ``save_pretrained`` layout)."""
        from lavender.vlm.tiny import save_tiny

        save_tiny(*self.build_tiny(sizes, tokenizer, seed), out)


def image_token_id(config: Any) -> int:
    """``config.image_token_id`` of a VLM config (or its dict), with an error naming the fix."""
    if config is None:
        raise ValueError("this family needs the model's config to find its image tokens: pass config=model.config")
    value = config.get("image_token_id", config.get("image_token_index")) if isinstance(config, dict) \
        else getattr(config, "image_token_id", None)
    if value is None:
        raise ValueError(f"config of model_type {getattr(config, 'model_type', '?')!r} has no image_token_id")
    return int(value)


def modules_by_layer(model: nn.Module, pattern: str) -> dict[int, nn.Module]:
    """Modules whose qualified name ``re.fullmatch``-es ``pattern``, keyed by their layer index.

    ``pattern``'s first group is the layer number; a module's own ``layer_idx`` wins when it has one.
    Matching names (not attribute paths) keeps this working through PEFT and FSDP wrappers.
    """
    import re

    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        m = re.fullmatch(pattern, name)
        if m:
            found[int(getattr(module, "layer_idx", None) or m.group(1))] = module
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches {pattern!r}: not the expected architecture?")
    return dict(sorted(found.items()))


def middle_layers(num_layers: int, fraction: float = 0.2) -> list[int]:
    """About ``fraction`` of ``num_layers`` layers, evenly spaced over the middle half of the stack.

    The default watched subset of self-attention VLMs: text→image grounding is weak in the first
    layers (tokens still local) and in the last ones (next-token prediction), strongest in between.
    32 layers → [8, 11, 14, 18, 21, 24]; 2–4 layers (tiny models) → the middle one.
    """
    k = max(1, round(num_layers * fraction))
    if k == 1:
        return [num_layers // 2]
    lo, hi = num_layers / 4, 3 * num_layers / 4
    return sorted({int(round(lo + i * (hi - lo) / (k - 1))) for i in range(k)})


_REGISTRY: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register one instance under ``cls.name``; a duplicate name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"model family {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def families() -> dict[str, Family]:
    """All registered families by name."""
    return dict(_REGISTRY)


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a model config given as a ``PretrainedConfig`` or as its dict (``default`` if absent)."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def family_for_config(config: Any) -> Family:
    """The family of a model config (``PretrainedConfig`` or its dict); a clear error otherwise."""
    model_type = config_value(config, "model_type")
    for fam in _REGISTRY.values():
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in _REGISTRY.values())
    raise ValueError(f"unsupported model architecture {model_type!r}; supported families: {supported}")
