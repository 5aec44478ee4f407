"""The miniature world, end to end: scenes → Stage 1 → AR vs Lavender fine-tuning → scores and figures.

Uses the committed world checkpoints (src/lavender/world/checkpoints/), so it needs no long training.
Writes OUT/report.md (accuracy table, attention figures), OUT/results.json and OUT/figures/.

Examples:
    lavender demo --out demo_out            # the documented demo (≤ 10 min on a 2-core CPU)
    lavender demo --out /tmp/d --quick      # smaller sets and fewer steps (≤ 3 min)
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (reused: finished runs are kept)")
    parser.add_argument("--quick", action="store_true", help="small sets and few steps (for tests)")
    parser.add_argument("--dm", help="world diffusion pipeline (default: the committed checkpoint)")
    parser.add_argument("--vlm", help="world VLM (default: the committed Mllama checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default 300, quick 40)")
    parser.add_argument("--lambda", dest="lambda_att", type=float, default=1.0,
                        help="λ of the Lavender runs (default 1: chosen on the validation split)")
    parser.add_argument("--align-on", default="answer", choices=("answer", "all"),
                        help="words aligned in the Lavender runs (default answer: chosen on the validation split)")
    parser.add_argument("--resolutions", type=int, nargs="+",
                        help="DM cross-attention resolutions to average (default: the DM checkpoint's choice)")
    parser.add_argument("--no-oracle", dest="oracle", action="store_false", help="skip the oracle-teacher run")


def main(args: argparse.Namespace) -> int:
    from lavender.world.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, quick=args.quick, dm=args.dm, vlm=args.vlm, seed=args.seed,
                     lambda_att=args.lambda_att, align_on=args.align_on, oracle=args.oracle, resolutions=args.resolutions)
    if args.steps:
        cfg.steps = args.steps
    run_demo(cfg)
    print(cfg.out + "/report.md")
    return 0
