"""Answer records with a model (or a `lavender train` run) and score the answers.

Writes OUT/results.json (overall and per-type scores) and OUT/predictions.jsonl, and prints a table.
Each record's ``metric`` field wins over --metric; without either, exact and relaxed ("contains")
match are reported.

Example:
    lavender eval --model runs/lav --data world/test.jsonl --out results/lav --limit 200
"""

from __future__ import annotations

from lavender.config import EvalConfig

CONFIGS = (EvalConfig,)


def main(args: EvalConfig) -> int:
    from lavender.evaluate import evaluate, summary_table, write_results
    from lavender.vlm.load import load_vlm

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
