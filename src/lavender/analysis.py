"""Attention analysis: entropy, localisation and alignment of DM vs VLM word maps, and figures.

Definitions (METHOD.md, Evaluation):

- **entropy** of a non-negative map: renormalise to sum 1, Shannon entropy divided by ``ln(H·W)``
  (0 = all mass on one pixel, 1 = uniform). VLM maps are measured on the aggregated attention
  BEFORE the Aligner (what the model itself does).
- **mass ratio** of a map against a ground-truth mask: the fraction of the map's mass inside the
  mask divided by the fraction a uniform map puts there (1.0 = no localisation).
- **IoU**: the map min–max normalised and thresholded at 0.5, against a mask (or another map
  thresholded the same way).
- **alignment MSE**: per-pixel MSE between the min–max normalised VLM map and the DM map.

VLM maps come from the same code as training (:class:`lavender.data_collator.LavenderCollator`,
the capture backend and :func:`lavender.vlm.aggregate.aggregate`), so what is analysed is what
Lavender aligns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


# --- scalar measures ---------------------------------------------------------------------------------
def normalized_entropy(maps: np.ndarray | torch.Tensor, eps: float = 1e-12) -> np.ndarray:
    """``(..., H, W)`` non-negative maps → ``(...,)`` entropy in [0, 1] (1 = uniform)."""
    m = np.asarray(maps, dtype=np.float64)
    m = np.clip(m, 0, None)
    flat = m.reshape(*m.shape[:-2], -1)
    total = flat.sum(-1, keepdims=True)
    p = np.where(total > eps, flat / np.maximum(total, eps), 1.0 / flat.shape[-1])
    h = -(p * np.log(np.clip(p, eps, None))).sum(-1)
    return h / math.log(flat.shape[-1])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean mask block-averaged to ``size``×``size`` coverage fractions (side must divide)."""
    h, w = mask.shape
    if h % size or w % size:
        raise ValueError(f"mask {mask.shape} does not divide into {size}×{size} blocks")
    return mask.reshape(size, h // size, size, w // size).astype(np.float64).mean(axis=(1, 3))


def mass_ratio(attn: np.ndarray, mask: np.ndarray) -> float:
    """Mass of ``attn`` inside ``mask`` over the mask's area fraction (uniform map → 1.0).

    ``mask`` may be boolean at any multiple of the map's size, or coverage fractions at its size.
    """
    a = np.clip(np.asarray(attn, dtype=np.float64), 0, None)
    m = np.asarray(mask)
    if m.shape != a.shape:
        m = resize_mask(m.astype(bool), a.shape[0])
    m = m.astype(np.float64)
    area = m.mean()
    if area <= 0 or a.sum() <= 0:
        return float("nan")
    return float((a * m).sum() / a.sum() / area)


def _binarize(x: np.ndarray, threshold: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) >= threshold if hi > lo else np.zeros_like(x, dtype=bool)


def iou(attn: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of ``attn`` (min–max normalised, ≥ ``threshold``) with a mask or another map."""
    a = _binarize(attn, threshold)
    m = np.asarray(mask)
    if m.dtype != bool:
        m = _binarize(m, threshold)
    elif m.shape != a.shape:
        m = resize_mask(m, a.shape[0]) >= 0.5
    union = (a | m).sum()
    return float((a & m).sum() / union) if union else float("nan")


def minmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo = x.min(axis=(-2, -1), keepdims=True)
    hi = x.max(axis=(-2, -1), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "median": float("nan")}
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


# --- VLM word maps through the training code path --------------------------------------------------
@torch.no_grad()
def collect_word_maps(model: Any, processor: Any, family: Any, records: Sequence[Any], store: Any,
                      alignment: Any = None, *, batch_size: int = 8) -> list[dict[str, Any]]:
    """Per matched word of ``records``: ``{id, word, dm_index, vlm (S,S) raw, dm (S,S), sink_mass}``.

    Reads the VLM exactly as training does (the collator, the capture, ``alignment`` — a
    :class:`lavender.config.AlignmentConfig`, default: its defaults with ``mean-mean``). ``vlm`` is
    the aggregated attention before any Aligner, heads averaged (``heads`` → mean over heads).
    """
    from lavender.config import AlignmentConfig
    from lavender.data_collator import LavenderCollator
    from lavender.vlm.aggregate import matched_word_maps, word_grid_mass
    from lavender.vlm.backend import disable_capture, enable_capture

    alignment = alignment or AlignmentConfig(aggregation="mean-mean")
    aggregation = alignment.aggregation
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(alignment.layer_list or family.default_layers(base))
    collator = LavenderCollator(processor, family, base.config, store, layers, alignment)
    capture = enable_capture(model, family, layers=layers)
    out: list[dict[str, Any]] = []
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            batch = collator(chunk)
            align = batch.pop("lavender")
            ids = [r.id for r in chunk if r.id not in {sid for sid, _ in collator.skipped}]
            if not align.n_matched:
                continue
            capture.arm(align.plan)
            model(**{k: v for k, v in batch.items() if k != "labels"})
            maps = matched_word_maps(capture.maps, align, aggregation).mean(dim=1)  # (N, S, S)
            grid_mass = word_grid_mass(capture.maps, align)
            capture.clear()
            k = 0
            for b, words in enumerate(align.rows.words):
                for w in words:
                    out.append({"id": ids[b], "word": w.text, "dm_index": align.target_index[k],
                                "vlm": maps[k].float().cpu().numpy(), "dm": align.targets[k].numpy(),
                                "sink_mass": float(1 - grid_mass[k])})
                    k += 1
    finally:
        capture.clear()
        disable_capture(model, family)
    return out


def alignment_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Entropy of DM and VLM maps, their alignment (MSE after min–max, IoU at 0.5) and the VLM's sink
    mass (the share of the aligned rows' attention off the image grid)."""
    if not rows:
        return {"words": 0}
    dm = np.stack([r["dm"] for r in rows])
    vlm = np.stack([r["vlm"] for r in rows])
    mse = ((minmax_np(vlm) - minmax_np(dm)) ** 2).mean(axis=(1, 2))
    return {"words": len(rows),
            "entropy_dm": summary(normalized_entropy(dm)), "entropy_vlm": summary(normalized_entropy(vlm)),
            "mse": summary(mse), "iou": summary([iou(v, d) for v, d in zip(vlm, dm)]),
            "sink_mass": summary([r["sink_mass"] for r in rows if "sink_mass" in r])}


# --- figures ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_entropy_histograms(path: str, groups: Mapping[str, Sequence[float]], title: str = "") -> None:
    """Overlaid histograms of normalised entropy (paper Fig. 7)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, 1, 41)
    for label, values in groups.items():
        ax.hist(np.asarray(values), bins=bins, alpha=0.55, label=f"{label} (mean {np.mean(values):.3f})")
    ax.set_xlabel("normalised attention entropy (1 = uniform)")
    ax.set_ylabel("word maps")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_word_maps(path: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """One row per example: the image, then one panel per map column (e.g. dm, vlm_before, vlm_after).

    Each row mapping holds ``image`` (H, W, 3 uint8), ``word`` and an (S, S) map per column name.
    """
    plt = _plt()
    n_cols = 1 + len(columns)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.9 * n_cols, 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        img = row["image"]
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"“{row['word']}”", fontsize=9)
        for c, name in enumerate(columns, start=1):
            axes[r, c].imshow(img)
            axes[r, c].imshow(minmax_np(row[name]), cmap="jet", alpha=0.55, interpolation="bilinear",
                              extent=(0, img.shape[1], img.shape[0], 0))
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: str, runs: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str]) -> None:
    """Training curves from ``metrics.jsonl`` rows, one panel per key, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
