"""Write a tiny randomly initialised VLM and its processor (tokenizer built offline) to OUT.

The folder is in the standard ``save_pretrained`` layout: the model loads with
``AutoModelForImageTextToText.from_pretrained(OUT)`` and the processor with ``AutoProcessor`` (for
qwen2_vl and idefics3 without torchvision: the family's ``load_processor``). For smoke tests and
examples without downloads:

    lavender tiny-vlm --arch mllama /tmp/tiny-mllama
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.vlm.families import families

    parser.add_argument("--arch", required=True, choices=sorted(families()), help="model family to build")
    parser.add_argument("out", metavar="OUT", help="output folder (created; existing files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")


def main(args: argparse.Namespace) -> int:
    from lavender.vlm.families import families

    families()[args.arch].make_tiny(args.out, seed=args.seed)
    print(f"wrote a tiny {args.arch} model and its processor to {args.out}")
    return 0
