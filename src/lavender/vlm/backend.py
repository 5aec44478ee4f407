"""Text→image attention capture through a registered transformers attention backend.

transformers 5 looks every text attention module's kernel up by name
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``), so capture is a
backend named ``"lavender"`` and not a fork of any modeling file:

* every layer's OUTPUT still comes from :func:`sdpa_attention_forward` (fused, unchanged numerics);
* only the watched layers (by ``module.layer_idx``) additionally compute
  ``softmax(q · kᵀ · scaling + mask)`` for the few query rows that will be aligned (a per-sample
  ``(B, R)`` row index) over ALL keys, then keep the image-key columns (a per-sample ``(B, K)`` key
  index). Normalising over all keys first is what makes the slice equal to the eager model's
  probabilities. Nothing is detached: L_att's gradient reaches q/k projections (and LoRA on them).

The mask builder is registered too (``AttentionMaskInterface``): without it transformers silently
passes ``mask=None`` to an unknown backend, dropping padding and prefix masks.

State is per step (docs/pitfalls.md #9, #10): the caller arms an :class:`AttentionCapture` with a
:class:`CapturePlan` before the forward, reads ``capture.maps`` after it and clears it after
``backward``. Maps are stored by layer (overwritten, never appended), so the recomputation that
gradient checkpointing (``use_reentrant=False``) runs during ``backward`` cannot add stale maps.
That recomputation MUST re-run the same ops (checkpointing matches saved tensors by order), so the
capture stays armed until ``backward`` is done; :meth:`AttentionCapture.clear` then disarms it.

Typical use (the trainer)::

    capture = enable_capture(model, family)            # once
    capture.arm(CapturePlan(layers, rows, row_valid, keys, key_valid))
    out = model(**batch)
    maps = capture.maps                                # {layer: (B, H, R, K)}
    loss = out.loss + lam * l_att(maps)
    loss.backward()
    capture.clear()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

BACKEND_NAME = "lavender"

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # one-time warnings already given in this process

#: ``projector(module, query, key) -> (query, key)``: replaces the q/k the probabilities are computed
#: from (the ``learn`` aggregation's parallel projections); the model's output never sees it.
Projector = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CapturePlan:
    """What one step captures. All tensors are per sample of the batch, padded.

    Attributes:
        layers: ``layer_idx`` values of the watched attention modules.
        rows: ``(B, R)`` long, query positions (token indices) to keep; padded entries may be any
            valid index (0), they are zeroed through ``row_valid``.
        row_valid: ``(B, R)`` bool.
        keys: ``(B, K)`` long, key positions of the image tokens, in the order the grid expects.
        key_valid: ``(B, K)`` bool (samples with fewer image tokens are padded).
    """

    layers: Sequence[int]
    rows: torch.Tensor
    row_valid: torch.Tensor
    keys: torch.Tensor
    key_valid: torch.Tensor

    def __post_init__(self) -> None:
        if self.rows.shape != self.row_valid.shape or self.keys.shape != self.key_valid.shape:
            raise ValueError(f"CapturePlan: rows {tuple(self.rows.shape)} / row_valid "
                             f"{tuple(self.row_valid.shape)} and keys {tuple(self.keys.shape)} / key_valid "
                             f"{tuple(self.key_valid.shape)} must have matching shapes")
        if self.rows.shape[0] != self.keys.shape[0]:
            raise ValueError(f"CapturePlan: rows cover {self.rows.shape[0]} samples but keys cover "
                             f"{self.keys.shape[0]}; build both from the same batch")


class AttentionCapture:
    """Per-step holder of the plan and of the captured maps ``{layer: (B, H, R, K)}`` (float32).

    Args:
        causal: the mask to assume when the model passes ``mask=None`` (transformers does so for a
            pure causal, unpadded batch). ``False`` for cross-attention (Mllama), whose keys are
            image tokens only.
        projector: optional :data:`Projector` (the ``learn`` aggregation).
        chunk_bytes: with gradients on, rows are scored in chunks whose float32 ``(B, H, rows, S)``
            score tensor stays under this size, each under ``torch.utils.checkpoint``. The slice must
            score every row against ALL S keys (Mllama: 4 tile slots × 1601 = 6,404) before keeping
            the image columns, so one unchunked tensor is 210 MB at 32 heads and 256 rows, and the
            saved softmax plus backward's full-size gradients held ~760 MiB on an H100 (README).
            Chunked, backward recomputes one chunk at a time; maps and gradients are unchanged.
    """

    def __init__(self, causal: bool = True, projector: Projector | None = None,
                 chunk_bytes: int = 32 * 2**20) -> None:
        self.causal = causal
        self.projector = projector
        self.chunk_bytes = chunk_bytes
        self.plan: CapturePlan | None = None
        self.maps: dict[int, torch.Tensor] = {}

    # --- per-step life cycle ------------------------------------------------------------------
    def arm(self, plan: CapturePlan) -> None:
        """Set the plan for the next forward (and its backward) and drop the previous step's maps."""
        self.plan = plan
        self.maps = {}

    def clear(self) -> None:
        """Disarm and free the maps; call after ``backward`` (checkpoint recomputation needs the plan)."""
        self.plan = None
        self.maps = {}

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def watching(self, layer_idx: int | None) -> bool:
        return self.plan is not None and layer_idx is not None and layer_idx in self.plan.layers

    # --- the slice ----------------------------------------------------------------------------
    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
               mask: torch.Tensor | None, scaling: float | None, is_causal: bool | None) -> None:
        """Compute and store the watched slice of ``module``'s attention probabilities."""
        plan = self.plan
        assert plan is not None
        if self.projector is not None:
            query, key = self.projector(module, query, key)
        causal = self.causal if is_causal is None else is_causal
        key, mask, plan = drop_unseen_keys(key, mask, plan, query.shape[2])  # sizes the chunks by the live keys
        bsz, heads, n_rows, s_len = query.shape[0], query.shape[1], plan.rows.shape[1], key.shape[2]
        per_row = bsz * heads * s_len * 4  # bytes of one row of the float32 scores
        step = max(1, self.chunk_bytes // per_row)
        if not torch.is_grad_enabled() or n_rows <= step:
            self.maps[module.layer_idx] = attention_slice(query, key, mask, plan, scaling=scaling, causal=causal)
            return
        from torch.utils.checkpoint import checkpoint

        parts = []
        for i in range(0, n_rows, step):
            sub = replace(plan, rows=plan.rows[:, i: i + step], row_valid=plan.row_valid[:, i: i + step])
            parts.append(checkpoint(attention_slice, query, key, mask, sub, scaling, causal, use_reentrant=False))
        self.maps[module.layer_idx] = torch.cat(parts, dim=2)


def attention_slice(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, plan: CapturePlan,
                    scaling: float | None = None, causal: bool = True) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + mask)`` for the plan's rows over all keys, then the plan's key columns.

    Args:
        query: ``(B, H, T, D)``; key: ``(B, Hkv, S, D)`` (GQA: H = Hkv · groups).
        mask: ``None`` (→ ``causal`` decides), bool ``(B|1, 1|H, T, S)`` (True = attend) or additive
            float of that shape.
    Returns:
        ``(B, H, R, K)`` float32 probabilities; invalid rows/keys are 0.
    """
    bsz, heads, t_len, dim = query.shape
    kv_heads, s_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = plan.rows.to(query.device)
    n_rows = rows.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    keys = plan.keys.to(query.device)
    key_valid = plan.key_valid.to(query.device)
    m_rows = None
    if mask is not None:
        key, mask, plan = drop_unseen_keys(key, mask, plan, t_len)
        s_len = key.shape[2]
        keys, key_valid = plan.keys.to(query.device), plan.key_valid.to(query.device)
        m_rows = mask_rows(mask, rows, bsz, t_len, s_len)  # (B, Hm, R, S)
    # gather the R query rows: (B, H, R, D)
    q = query.gather(2, rows[:, None, :, None].expand(bsz, heads, n_rows, dim))
    # GQA without materialising repeat_kv: group g of kv head j is query head j * groups + g
    q = q.reshape(bsz, kv_heads, groups * n_rows, dim)  # (B, Hkv, G*R, D)
    scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # (B, Hkv, G*R, S')
    scores = scores.reshape(bsz, heads, n_rows, key.shape[2])  # (B, H, R, S')
    neg = torch.finfo(scores.dtype).min
    # a mask that changes nothing (every kept key allowed to every row: Mllama's valid tiles, once the
    # padding tiles are dropped) is skipped: masked_fill of nothing, or adding exact zeros, is the
    # identity, and each is a full pass over the (B, H, R, S) scores forward and backward
    if m_rows is None:
        if causal:
            # queries are the last T positions of S keys (S == T without a cache)
            allowed = torch.arange(s_len, device=scores.device)[None, :] <= (rows + (s_len - t_len))[..., None]
            scores = scores.masked_fill(~allowed[:, None], neg)  # allowed: (B, R, S)
    elif m_rows.dtype == torch.bool:
        if not bool(m_rows.all()):
            scores = scores.masked_fill(~m_rows, neg)
    elif bool(m_rows.any()):
        scores = scores + m_rows.float()
    probs = torch.softmax(scores, dim=-1)  # over all keys a row may see, as the model does
    out = probs.gather(3, keys[:, None, None, :].expand(bsz, heads, n_rows, keys.shape[1]))  # (B, H, R, K)
    valid = plan.row_valid.to(out.device)[:, None, :, None] & key_valid[:, None, None, :]
    return out if bool(valid.all()) else out * valid  # × 1 is the identity


def mask_rows(mask: torch.Tensor, rows: torch.Tensor, bsz: int, t_len: int, s_len: int) -> torch.Tensor:
    """The planned ``rows`` ``(B|1, R)`` of a ``(Bm, Hm, Tm, ≥S)`` mask (``Bm``, ``Tm`` may be 1: broadcast)
    over its first ``s_len`` keys → ``(B, Hm, R, S)``; the broadcast is a view, only the gather copies."""
    n_rows = rows.shape[1]
    m = mask[..., :s_len].expand(bsz, mask.shape[1], t_len, s_len)
    return m.gather(2, rows[:, None, :, None].expand(bsz, m.shape[1], n_rows, s_len))


def drop_unseen_keys(key: torch.Tensor, mask: torch.Tensor | None, plan: CapturePlan,
                     t_len: int) -> tuple[torch.Tensor, torch.Tensor | None, CapturePlan]:
    """Drop the key positions that no planned row may see; they get exactly 0 probability, so the
    slice is unchanged and only its cost falls (Mllama's padding tiles: 3 of 4 slots of a one-tile
    image; a causal mask: keys after the last planned row).

    Returns ``key``, ``mask`` (last dim cut to the kept keys) and the plan with ``keys`` renumbered
    into the kept positions (a planned key that is never seen becomes invalid). Unchanged inputs
    when every key is seen, or when ``mask`` is None (causality is then applied in the slice).
    """
    if mask is None:
        return key, mask, plan
    s_len = key.shape[2]
    m_rows = mask_rows(mask, plan.rows.to(key.device), key.shape[0], t_len, s_len)  # (B, Hm, R, S)
    allowed = m_rows if m_rows.dtype == torch.bool else m_rows > torch.finfo(m_rows.dtype).min / 2
    live = allowed.flatten(0, 2).any(0)  # (S,)
    if not bool(live.any()) or bool(live.all()):
        return key, mask, plan
    cols = live.nonzero().squeeze(1)
    new_index = torch.cumsum(live.long(), 0) - 1
    keys, key_valid = plan.keys.to(key.device), plan.key_valid.to(key.device)
    plan = replace(plan, keys=torch.where(live[keys], new_index[keys], torch.zeros_like(keys)),
                   key_valid=key_valid & live[keys])
    return key.index_select(2, cols), mask[..., :s_len].index_select(-1, cols), plan


# --- the registered backend -------------------------------------------------------------------------
_ACTIVE: list[AttentionCapture] = []


def lavender_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA for the output; the watched slice for the armed capture of the model ``module`` belongs to."""
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, is_causal=is_causal, **kwargs)
    capture = getattr(module, "_lavender_capture", None)
    if capture is not None and capture.watching(getattr(module, "layer_idx", None)):
        capture.record(module, query, key, attention_mask, scaling, is_causal)
    return out, None


