"""Stage 1: per-word diffusion attention maps for every record, written to an attention dataset.

  lavender extract --dm PATH_OR_ID --data records.jsonl --out attn/ [--recipe ddim|nulltext]
  lavender extract --config src/lavender/world/checkpoints/dm/stage1.yaml --dm ... --data ... --out ...

Resumable (rerun the same command: finished examples are skipped), shardable
(`accelerate launch --num_processes N -m lavender extract ...`), and a bad record never stops the run
unless --strict. `--layers` is the old spelling of `--modules` (UNet cross-attention module names).
Recipes, costs and the on-disk format: docs/stage1.md.
"""

from __future__ import annotations

import json
import logging

from lavender.config import ExtractConfig

CONFIGS = (ExtractConfig,)


def main(cfg: ExtractConfig) -> int:
    from lavender.diffusion.extract import run_extract

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = run_extract(cfg)
    if "dataset" not in summary:
        return 0  # not the main process, or --dry-run (it printed its line)
    if cfg.json:
        print(json.dumps(summary, default=str))
        return 0
    s, d = summary, summary["dataset"]
    redone = f" ({s['redone']} of them recomputed: record or image changed)" if s.get("redone") else ""
    print(f"extract: {s['done']} done{redone}, {s['skipped']} skipped (already in {s['out']}), {s['failed']} failed, "
          f"{s['truncated']} truncated texts; {s['images_per_s']:.2f} images/s over {s['processes']} "
          f"process(es), {s['unet_evals_per_image']:.1f} UNet evaluations/image, "
          f"latent reconstruction MSE {s['recon_mse']:.4g}")
    print(f"dataset: {d['examples']} examples, {d['words']} word maps, {d['errors']} bad records "
          f"(see {s['out']}/errors-r*.jsonl)")
    return 0
