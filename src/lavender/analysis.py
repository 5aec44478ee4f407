"""Attention analysis: entropy, localisation and alignment of DM vs VLM word maps, and figures.

Definitions (docs/method.md, "Evaluation measures"):

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

from lavender.maps import minmax_np


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
    return minmax_np(np.asarray(x, dtype=np.float64)[None])[0] >= threshold


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


def summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "median": float("nan")}
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


# --- VLM word maps through the training code path --------------------------------------------------
@torch.no_grad()
def collect_word_maps(model: Any, processor: Any, family: Any, records: Sequence[Any], store: Any,
                      alignment: Any = None, *, batch_size: int = 8,
                      counts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per matched word of ``records``: ``{id, word, dm_index, vlm (S,S) raw, dm (S,S), sink_mass}``.

    ``counts`` (a dict, filled in place): ``words`` read, ``matched``, ``dropped`` (words of the text
    to align that reached no row, as in training's ``words_dropped``) and ``skipped_records``.

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
            if counts is not None:
                for key, n in (("words", align.n_words), ("matched", align.n_matched), ("dropped", align.n_dropped)):
                    counts[key] = counts.get(key, 0) + int(n)
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
    if counts is not None:
        counts["skipped_records"] = len(collator.skipped)
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

    Each row mapping holds ``image`` (H, W, 3 uint8), ``word`` and an (S, S) map per column name;
    an optional ``mask`` (bool, any size) is drawn as a white contour on every panel (the truth).
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
            if row.get("mask") is not None:
                m = np.asarray(row["mask"], dtype=float)
                axes[r, c].contour(m, levels=[0.5], colors="white", linewidths=1.0,
                                   extent=(0, img.shape[1], 0, img.shape[0]), origin="upper")
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


def plot_paired_differences(path: str, paired: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """Arm − AR per split: the mean over seeds with its 95 % interval and each seed's difference.

    ``paired`` is ``{split: {arm: {"mean", "ci95": [lo, hi], "per_seed": [...]}}}`` (lavender.stats).
    """
    plt = _plt()
    splits = list(paired)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.2), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        arms = list(paired[split])
        for i, arm in enumerate(arms):
            d = paired[split][arm]
            lo, hi = (100 * float(np.clip(v, -1, 1)) for v in d["ci95"])
            ax.errorbar([i], [100 * d["mean"]], yerr=[[100 * d["mean"] - lo], [hi - 100 * d["mean"]]], fmt="o",
                        capsize=5, color="black")
            ax.scatter([i] * len(d["per_seed"]), [100 * v for v in d["per_seed"]], s=12, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(f"{split}: arm − AR")
        ax.set_ylabel("accuracy points (95 % t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def html_report(path: str, markdown_text: str, title: str = "Lavender report") -> str:
    """A self-contained HTML page from the report's Markdown: tables, headings, paragraphs, and every
    ``![alt](file.png)`` embedded as a base64 data URI (the page needs no other file)."""
    import base64
    import html
    import os
    import re

    root = os.path.dirname(os.path.abspath(path))

    def inline(text: str) -> str:
        out = html.escape(text)
        out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", out)

    def image(match: re.Match) -> str:
        alt, src = match.group(1), match.group(2)
        with open(os.path.join(root, src), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'

    body, table = [], []
    for line in markdown_text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *rows = table
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif re.fullmatch(r"!\[(.*?)\]\((.+?)\)", line.strip()):
            body.append(re.sub(r"!\[(.*?)\]\((.+?)\)", image, line.strip()))
        elif line.strip().startswith("- "):
            body.append(f"<li>{inline(line.strip()[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}td:first-child,th:first-child{text-align:left}code{background:#f4f4f4}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    with open(path, "w") as f:
        f.write(page)
    return path
