"""Recipes of the miniature world.

  lavender world scenes --out DIR --split train --n 1000 --seed 0            VQA records
  lavender world scenes --out DIR --split train --n 5000 --seed 0 --captions caption rows

Each recipe is a sub-subcommand with one small function here; the work lives in lavender.world.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    _add_scenes(sub)


def main(args: argparse.Namespace) -> int:
    return int(args.run(args) or 0)


def _add_scenes(sub) -> None:
    from lavender.world.scenes import SPLITS

    p = sub.add_parser("scenes", help="write scenes as JSONL records with PNG images and mask files",
                       description="Write N scenes of one split: VQA records (one question per scene) "
                                   "or, with --captions, caption rows for pre-training.")
    p.add_argument("--out", required=True, help="output folder (JSONL, images/, masks/)")
    p.add_argument("--split", default="train", choices=tuple(SPLITS),
                   help="train/validation/test; ood = unseen colour–shape pairs AND templates; "
                        "ood_combo / ood_template = one shift each (default: train)")
    p.add_argument("--n", type=int, required=True, help="number of records (one scene each)")
    p.add_argument("--seed", type=int, default=0, help="seed; same seed → identical files (default 0)")
    p.add_argument("--captions", action="store_true",
                   help="write caption rows {id, image, caption} to <split>_captions.jsonl instead")
    p.set_defaults(run=_scenes)


def _scenes(args: argparse.Namespace) -> int:
    from lavender.world.write import write_captions, write_split

    if args.n < 1:
        raise SystemExit(f"lavender world scenes: --n must be >= 1, got {args.n}")
    write = write_captions if args.captions else write_split
    path = write(args.out, args.split, args.n, args.seed)
    print(f"wrote {args.n} {'caption' if args.captions else 'VQA'} records to {path}")
    return 0
