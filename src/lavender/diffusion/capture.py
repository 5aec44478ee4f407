"""Cross-attention capture for diffusers UNets: one swappable processor at one seam.

Only the cross-attention modules (``attn2``: queries = image latents, keys = the 77 text tokens) at the
chosen resolutions get :class:`CaptureCrossAttnProcessor`; every other attention (all ``attn1``
self-attention, cross-attention at other resolutions) keeps diffusers' fused SDPA processor. The
explicit probabilities are cheap where we compute them (K = 77 keys).

The probabilities, averaged over heads, are summed into a preallocated float32 buffer per resolution
(B, side², 77) — no per-step Python lists. Under classifier-free guidance the UNet batch is
``[uncond, cond]``: only the last ``n_images`` rows (the conditional half) are kept. Capture is off
unless ``store.active`` is set, so inversion and null-text optimisation passes run the plain SDPA path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class AttentionAccumulator:
    """Running sums of cross-attention probabilities for the images of one batch, per resolution.

    Args:
        sides: the attention-map side lengths captured (e.g. ``[16, 32]``).
        max_images: the largest batch of images (buffers are allocated once at this size).
        n_tokens: text length (77 for CLIP).
    """

    def __init__(self, sides: list[int], max_images: int, n_tokens: int, device: torch.device | str = "cpu"):
        self.sides = sorted(set(sides))
        # (max_images, side*side, n_tokens) per side: the layout the probabilities arrive in
        self.buffers = {s: torch.zeros(max_images, s * s, n_tokens, device=device) for s in self.sides}
        self.counts = dict.fromkeys(self.sides, 0)
        self.n_images = 0
        self.active = False

    def reset(self, n_images: int) -> None:
        """Start a new batch of ``n_images`` images (zeroes the buffers in place)."""
        if n_images > next(iter(self.buffers.values())).shape[0]:
            raise ValueError(f"batch of {n_images} images exceeds the accumulator's {self.max_images}")
        for b in self.buffers.values():
            b.zero_()
        self.counts = dict.fromkeys(self.sides, 0)
        self.n_images = n_images

    @property
    def max_images(self) -> int:
        return next(iter(self.buffers.values())).shape[0]

    def add(self, side: int, probs: torch.Tensor) -> None:
        """Add head-averaged probabilities ``probs`` (B_unet, side², T); keeps the last ``n_images`` rows."""
        n = self.n_images
        self.buffers[side][:n].add_(probs[-n:].float())
        self.counts[side] += 1

    def token_maps(self, map_size: int) -> torch.Tensor:
        """Mean over every captured (layer, step) call: (n_images, T, map_size, map_size) float32.

        Each resolution's sum is resized to ``map_size`` first (bilinear; antialiased when shrinking);
        resizing is linear, so this equals resizing every call's map and then averaging.
        """
        total = sum(self.counts.values())
        if total == 0:
            raise RuntimeError("no cross-attention was captured: was the accumulator active while denoising?")
        n = self.n_images
        out = None
        for s in self.sides:
            if not self.counts[s]:
                continue
            # (n, s*s, T) -> (n, T, s, s)
            m = self.buffers[s][:n].transpose(1, 2).reshape(n, -1, s, s)
            if s != map_size:
                m = F.interpolate(m, size=(map_size, map_size), mode="bilinear", align_corners=False,
                                  antialias=s > map_size)
            out = m if out is None else out + m
        return out / total


class CaptureCrossAttnProcessor:
    """Cross-attention with explicit softmax(QKᵀ·scale) probabilities, accumulated while ``store.active``.

    The output is ``probs @ V`` (the same attention SDPA computes), so capturing does not change what the
    UNet predicts beyond float rounding. When the store is inactive, it defers to SDPA.
    """

    def __init__(self, store: AttentionAccumulator, side: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.store = store
        self.side = side
        self._sdpa = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        if not self.store.active or encoder_hidden_states is None:
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        b, n, _ = hidden_states.shape  # (B, side*side, C): SD transformer blocks pass 3-D tokens
        ctx = encoder_hidden_states
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        t = ctx.shape[1]
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        h = attn.heads
        d = k.shape[-1] // h
        q = q.view(b, n, h, d).transpose(1, 2)  # (B, H, N, d)
        k = k.view(b, t, h, d).transpose(1, 2)  # (B, H, T, d)
        v = v.view(b, t, h, d).transpose(1, 2)  # (B, H, T, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale  # (B, H, N, T)
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, t, b)  # (B*H, 1 or N, T), additive
            scores = scores + mask.view(b, h, -1, t)
        probs = scores.float().softmax(dim=-1)  # softmax in fp32 whatever the compute dtype
        self.store.add(self.side, probs.mean(dim=1))  # heads averaged: (B, N, T)
        out = torch.matmul(probs.to(v.dtype), v)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(b, n, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_sides(unet, latent_side: int, context_dim: int | None = None,
                          added_cond_kwargs: dict | None = None) -> dict[str, int]:
    """Attention-map side length of every cross-attention module, found by one probe forward.

    Returns processor key (``...attn2.processor``) → side. Probing (rather than deriving from block
    names) works for any UNet2DConditionModel layout, SDXL's included (it has no cross-attention at
    the highest resolution). ``added_cond_kwargs`` is what a UNet with added conditioning needs to run
    at all (SDXL: batch-1 ``text_embeds`` and ``time_ids``). Costs one UNet evaluation at batch 1.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen: dict[str, int] = {}

    class _Probe(AttnProcessor2_0):
        def __init__(self, key: str):
            super().__init__()
            self.key = key

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None and attn.is_cross_attention:
                side = math.isqrt(hidden_states.shape[1])
                seen[self.key] = side if side * side == hidden_states.shape[1] else -hidden_states.shape[1]
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    original = unet.attn_processors
    unet.set_attn_processor({k: _Probe(k) for k in original})
    try:
        p = next(unet.parameters())
        dim = context_dim or unet.config.cross_attention_dim
        x = torch.zeros(1, unet.config.in_channels, latent_side, latent_side, device=p.device, dtype=p.dtype)
        ctx = torch.zeros(1, 77, dim, device=p.device, dtype=p.dtype)
        with torch.inference_mode():
            unet(x, 0, ctx, added_cond_kwargs=added_cond_kwargs)
    finally:
        unet.set_attn_processor(original)
    return seen


