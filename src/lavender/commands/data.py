"""Convert public datasets and benchmarks to records, mix record files, split them by image.

Examples:
    lavender data convert --from flickr30k --in dataset_flickr30k.json --images-root flickr30k-images \\
        --out data/flk30k.jsonl
    lavender data convert --from vqav2 --in v2_OpenEnded_mscoco_val2014_questions.json \\
        v2_mscoco_val2014_annotations.json --images-root val2014 --out bench/vqav2.jsonl
    lavender data mix data/rv83k.jsonl data/flk30k.jsonl data/ov30k.jsonl --out data/mix.jsonl --seed 0
    lavender data split --data data/mix.jsonl --val 0.02 --seed 0 --out data/mix_split

Formats, record fields and ratio semantics: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.data.convert import CONVERTERS

    sub = parser.add_subparsers(dest="action", required=True, metavar="{convert,mix,split}")

    c = sub.add_parser("convert", help="a public dataset or benchmark file -> records JSONL",
                       description="Convert a dataset or benchmark to records; prints rows read, written "
                                   "and skipped (by reason).")
    c.add_argument("--from", dest="fmt", required=True, choices=sorted(CONVERTERS), help="source format")
    c.add_argument("--in", dest="inputs", required=True, nargs="+", metavar="PATH",
                   help="input file(s) or folder(s) of shards; vqav2 takes questions AND annotations")
    c.add_argument("--out", required=True, metavar="RECORDS.jsonl", help="output records file")
    c.add_argument("--images-root", metavar="DIR",
                   help="folder the source's image names are relative to (default: the input's folder)")
    c.add_argument("--image-dir", metavar="DIR",
                   help="where embedded images are written (default: <out stem>_images next to --out)")
    c.add_argument("--prompt", help="user prompt for captioning/benchmark formats; {question} and "
                                    "{options} are filled in")
    c.add_argument("--split", help="Karpathy files only: keep this split (train, val, test, restval)")
    c.add_argument("--attention-out", metavar="ATTN_DIR",
                   help="authors-attention only: the attention dataset to build from the per-word maps")
    c.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")

    m = sub.add_parser("mix", help="sample several record files into one, by ratio",
                       description="Mix record files. Without --total, A.jsonl:0.5 takes half of A (a ratio "
                                   "> 1 up-samples); with --total N the ratios are weights of N records.")
    m.add_argument("sources", nargs="+", metavar="RECORDS.jsonl[:RATIO]")
    m.add_argument("--out", required=True, metavar="MIX.jsonl")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--total", type=int, help="exact size of the mixture; ratios become relative weights")

    s = sub.add_parser("split", help="train/val split by image (no image in both)",
                       description="Write DIR/train.jsonl and DIR/val.jsonl; records sharing an image stay "
                                   "on one side.")
    s.add_argument("--data", required=True, metavar="RECORDS.jsonl")
    s.add_argument("--val", required=True, type=float, metavar="FRACTION",
                   help="fraction of images (image groups) for validation")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, metavar="DIR")


def main(args: argparse.Namespace) -> int:
    from lavender.data.convert import convert
    from lavender.data.mix import mix, parse_source, split

    try:
        if args.action == "convert":
            report = convert(args.fmt, args.inputs, args.out, images_root=args.images_root,
                             image_dir=args.image_dir, prompt=args.prompt, split=args.split,
                             strict=args.strict, attention_out=args.attention_out)
            print(report.summary())
            return 0 if report.written else 1
        if args.action == "mix":
            result = mix([parse_source(s) for s in args.sources], args.out, seed=args.seed, total=args.total)
        else:
            result = split(args.data, args.val, args.out, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"lavender data {args.action}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
