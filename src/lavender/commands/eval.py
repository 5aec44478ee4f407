"""Answer records with a model (or a `lavender train` run) and score the answers.

Writes OUT/results.json (overall and per-type scores) and OUT/predictions.jsonl, and prints a table.
Each record's ``metric`` field wins over --metric; without either, exact and relaxed ("contains")
match are reported.

Example:
    lavender eval --model runs/lav --data world/test.jsonl --out results/lav --limit 200
"""

from __future__ import annotations

import argparse

from lavender.metrics import METRICS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder / hub id, or a RUN_DIR")
    parser.add_argument("--data", required=True, help="records (JSONL) with answers")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metric", choices=METRICS, help="metric for records without a 'metric' field")
    parser.add_argument("--limit", type=int, help="score only the first N usable records (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--images-root", help="folder record image paths are relative to")
    parser.add_argument("--device", default="cpu")


def main(args: argparse.Namespace) -> int:
    from lavender.evaluate import evaluate, summary_table, write_results
    from lavender.trainer import load_vlm

    model, processor, _ = load_vlm(args.model)
    model.to(args.device).eval()
    result = evaluate(model, processor, args.data, metric=args.metric, limit=args.limit,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, images_root=args.images_root)
    path = write_results(result, args.out)
    print(summary_table(result))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} records (listed in {path})")
    print(f"wrote {path}")
    return 0
