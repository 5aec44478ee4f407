"""Write a random diffusion pipeline: tiny (64 px, cross-attention at 32×32 and 16×16) or SD-1.4 size;
tiny or real-size SDXL, SD3 and Flux layouts (Stage 1 teachers).

  lavender tiny-dm OUT [--seed 0] [--image-size 64] [--architecture tiny|sd14|sdxl|sdxl-base|sd3|sd3-medium|flux|flux-dev]

Loadable with `StableDiffusionPipeline.from_pretrained(OUT)` and usable as `lavender extract --dm OUT`;
built offline (the CLIP tokenizer's vocabulary and merges are written by lavender itself).
`--architecture sd14` gives the shapes of CompVis/stable-diffusion-v1-4 (512 px, ~2 GB of random float16
weights; `--image-size` is ignored), for GPU speed benchmarks and real-size smoke tests without hub access.
`--architecture sdxl` is a tiny random `StableDiffusionXLPipeline` (two CLIP text encoders, "text_time"
added conditioning, no cross-attention at the top UNet level); `sdxl-base` has SDXL base 1.0's shapes.
`--architecture sd3` is a tiny random `StableDiffusion3Pipeline` (MM-DiT, two CLIPs + a small offline T5,
flow-matching scheduler); `sd3-medium` has SD3 medium's shapes (T5-XXL included: ~15 GB in float16).
`--architecture flux` is a tiny random `FluxPipeline` (double- and single-stream blocks, rotary positions,
CLIP + small offline T5, distilled guidance); `flux-dev` has FLUX.1-dev's shapes (~33 GB in bfloat16).
"""

from __future__ import annotations

from lavender.config import TinyDMConfig

CONFIGS = (TinyDMConfig,)


def main(args: TinyDMConfig) -> int:
    from lavender.diffusion.tiny import make_tiny_dm

    out = make_tiny_dm(args.out, seed=args.seed, image_size=args.image_size, architecture=args.architecture)
    family = "Flux" if args.architecture.startswith("flux") else "Stable Diffusion"
    print(f"{args.architecture} {family} pipeline written to {out}")  # random weights
    return 0
