"""MiniCPM-V 4.6 (``minicpmv4_6``): a thumbnail and slices, 16 patches per token, a hybrid LLM.

Watched modules: the FULL-attention layers of the Qwen3.5 language model,
``language_model.layers[i].self_attn``. Qwen3.5 is hybrid: three of every four layers are Gated
DeltaNet (``linear_attn``), a recurrence with no attention probabilities to read or align, so they
are neither watched nor listed. Default subset: :func:`~lavender.vlm.families.base.middle_layers`
applied to the full-attention layers in order (a stack with 6 of them → the 4th). LoRA targets the
q/k/v/o projections of the full-attention layers only (DeltaNet's projections are named otherwise).

Geometry (``MiniCPMV4_6ImageProcessor``): an image larger than ``scale_resolution``² (448²) is cut
into a ``rows × cols`` grid of equal SLICES (``get_sliced_grid``: at most ``max_slice_nums``, the
layout closest to the aspect ratio) of the whole image resized to a multiple of the grid (aspect
ratio kept up to rounding; nothing cropped or padded), and a THUMBNAIL (the whole image resized to
about ``scale_resolution``²) is added in front. Every view is cut into 14-px patches; in the default
``16x`` mode a window-attention merger inside the ViT fuses each 2×2 window of patches and the MLP
merger fuses 2×2 of those, so a view of ``h × w`` patches gives ``h/4 × w/4`` ``<|image_pad|>``
tokens, row-major (``4x`` mode skips the window merger: ``h/2 × w/2``, also row-major). The
processor writes ``<image_id>N</image_id><image>`` + thumbnail tokens + ``</image>`` and then the
slices, each ``<slice>…</slice>``, rows separated by ``\\n``.

Decisions: the slices are stitched onto ONE grid of ``rows · h/4 × cols · w/4`` cells covering the
whole original image; the THUMBNAIL IS DROPPED (a coarser second view of the same image; its keys
stay in the softmax, as in the model, but are not mapped). An image small enough not to be sliced
has only the thumbnail, which is then the grid (covering the whole image). The ``<image_id>``,
``<image>``/``<slice>`` markers and the row newlines are text, never keys. Video is not mapped.

Chat format: ChatML over the Qwen tokenizer (``<|im_start|>role\\n…<|im_end|>\\n``), one
``<|image_pad|>`` per image, no default system prompt, no thinking block. Written from the
processor's API; the released ``chat_template.jinja`` could not be read offline — check
``lavender.chat.render`` against it before training a released checkpoint.

Processor: ``MiniCPMV4_6Processor`` needs a video processor whose class check needs torchvision;
:class:`ImageOnlyMiniCPMV4_6Processor` skips that check only (the video processor is built, unused),
and :meth:`MiniCPMVFamily.load_processor` rebuilds it from the saved folder without torchvision.
The processor pads on its own side (left) unless told: :meth:`MiniCPMVFamily.encode` passes the
tokenizer's ``padding_side``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import MiniCPMV4_6Processor

from lavender.vlm.families._tokens import image_token_positions
from lavender.vlm.families.base import Family, ImageGrid, image_token_id, middle_layers, register_family

_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
          "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
          "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}

MINICPMV_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string %}{{- m['content'] }}{%- else %}{%- for c in m['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|image_pad|>' }}{%- elif c['type'] == 'text' %}{{- c['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ImageOnlyMiniCPMV4_6Processor(MiniCPMV4_6Processor):
    """``MiniCPMV4_6Processor`` whose video processor is not class-checked (the check needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@register_family
class MiniCPMVFamily(Family):
    name = "minicpmv"
    model_types = ("minicpmv4_6",)
    cross_attention = False
    lora_target_regex = r".*language_model.*\.self_attn\.(q|k|v|o)_proj"
    attention_pattern = r"(?:.*\.)?language_model\.layers\.(\d+)\.self_attn"

    def default_layers(self, model: nn.Module) -> list[int]:
        """The middle of the FULL-attention layers (the only ones with attention maps)."""
        full = sorted(self.attention_modules(model))
        return [full[i] for i in middle_layers(len(full))]

    def image_grids(self, inputs: Any, image_sizes: Sequence[Sequence[tuple[int, int]]],
                    config: Any = None, processor: Any = None) -> list[ImageGrid]:
        token = image_token_id(config)
        if processor is None:
            raise ValueError("minicpmv: image_grids needs the processor (its slice settings decide the layout)")
        ip = processor.image_processor
        factor = 2 if getattr(ip, "downsample_mode", "16x") == "4x" else 4
        views = torch.as_tensor(inputs["target_sizes"]).tolist()  # (n_views, 2) patches, batch order
        layouts: list[list[tuple[list[tuple[int, int]], tuple[int, int] | None]]] = []
        k = 0
        for sizes in image_sizes:
            layouts.append([])
            for w, h in sizes:
                grid = ip.get_sliced_grid((int(h), int(w)), ip.max_slice_nums, ip.scale_resolution) \
                    if ip.slice_mode else None
                n = 1 + (grid[0] * grid[1] if grid else 0)
                if k + n > len(views):
                    raise ValueError(f"minicpmv: image_sizes need more views than target_sizes has ({len(views)})")
                layouts[-1].append(([(a // factor, b // factor) for a, b in views[k:k + n]], grid))
                k += n
        if k != len(views):
            raise ValueError(f"minicpmv: target_sizes has {len(views)} views, image_sizes account for {k}")
        counts = [[sum(r * c for r, c in v) for v, _ in lay] for lay in layouts]
        positions = image_token_positions(inputs["input_ids"], token, counts)
        out = []
        for b, sizes in enumerate(image_sizes):
            for pos, (shapes, grid), (w, h) in zip(positions[b], layouts[b], sizes):
                pieces = list(torch.split(pos, [r * c for r, c in shapes]))
                if grid is None:  # no slices: the thumbnail is the whole image
                    (r, c), = shapes
                    out.append(ImageGrid(b, pieces[0], r, c, (0.0, 0.0, float(w), float(h)), (int(w), int(h))))
                    continue
                gy, gx = grid
                sr, sc = shapes[1]
                if any(s != (sr, sc) for s in shapes[1:]):
                    raise ValueError(f"minicpmv: slices of unequal size {shapes[1:]}")
                # slice (i, j) fills rows i*sr..(i+1)*sr, cols j*sc..(j+1)*sc; the thumbnail (piece 0) is dropped
                tiles = torch.stack(pieces[1:]).view(gy, gx, sr, sc).permute(0, 2, 1, 3).reshape(-1)
                out.append(ImageGrid(b, tiles, gy * sr, gx * sc, (0.0, 0.0, float(w), float(h)), (int(w), int(h))))
        return out

    def encode(self, processor: Any, texts: Sequence[str], images: Any,
               answer_starts: Sequence[int | None] | None = None, **kwargs: Any) -> Any:
        """The processor call, padded on the tokenizer's side (the processor's own default is left)."""
        kwargs.setdefault("padding_side", processor.tokenizer.padding_side)
        return processor(text=list(texts), images=images, **kwargs)

    def load_processor(self, path: str, **kwargs: Any) -> Any:
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            return super().load_processor(path, **kwargs)
        from transformers import AutoTokenizer
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
            MiniCPMV4_6ImageProcessorPil,
        )
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        image = MiniCPMV4_6ImageProcessorPil.from_pretrained(path, **kwargs)
        video = MiniCPMV4_6VideoProcessor.from_pretrained(path, **kwargs)
        return ImageOnlyMiniCPMV4_6Processor(image, video, tok, chat_template=tok.chat_template)

    def build_tiny(self, sizes: Any = None, tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """Tiny MiniCPM-V 4.6: 7-px patches, slices of 112² (the released 14-px / 448², scaled down) →
        4×4 tokens per view after the 2×2 window merger (after ViT layer 0 of 2) and the 2×2 MLP merger,
        at most 4 slices + the thumbnail; a Qwen3.5 text model of 4 layers, DeltaNet / full attention
        alternating (released: 3 DeltaNet per full-attention layer), width 64."""
        from transformers import (
            MiniCPMV4_6Config,
            MiniCPMV4_6ForConditionalGeneration,
            PreTrainedTokenizerFast,
        )
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (
            MiniCPMV4_6ImageProcessorPil,
        )
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

        from lavender.vlm.tiny import build_tokenizer

        if sizes is not None:
            raise ValueError(f"{self.name}: build_tiny has one fixed size (the test model's); sizes are not supported")
        template = MINICPMV_TEMPLATE
        if tokenizer is None:
            base = build_tokenizer([*_NAMED.values(), "<|im_start|>", "<|im_end|>"])
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token=base.bos_token,
                                                eos_token=base.eos_token, pad_token=base.pad_token,
                                                unk_token=base.unk_token, extra_special_tokens=_NAMED)
        else:
            template = tokenizer.chat_template or template
        tok = tokenizer
        settings = dict(scale_resolution=112, max_slice_nums=4, patch_size=7, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        processor = ImageOnlyMiniCPMV4_6Processor(MiniCPMV4_6ImageProcessorPil(**settings),
                                                  MiniCPMV4_6VideoProcessor(**settings), tok, chat_template=template)
        text = dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    layer_types=["linear_attention", "full_attention"] * 2, max_position_embeddings=1024,
                    # rotary on half the head (8 dims); interleaved M-RoPE sections sum to 4
                    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=112, patch_size=7)
        config = MiniCPMV4_6Config(vision_config=vision, text_config=text, insert_layer_id=0, image_size=112,
                                   image_token_id=tok.convert_tokens_to_ids(_NAMED["image_token"]),
                                   video_token_id=tok.convert_tokens_to_ids(_NAMED["video_token"]))
        torch.manual_seed(seed)
        return MiniCPMV4_6ForConditionalGeneration(config), processor
