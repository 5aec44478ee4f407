"""Stage 1 teachers beyond SD-1.x/2.x: SDXL (UNet), SD3 and Flux (MM-DiT transformers).

Each is detected from the pipeline folder (``model_index.json``'s ``_class_name``, see
:func:`pipeline_class_of`) and offers what :class:`~lavender.diffusion.extract.Extractor` asks of a
teacher (documented on :class:`~lavender.diffusion.extract.DiffusionModel`), so the recipes, the
word merging and the on-disk format are shared with SD-1.x. docs/stage1.md, "Teachers".

One conditioning tensor per text. The recipes treat the text conditioning as ONE tensor
(``torch.cat([uncond, cond])`` under guidance, ``expand``, null-text optimises it), but SDXL and SD3
also condition on a pooled text vector. It is packed as one extra row after the token embeddings
(zero-padded to their width) and unpacked by the denoiser call: ``(B, T + 1, D)``. Nothing else reads
that row; the capture sees only the T token keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lavender.diffusion.capture import AttentionAccumulator, cross_attention_sides
from lavender.diffusion.extract import DiffusionModel


def pipeline_class_of(path: str) -> str | None:
    """The diffusers pipeline class a folder (or hub id) was saved as, from its ``model_index.json``;
    None when that cannot be read (then the SD-1.x loader reports the real problem)."""
    index = Path(path) / "model_index.json"
    try:
        if index.is_file():
            return json.loads(index.read_text()).get("_class_name")
        if Path(path).exists():
            return None
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path).get("_class_name")
    except (OSError, ValueError):
        return None


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, T, D) and a pooled vector (B, P ≤ D) as one (B, T + 1, D) tensor."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the token width {tokens.shape[-1]}")
    row = torch.zeros(tokens.shape[0], 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, row], dim=1)


def unpack(emb: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: (tokens (B, T, D), pooled (B, pooled_dim))."""
    return emb[:, :-1], emb[:, -1, :pooled_dim]


# ------------------------------------------------------------------------------------------ SDXL
class SDXLModel(DiffusionModel):
    """SDXL base: a UNet conditioned on two CLIP encoders' penultimate hidden states (concatenated per
    token) plus a pooled text vector and six size/crop ids ("text_time" added conditioning).

    Words are defined by the FIRST tokenizer (CLIP ViT-L). Both tokenizers are the same CLIP BPE (the
    second pads with ``!`` instead of ``<|endoftext|>``), so token i covers the same characters in both
    and key i of the UNet's cross-attention is one position of the text; :meth:`tokenize` checks that
    per text (every non-special token's character span equal) and refuses a checkpoint where it fails.

    The six ids are (original H, W, crop top, crop left, target H, W) = (S, S, 0, 0, S, S) for the
    teacher's square image side S: Stage 1 frames every image into that square itself, uncropped.
    """

    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ValueError(f"{path}: an SDXL pipeline without its first text encoder (a refiner?) is not a "
                             "Stage 1 teacher; use the base model")
        pipe.set_progress_bar_config(disable=True)
        self._setup(pipe, path, device, dtype)
        self.text_encoder_2 = pipe.text_encoder_2.to(self.device).eval().requires_grad_(False)
        self.tokenizer_2 = pipe.tokenizer_2
        # SDXL's fp16 VAE overflows (its config says force_upcast): encode in float32 then
        if dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)
        self.force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        self.pooled_dim = int(self.text_encoder_2.config.projection_dim)
        s = self.image_size
        self.time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=self.device)
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * 6 + self.pooled_dim
        if expected != given:
            raise ValueError(f"{path}: the UNet's added conditioning takes {expected} numbers but 6 time ids and "
                             f"a pooled text of {self.pooled_dim} give {given}; not an SDXL base layout")

    def _added(self, pooled: torch.Tensor, n: int) -> dict:
        return {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids.expand(n, -1).to(self.dtype)}

    def _unet(self, x: torch.Tensor, tt: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        ctx, pooled = unpack(emb, self.pooled_dim)
        return self.unet(x.to(self.dtype), tt, ctx.to(self.dtype),
                         added_cond_kwargs=self._added(pooled, x.shape[0])).sample.float()

    def attention_sides(self) -> dict[str, int]:
        pooled = torch.zeros(1, self.pooled_dim, device=self.device)
        return cross_attention_sides(self.unet, self.latent_side, added_cond_kwargs=self._added(pooled, 1))

    def default_resolutions(self, sides: dict[str, int]) -> list[int]:
        """Every side SDXL has cross-attention at (1024 px: 64 and 32; none at the 128 level)."""
        return sorted({s for s in sides.values() if s > 0})

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float() * self.vae.config.scaling_factor

    def tokenize(self, texts: list[str]) -> dict:
        """The first tokenizer's ids, offsets and special flags (they define the words), plus
        ``input_ids_2`` of the second; raises ``ValueError`` where the two split a text differently."""
        enc = super().tokenize(texts)
        enc2 = self.tokenizer_2(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        words_1 = enc["special_tokens_mask"] == 0
        same = (enc2["special_tokens_mask"] == 0) == words_1
        same &= (enc2["offset_mapping"] == enc["offset_mapping"]).all(-1) | ~words_1
        if not bool(same.all()):
            bad = texts[int((~same).any(-1).nonzero()[0, 0])]
            raise ValueError(f"SDXL's two tokenizers split {bad[:60]!r} differently; a key position of the "
                             "UNet's cross-attention would not be one piece of text")
        enc["input_ids_2"] = enc2["input_ids"]
        return enc

    @torch.inference_mode()
    def encode_prompts(self, enc: dict) -> torch.Tensor:
        """Both encoders' penultimate hidden states, concatenated per token (B, 77, 768 + 1280 for SDXL),
        and the second encoder's projected pooled output (B, 1280), packed (:func:`pack`)."""
        o1 = self.text_encoder(enc["input_ids"].to(self.device), output_hidden_states=True)
        o2 = self.text_encoder_2(enc["input_ids_2"].to(self.device), output_hidden_states=True)
        tokens = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1).float()
        return pack(tokens, o2.text_embeds.float())

    def null_embedding(self) -> torch.Tensor:
        """All zeros when the pipeline sets ``force_zeros_for_empty_prompt`` (SDXL base does), as its
        own guidance does; else the encoded empty text."""
        if self.force_zeros:
            return torch.zeros(1, self.max_length + 1, self.unet.config.cross_attention_dim, device=self.device)
        return self.encode_prompts(self.tokenize([""]))


TEACHERS: dict[str, type] = {
    SDXLModel.pipeline_class: SDXLModel,
}

__all__ = ["TEACHERS", "SDXLModel", "pipeline_class_of", "pack", "unpack", "AttentionAccumulator"]
