"""Entropy and alignment of diffusion-model vs VLM word attention, with figures.

Without --model: statistics of the attention dataset alone (entropy of the DM maps). With --model:
the VLM's maps for the same records' matched words (the training code path, before any Aligner),
their entropy, and their alignment with the DM maps (MSE after min–max, IoU at 0.5).

Writes OUT/analysis.json, OUT/entropy.png and, with --model, OUT/word_maps.png.

Example:
    lavender analyze --attention attn/ --data records.jsonl --model runs/lav --out analysis/
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention", required=True, help="attention dataset (lavender extract)")
    parser.add_argument("--data", help="records the maps belong to (needed with --model)")
    parser.add_argument("--model", help="a VLM or RUN_DIR whose attention is compared with the DM's")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=200, help="records to analyse")
    parser.add_argument("--layers", help="comma-separated watched layers (default: the family's)")
    parser.add_argument("--aggregation", default="mean-mean", help="head/layer pooling of the VLM maps")
    parser.add_argument("--row-owner", default="next", choices=("next", "query"))
    parser.add_argument("--align-on", default="answer", choices=("answer", "all"))
    parser.add_argument("--match", default="exact", choices=("exact", "lemma"))
    parser.add_argument("--figures", type=int, default=8, help="words shown in word_maps.png")
    parser.add_argument("--batch-size", type=int, default=8)


def main(args: argparse.Namespace) -> int:
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
        if not args.data:
            raise SystemExit("lavender analyze: --model needs --data (the records the maps belong to)")
        from lavender.records import RecordError, iter_records, load_image
        from lavender.trainer import load_vlm

        records = [r for r in iter_records(args.data) if not isinstance(r, RecordError) and r.id in store]
        records = records[: args.limit]
        model, processor, family = load_vlm(args.model)
        model.eval()
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        rows = collect_word_maps(model, processor, family, records, store, layers=layers,
                                 aggregation=args.aggregation, row_owner=args.row_owner, align_on=args.align_on,
                                 match=args.match, batch_size=args.batch_size)
        result["model"] = args.model
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
