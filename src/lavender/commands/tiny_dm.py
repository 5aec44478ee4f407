"""Write a random Stable Diffusion pipeline: tiny (64 px, cross-attention at 32×32 and 16×16) or SD-1.4 size.

  lavender tiny-dm OUT [--seed 0] [--image-size 64] [--architecture tiny|sd14]

Loadable with `StableDiffusionPipeline.from_pretrained(OUT)` and usable as `lavender extract --dm OUT`;
built offline (the CLIP tokenizer's vocabulary and merges are written by lavender itself).
`--architecture sd14` gives the shapes of CompVis/stable-diffusion-v1-4 (512 px, ~2 GB of random float16
weights; `--image-size` is ignored), for GPU speed benchmarks and real-size smoke tests without hub access.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="image side in px, tiny only (default 64: cross-attention maps of side 32, 16)")
    parser.add_argument("--architecture", choices=("tiny", "sd14"), default="tiny",
                        help="tiny (default), or sd14: SD-1.4 layer sizes, random float16 weights")


def main(args: argparse.Namespace) -> int:
    from lavender.diffusion.tiny import make_tiny_dm

    out = make_tiny_dm(args.out, seed=args.seed, image_size=args.image_size, architecture=args.architecture)
    print(f"{args.architecture} Stable Diffusion pipeline written to {out}")  # random weights
    return 0
