"""Stage 1: per-word diffusion attention maps for every record, written to an attention dataset.

  lavender extract --dm PATH_OR_ID --data records.jsonl --out attn/ [--recipe ddim|nulltext]

Resumable (rerun the same command: finished examples are skipped), shardable
(`accelerate launch --num_processes N -m lavender extract ...`), and a bad record never stops the run
unless --strict. Recipes, costs and the on-disk format: docs/stage1.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.diffusion.extract import DTYPES, FRAMES, NORMALIZATIONS, RECIPES
    from lavender.records import QA_MODES

    g = parser.add_argument_group("model and data")
    g.add_argument("--dm", required=True, help="diffusers Stable Diffusion folder or hub id (e.g. from `lavender tiny-dm`)")
    g.add_argument("--data", required=True, help="records JSONL (see docs/records.md)")
    g.add_argument("--out", required=True, help="attention dataset folder (created; reused to resume)")
    g.add_argument("--images-root", default=None, help="folder relative image paths are relative to "
                   "(default: the JSONL's folder)")
    g.add_argument("--qa-text", default="question+answer", choices=QA_MODES,
                   help="DM text of conversation records without align_text (default: question+answer)")
    g = parser.add_argument_group("recipe")
    g.add_argument("--recipe", default="ddim", choices=RECIPES, help="ddim (fast, default) or nulltext")
    g.add_argument("--steps", type=int, default=10, help="denoising / DDIM grid steps (default 10)")
    g.add_argument("--inversion-steps", type=int, default=5, help="ddim: inversion steps (default 5)")
    g.add_argument("--inner-steps", type=int, default=5, help="nulltext: max optimisation steps per DDIM step (5)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 1.0 for ddim, 7.5 for nulltext)")
    g = parser.add_argument_group("maps")
    g.add_argument("--map-size", type=int, default=32, help="side of the stored maps (default 32)")
    g.add_argument("--resolutions", type=int, nargs="+", default=[16, 32],
                   help="side lengths of the UNet cross-attention maps to average (default: 16 32)")
    g.add_argument("--layers", nargs="+", default=None,
                   help="only these cross-attention modules (name prefixes, e.g. down_blocks.0); default: all "
                        "at --resolutions")
    g.add_argument("--frame", default="squash", choices=FRAMES, help="how the image fills the DM's square (squash)")
    g.add_argument("--normalize", default="minmax", choices=NORMALIZATIONS, help="per-map normalisation (minmax)")
    g = parser.add_argument_group("running")
    g.add_argument("--batch-size", type=int, default=4, help="images per UNet call (default 4)")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="compute dtype (default fp32)")
    g.add_argument("--device", default=None, help="torch device (default: accelerate's for this process)")
    g.add_argument("--shard-size", type=int, default=256, help="examples per shard file (default 256)")
    g.add_argument("--limit", type=int, default=None, help="only the first N records")
    g.add_argument("--strict", action="store_true", help="stop with exit 1 at the first bad record")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.records import RecordError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = ExtractConfig(
            dm=args.dm, data=args.data, out=args.out, recipe=args.recipe, steps=args.steps,
            inversion_steps=args.inversion_steps, inner_steps=args.inner_steps, guidance=args.guidance,
            map_size=args.map_size, resolutions=args.resolutions, layers=args.layers, frame=args.frame, normalize=args.normalize,
            qa_text=args.qa_text, images_root=args.images_root, batch_size=args.batch_size, dtype=args.dtype,
            device=args.device, shard_size=args.shard_size, strict=args.strict, limit=args.limit)
        summary = run_extract(cfg, progress=not args.no_progress)
    except RecordError as e:
        print(f"lavender extract: {e} (--strict)", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"lavender extract: {e}", file=sys.stderr)
        return 2
    if "dataset" not in summary:
        return 0  # not the main process
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        s = summary
        print(f"extract: {s['done']} done, {s['skipped']} skipped (already in {s['out']}), {s['failed']} failed, "
              f"{s['truncated']} truncated texts; {s['images_per_s']:.2f} images/s over {s['processes']} "
              f"process(es), {s['unet_evals_per_image']:.1f} UNet evaluations/image, "
              f"latent reconstruction MSE {s['recon_mse']:.4g}")
        d = s["dataset"]
        print(f"dataset: {d['examples']} examples, {d['words']} word maps, {d['errors']} bad records "
              f"(see {s['out']}/errors-r*.jsonl)")
    return 0
