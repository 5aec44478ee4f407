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

import json

from lavender.config import AttentionIOConfig, ConvertConfig, MixConfig, SplitConfig


def run_convert(args: ConvertConfig) -> int:
    from lavender.data.convert import convert

    report = convert(args.fmt, args.inputs, args.out, images_root=args.images_root, image_dir=args.image_dir,
                     prompt=args.prompt, split=args.split, strict=args.strict, attention_out=args.attention_out)
    print(report.summary())
    return 0 if report.written else 1


def run_mix(args: MixConfig) -> int:
    from lavender.data.mix import mix, parse_source

    print(json.dumps(mix([parse_source(s) for s in args.sources], args.out, seed=args.seed, total=args.total),
                     indent=2))
    return 0


def run_split(args: SplitConfig) -> int:
    from lavender.data.mix import split

    print(json.dumps(split(args.data, args.val, args.out, seed=args.seed), indent=2))
    return 0


def run_attention_export(args: AttentionIOConfig) -> int:
    from lavender.attnstore import export_parquet

    print(f"wrote {export_parquet(args.src, args.out) / 'attention.parquet'} (+ manifest.json)")
    return 0


def run_attention_import(args: AttentionIOConfig) -> int:
    from lavender.attnstore import import_parquet

    print(f"wrote {import_parquet(args.src, args.out)} examples to {args.out}")
    return 0


SUBCOMMANDS = {
    "convert": ("a public dataset or benchmark file -> records JSONL (prints rows read, written, skipped)",
                (ConvertConfig,), run_convert),
    "mix": ("sample several record files into one, by ratio", (MixConfig,), run_mix),
    "split": ("train/val split by image (no image in both)", (SplitConfig,), run_split),
    "attention-export": ("attention dataset -> parquet with typed columns (for datasets / push_to_hub)",
                         (AttentionIOConfig,), run_attention_export),
    "attention-import": ("parquet folder from attention-export -> attention dataset", (AttentionIOConfig,),
                         run_attention_import),
}