def install_capture(unet, store: AttentionAccumulator, sides_by_key: dict[str, int],
                    layers: list[str] | None = None) -> list[str]:
    """Give the cross-attention modules at ``store.sides`` a capture processor, SDPA to all others.

    Args:
        layers: optional module-name prefixes (``down_blocks.0``, ``up_blocks.1.attentions.0``): only
            those cross-attention modules are read (the world DM localises in one layer only).

    Returns the keys that capture. Raises ``ValueError`` naming the available sides when none match.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    chosen = {k: s for k, s in sides_by_key.items() if s in store.sides}
    missing = [s for s in store.sides if s not in chosen.values()]
    if missing:
        avail = sorted({s for s in sides_by_key.values() if s > 0})
        raise ValueError(f"--resolutions {missing} not in this UNet: its cross-attention maps have side "
                         f"lengths {avail} at this image size; pick from those")
    if layers:
        picked = {k: s for k, s in chosen.items() if any(k.startswith(p) for p in layers)}
        if not picked:
            raise ValueError(f"--layers {layers} match no cross-attention module at --resolutions "
                             f"{store.sides}; modules there: {sorted(k.rsplit('.processor', 1)[0] for k in chosen)}")
        empty = [s for s in store.sides if s not in picked.values()]
        if empty:
            raise ValueError(f"--layers {layers} select no cross-attention module at side {empty} of --resolutions "
                             f"{store.sides} (a resolution would be listed but never read); drop it from "
                             f"--resolutions or add one of its modules: "
                             f"{sorted(k.rsplit('.processor', 1)[0] for k, s in chosen.items() if s in empty)}")
        chosen = picked
    procs = {k: (CaptureCrossAttnProcessor(store, chosen[k]) if k in chosen else AttnProcessor2_0())
             for k in unet.attn_processors}
    unet.set_attn_processor(procs)
    return sorted(chosen)
