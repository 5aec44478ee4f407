"""Write a tiny random Stable Diffusion pipeline (64 px images, cross-attention at 32×32 and 16×16).

  lavender tiny-dm OUT [--seed 0] [--image-size 64]

Loadable with `StableDiffusionPipeline.from_pretrained(OUT)` and usable as `lavender extract --dm OUT`;
built offline (the CLIP tokenizer's vocabulary and merges are written by lavender itself).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="image side in px (default 64: cross-attention maps of side 32 and 16)")


def main(args: argparse.Namespace) -> int:
    from lavender.diffusion.tiny import make_tiny_dm

    print(f"tiny Stable Diffusion pipeline written to {make_tiny_dm(args.out, seed=args.seed, image_size=args.image_size)}")
    return 0
