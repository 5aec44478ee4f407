"""From captured attention ``{layer: (B, H, R, K)}`` to one ``(C, 32, 32)`` map per aligned word.

Order of operations (each a small function, tested against hand computations):

1. :func:`pool` — heads and layers → ``(B, C, R, K)`` per the aggregation (docs/method.md, Stage 2):
   ``X-Y`` pools heads with X then layers with Y (``mean``/``max``); ``heads`` averages layers and
   keeps the H heads as channels for the Aligner; ``flow-mult`` / ``flow-sum`` (App. D) combine the
   head-averaged maps of successive layers by product (in LOG space: eight softmax maps of ~1e-3
   multiply to ~1e-24, and rows of a long image underflow even float32; docs/pitfalls.md #8) or by sum, then
   weight each row by r_t = t / N (docs/pitfalls.md #7). ``learn`` pools like ``mean-mean`` the maps that
   the capture computed from :class:`LearnedProjections` instead of the model's own q/k.
2. :func:`average_word_rows` — a word's map is the mean over its rows (:mod:`lavender.vlm.rows`).
3. :func:`grid_maps` — the image's key columns laid on its grid (``ImageGrid``), brought into the
   attention dataset's frame at 32×32 by :mod:`lavender.vlm.grid`.

About r_t: it multiplies a whole row's map by a positive scalar. Where maps are normalised per
map afterwards (the Aligner's min–max output, instance norm, the entropy's renormalisation) a
single-row word's r_t cancels exactly; it matters where maps are compared unnormalised, and
between the rows of a multi-token word, whose mean it re-weights towards the later tokens.
For ``flow-mult`` each row is also rescaled by its own maximum (exp of log-sum minus its max), so
the product is representable; r_t is applied after that rescaling.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lavender.config import AGGREGATIONS
from lavender.vlm.families.base import ImageGrid
from lavender.vlm.rows import RowBatch

POOLS = ("mean-mean", "mean-max", "max-mean", "max-max")
#: floor of a probability before its log (softmax output can be exactly 0 on masked keys)
_LOG_FLOOR = 1e-30


def row_weights(rows: torch.Tensor, attention_mask: torch.Tensor | None, seq_len: int | None = None) -> torch.Tensor:
    """r_t = t / N per captured row: t = the row's 1-based position among the sample's real tokens.

    Counting real tokens (not raw positions) makes r_t the same under left or right padding.

    Args:
        rows: ``(B, R)`` token positions. attention_mask: ``(B, T)`` or None (no padding, ``seq_len``).
    Returns:
        ``(B, R)`` float in (0, 1].
    """
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("row_weights needs attention_mask or seq_len")
        return (rows.float() + 1) / seq_len
    real = attention_mask.long().cumsum(dim=1)  # (B, T): real tokens up to and including t
    t = real.gather(1, rows.to(real.device))
    n = real[:, -1:].clamp(min=1)
    return t.float() / n.float()


def pool(maps: dict[int, torch.Tensor], aggregation: str = "mean-mean", r: torch.Tensor | None = None) -> torch.Tensor:
    """Heads and layers → ``(B, C, R, K)`` (C = H for ``heads``, else 1).

    Args:
        maps: ``{layer: (B, H, R, K)}`` from :class:`lavender.vlm.backend.AttentionCapture`.
        aggregation: one of :data:`AGGREGATIONS`.
        r: ``(B, R)`` row weights (:func:`row_weights`); required by the flow aggregations.
    """
    if not maps:
        raise ValueError("no captured attention: was the capture armed with a plan before the forward?")
    layers = sorted(maps)
    # (B, L, H, R, K); one watched layer is a view (no copy of a heads × rows × keys tensor)
    stack = maps[layers[0]].float().unsqueeze(1) if len(layers) == 1 else torch.stack([maps[k].float() for k in layers], 1)
    if aggregation in POOLS or aggregation == "learn":
        head_op, layer_op = ("mean", "mean") if aggregation == "learn" else aggregation.split("-")
        x = stack.mean(dim=2) if head_op == "mean" else stack.amax(dim=2)  # (B, L, R, K)
        x = x.mean(dim=1) if layer_op == "mean" else x.amax(dim=1)  # (B, R, K)
        return x.unsqueeze(1)
    if aggregation == "heads":  # (B, H, R, K); the mean of one layer is that layer, exactly
        return stack[:, 0] if stack.shape[1] == 1 else stack.mean(dim=1)
    if aggregation in ("flow-mult", "flow-sum"):
        if r is None:
            raise ValueError(f"{aggregation} needs the row weights r_t (row_weights(rows, attention_mask))")
        per_layer = stack.mean(dim=2)  # (B, L, R, K)
        if aggregation == "flow-sum":
            x = per_layer.sum(dim=1)
        else:
            log = per_layer.clamp_min(_LOG_FLOOR).log().sum(dim=1)  # (B, R, K) log of the product
            x = (log - log.amax(dim=-1, keepdim=True)).exp()  # each row rescaled to max 1
        return (x * r.to(x.device)[..., None]).unsqueeze(1)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def average_word_rows(pooled: torch.Tensor, batch: RowBatch) -> list[torch.Tensor]:
    """Per sample, ``(n_words, C, K)``: each word's map is the mean over its rows.

    Done as one matmul with a ``(n_words, R)`` averaging matrix per sample: indexing the pooled
    tensor word by word would make autograd allocate a full-size zero gradient per word (measured:
    half the step time of a 4096-wide model with 128 words).
    """
    out = []
    for b, columns in enumerate(batch.word_columns):
        sample = pooled[b]  # (C, R, K)
        if columns and all(len(cols) == 1 for cols in columns):
            # every word one token: its map IS its row. Picking the rows gives the matmul's numbers
            # exactly (1·x plus zeros) at 1/n_words of its cost; with any multi-token word the
            # matmul stays, because averaging by another route would round differently
            index = torch.tensor([cols[0] for cols in columns], device=sample.device)
            out.append(sample.index_select(1, index).transpose(0, 1))
            continue
        avg = sample.new_zeros(len(columns), sample.shape[1])  # (n_words, R)
        for w, cols in enumerate(columns):
            avg[w, cols] = 1.0 / len(cols)
        out.append(torch.einsum("wr,crk->wck", avg, sample))
    return out


def keys_from_grids(grids: Sequence[ImageGrid], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[ImageGrid | None]]:
    """The capture plan's key columns: per sample, its FIRST image's grid (the one the DM maps describe).

    Returns:
        ``keys (B, K)``, ``key_valid (B, K)`` and the grid used per sample (None: no image). Column
        ``j`` of a sample is grid cell ``(j // cols, j % cols)``.
    """
    chosen: list[ImageGrid | None] = [None] * batch_size
    for g in grids:
        if chosen[g.batch_index] is None:
            chosen[g.batch_index] = g
    width = max((g.key_index.numel() for g in chosen if g is not None), default=1)
    keys = torch.zeros(batch_size, width, dtype=torch.long)
    valid = torch.zeros(batch_size, width, dtype=torch.bool)
    for b, g in enumerate(chosen):
        if g is not None:
            n = g.key_index.numel()
            keys[b, :n] = g.key_index.to(torch.long).cpu()
            valid[b, :n] = True
    return keys, valid, chosen


def grid_maps(maps: torch.Tensor, grid: ImageGrid, frame: str = "squash", size: int = 32) -> torch.Tensor:
    """``(N, C, K)`` maps over the plan's key columns of one image → ``(N, C, size, size)`` in the frame.

    The plan's columns are already ``grid.key_index`` in order (:func:`keys_from_grids`), so the
    grid is the first ``rows·cols`` columns, read as a view (an ``index_select`` of all of them was a
    copy of every head × word map and a scatter in backward: ~170 ms of a 4-tile, 128-word CPU step).
    """
    from lavender.vlm.grid import to_frame

    on_grid = maps[..., : grid.rows * grid.cols].unflatten(-1, (grid.rows, grid.cols))  # (N, C, rows, cols)
    return to_frame(on_grid, grid.covers, grid.image_size, frame=frame, size=size)


def aggregate(maps: dict[int, torch.Tensor], batch: RowBatch, grids: Sequence[ImageGrid | None],
              aggregation: str = "mean-mean", *, attention_mask: torch.Tensor | None = None,
              frame: str = "squash", size: int = 32) -> list[torch.Tensor]:
    """The whole path: per sample ``(n_words, C, size, size)`` maps in the words' order of ``batch``."""
    r = None
    if aggregation.startswith("flow"):
        r = row_weights(batch.rows, attention_mask, seq_len=None if attention_mask is not None else
                        int(batch.rows.max()) + 1)
    per_word = average_word_rows(pool(maps, aggregation, r), batch)
    out = []
    for b, wm in enumerate(per_word):
        grid = grids[b]
        if grid is None or wm.shape[0] == 0:
            out.append(wm.new_zeros(wm.shape[0], wm.shape[1], size, size))
        else:
            out.append(grid_maps(wm, grid, frame=frame, size=size))
    return out


class LearnedProjections(nn.Module):
    """``learn`` aggregation (Sec. 4.2.3): parallel W_Qd, W_Kd beside the frozen W_Q, W_K of watched layers.

    The capture computes the maps it returns from ``softmax(Q_d K_dᵀ / √d)`` while the model's
    output keeps using its own projections, so the model is unchanged and only L_att trains these.
    Seam: :meth:`attach` installs forward pre-hooks that remember each watched module's inputs;
    the backend calls this object as its ``projector(module, query, key)``. The module's own
    per-head norms (Mllama's ``q_norm``/``k_norm``) and rotary embedding are applied as the model
    applies them, so a ``copy`` initialisation reproduces the model's own maps exactly.

    Args:
        modules: ``{layer_idx: attention module}`` to shadow (``family.attention_modules``).
        init: ``copy`` (the pretrained q/k weights; default) or ``random``.
    """

    def __init__(self, modules: dict[int, nn.Module], init: str = "copy") -> None:
        super().__init__()
        if init not in ("copy", "random"):
            raise ValueError(f"unknown learn init {init!r}; choose 'copy' or 'random'")
        self.q = nn.ModuleDict({str(i): _shadow(m.q_proj, init) for i, m in modules.items()})
        self.k = nn.ModuleDict({str(i): _shadow(m.k_proj, init) for i, m in modules.items()})
        self._modules_watched = dict(modules)
        self._inputs: dict[int, dict[str, Any]] = {}
        self._hooks: list[Any] = []

    def attach(self) -> LearnedProjections:
        """Install the input hooks (idempotent)."""
        self.detach()
        for i, module in self._modules_watched.items():
            def hook(mod: nn.Module, args: tuple, kwargs: dict, layer: int = i) -> None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                self._inputs[layer] = {"hidden_states": hidden,
                                       "cross_attention_states": kwargs.get("cross_attention_states"),
                                       "position_embeddings": kwargs.get("position_embeddings")}
            self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._inputs = {}

    def forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = module.layer_idx
        if layer not in self._inputs:
            raise RuntimeError(f"learn: layer {layer} ran without its inputs recorded; call attach() first")
        inp = self._inputs[layer]
        hidden = inp["hidden_states"]
        source = inp["cross_attention_states"]
        if source is None and key.shape[2] != hidden.shape[1]:
            raise RuntimeError(f"learn: layer {layer} reuses cached keys (generation?); learn needs a full forward")
        source = hidden if source is None else source
        bsz, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        q = self.q[str(layer)](hidden).view(bsz, -1, heads, dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k[str(layer)](source).view(bsz, -1, kv_heads, dim).transpose(1, 2)  # (B, Hkv, S, D)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        if inp["cross_attention_states"] is None and inp["position_embeddings"] is not None:
            cos, sin = inp["position_embeddings"]  # (B, T, D) each
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        return q.to(query.dtype), k.to(key.dtype)


def _shadow(proj: nn.Module, init: str) -> nn.Linear:
    """A trainable nn.Linear shaped like ``proj`` (under a LoRA wrapper: its frozen base layer)."""
    base = getattr(proj, "base_layer", proj)
    new = copy.deepcopy(base) if init == "copy" else nn.Linear(base.in_features, base.out_features,
                                                                bias=base.bias is not None)
    new = new.to(device=base.weight.device, dtype=base.weight.dtype)
    new.requires_grad_(True)
    return new


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama/Qwen2 apply it (rotate-half convention), ``x`` (B, H, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def matched_word_maps(captured: dict[int, torch.Tensor], align: Any, aggregation: str) -> torch.Tensor:
    """``(N, C, S, S)`` VLM maps of a batch's matched words (a collator's ``AlignmentBatch``), in the
    attention dataset's frame: what the Aligner sees in training and ``analyze`` reads."""
    per_sample = aggregate(captured, align.rows, align.grids, aggregation, attention_mask=align.attention_mask,
                           frame=align.frame, size=align.targets.shape[-1])
    return torch.cat(per_sample)


def word_grid_mass(captured: dict[int, torch.Tensor], align: Any) -> torch.Tensor:
    """``(N,)`` per matched word: the share of its rows' attention (heads and layers averaged) that is on
    the image's spatial grid. The captured slice is normalised over ALL keys, so ``1 −`` this is the
    mass on everything else the row sees — CLS tokens, padding tiles, separators, text (a sink)."""
    totals = pool(captured, "mean-mean").sum(dim=-1, keepdim=True)  # (B, 1, R, 1)
    per_sample = average_word_rows(totals, align.rows)  # each (n_words, 1, 1)
    return torch.cat([w[:, 0, 0] for w in per_sample]) if per_sample else totals.new_zeros(0)
