"""Entropy and alignment of diffusion-model vs VLM word attention, with figures.

Without --model: statistics of the attention dataset alone (entropy of the DM maps). With --model:
the VLM's maps for the same records' matched words (the training code path, before any Aligner),
their entropy, and their alignment with the DM maps (MSE after min–max, IoU at 0.5).

With a `lavender train` RUN_DIR as --model, the layers, aggregation, row owner, words and matching
the run was trained with (RUN_DIR/lavender_alignment.json) are the defaults; flags override them.

Writes OUT/analysis.json, OUT/entropy.png and, with --model, OUT/word_maps.png.

Example:
    lavender analyze --attention attn/ --data records.jsonl --model runs/lav --out analysis/
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lavender.config import AlignmentConfig, AnalyzeConfig, saved_alignment

CONFIGS = (AnalyzeConfig, AlignmentConfig)


def defaults(namespace: Any) -> dict[str, Any] | None:
    """A run folder's saved alignment (layers, aggregation, …) is the default for its analysis."""
    return saved_alignment(getattr(namespace, "model", None))


def main(args: AnalyzeConfig, alignment: AlignmentConfig) -> int:
    from lavender.analysis import (
        alignment_stats,
        collect_word_maps,
        normalized_entropy,
        plot_entropy_histograms,
        plot_word_maps,
        summary,
    )
    from lavender.attnstore import AttentionStore

    os.makedirs(args.out, exist_ok=True)
    store = AttentionStore(args.attention)
    ids = store.ids()[: args.limit]
    dm_entropy = np.concatenate([normalized_entropy(np.asarray(store.get(i)["maps"], dtype=np.float32))
                                 for i in ids]) if ids else np.zeros(0)
    result: dict = {"attention": args.attention, "examples": len(ids), "entropy_dm_all_words": summary(dm_entropy)}
    groups = {"DM": dm_entropy}
    if args.model:
        from lavender.records import RecordError, iter_records, load_image
        from lavender.vlm.load import load_vlm

        records = [r for r in iter_records(args.data) if not isinstance(r, RecordError) and r.id in store]
        records = records[: args.limit]
        model, processor, family = load_vlm(args.model)
        model.eval()
        counts: dict[str, int] = {}
        rows = collect_word_maps(model, processor, family, records, store, alignment, batch_size=args.batch_size,
                                 counts=counts)
        total = counts.get("words", 0) + counts.get("dropped", 0)
        counts["match_rate"] = counts.get("matched", 0) / total if total else 0.0  # dropped words count too
        result["model"] = args.model
        result["words"] = counts
        result["alignment_config"] = alignment.to_dict()
        result["alignment"] = alignment_stats(rows)
        groups = {"DM (matched words)": normalized_entropy(np.stack([r["dm"] for r in rows])) if rows else [],
                  "VLM": normalized_entropy(np.stack([r["vlm"] for r in rows])) if rows else []}
        by_id = {r.id: r for r in records}
        shown = []
        for row in rows[: args.figures]:
            image = np.asarray(load_image(by_id[row["id"]].images[0]).resize((128, 128)))
            shown.append({"image": image, "word": row["word"], "DM": row["dm"], "VLM": row["vlm"]})
        if shown:
            plot_word_maps(os.path.join(args.out, "word_maps.png"), shown, ["DM", "VLM"])
    plot_entropy_histograms(os.path.join(args.out, "entropy.png"), groups, "word-map entropy")
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0