def register_backend() -> None:
    """Register the ``"lavender"`` attention function and its mask builder (idempotent)."""
    AttentionInterface.register(BACKEND_NAME, lavender_attention_forward)
    AttentionMaskInterface.register(BACKEND_NAME, sdpa_mask)


def enable_capture(model: nn.Module, family: Any, layers: Sequence[int] | None = None,
                   projector: Projector | None = None) -> AttentionCapture:
    """Switch the text model of ``model`` to the capture backend and return its capture object.

    The vision tower keeps its own implementation (SDPA). The capture is attached to the watched
    family modules (``module._lavender_capture``), so two models in one process never share state.

    Args:
        model: a transformers VLM (or a PEFT model wrapping one).
        family: its :class:`lavender.vlm.families.Family`.
        layers: layers that CAN be watched (default: the family's ``default_layers``); each step's
            plan picks among them.
        projector: see :class:`AttentionCapture`.
    """
    register_backend()
    base = _base_model(model)
    _warn_softcapping(base, family)
    base.set_attn_implementation({family.text_config_name(): BACKEND_NAME})
    modules = family.attention_modules(base)
    chosen = list(family.default_layers(base) if layers is None else layers)
    missing = [i for i in chosen if i not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not watchable attention layers of this {family.name} model; "
                         f"choose among {sorted(modules)}")
    return attach_capture(modules, causal=not family.cross_attention, projector=projector)


def _warn_softcapping(base: nn.Module, family: Any) -> None:
    """Warn once when the text config soft-caps attention logits (PaliGemma 2's Gemma-2: 50): transformers
    applies ``attn_logit_softcapping`` in eager attention only, and this backend (SDPA outputs, captured
    maps) does not, so Lavender trains and reads the uncapped attention."""
    config = getattr(base, "config", None)
    text = getattr(config, family.text_config_name(), None) or config
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None and "softcap" not in _WARNED:
        _WARNED.add("softcap")
        logger.warning("%s: the text config sets attn_logit_softcapping=%s, which transformers applies in eager "
                       "attention only; the capture backend (SDPA outputs and captured maps) does not soft-cap, so "
                       "training and the maps use the uncapped attention", family.name, cap)


def attach_capture(modules: dict[int, nn.Module], causal: bool = True,
                   projector: Projector | None = None) -> AttentionCapture:
    """A new capture watching ``modules`` (by ``layer_idx``); their model must already run ``"lavender"``.

    The family-free core of :func:`enable_capture` (benchmarks and bare text models use it).
    """
    capture = AttentionCapture(causal=causal, projector=projector)
    for module in modules.values():
        module._lavender_capture = capture
    return capture


def disable_capture(model: nn.Module, family: Any, implementation: str = "sdpa") -> None:
    """Undo :func:`enable_capture`: the text model back to ``implementation``, captures detached."""
    base = _base_model(model)
    base.set_attn_implementation({family.text_config_name(): implementation})
    for module in family.attention_modules(base).values():
        if hasattr(module, "_lavender_capture"):
            del module._lavender_capture


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``set_attn_implementation`` lives there)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
