"""Recipes of the miniature world.

  lavender world scenes --out DIR --split train --n 1000 --seed 0            VQA records
  lavender world scenes --out DIR --split train --n 5000 --seed 0 --captions caption rows
  lavender world scenes --out DIR --world v2 --split shift --n 1000 --p 1.0 world-v2 records
  lavender world train-dm --out DIR [--steps 3000] [--seed 0] [--device cuda] [--chunk-minutes 10] [--resume]
  lavender world score-dm --dm DIR/pipeline [--n 100] [--out scores.json]
  lavender world train-vlm --arch mllama --out DIR --steps 800 --seed 0 [--chunk-minutes 10] [--resume]

Each recipe is a sub-subcommand with one small function here; the work lives in lavender.world.
"""

from __future__ import annotations

import json

from lavender.config import ScenesConfig, ScoreDMConfig, TrainDMConfig, TrainVLMConfig


def run_scenes(args: ScenesConfig) -> int:
    from lavender.world.write import write_captions, write_split

    if args.world == "v2":
        from lavender.world.v2 import write_v2_split

        path = write_v2_split(args.out, args.split, args.n, args.seed, args.p, args.pair, args.binding)
        print(f"wrote {args.n} world-v2 VQA records (p={args.p}, {args.pair} pairs"
              f"{', binding pressure' if args.binding else ''}) to {path}")
        return 0
    write = write_captions if args.captions else write_split
    path = write(args.out, args.split, args.n, args.seed)
    print(f"wrote {args.n} {'caption' if args.captions else 'VQA'} records to {path}")
    return 0


def run_train_dm(args: TrainDMConfig) -> int:
    import torch

    from lavender.world.dm import DMConfig, train_dm

    torch.set_num_threads(args.threads)
    cfg = DMConfig(**args.overrides())
    trainer = train_dm(args.out, cfg, resume=args.resume, chunk_minutes=args.chunk_minutes, device=args.device)
    where = f"{args.out}/pipeline" if trainer.vae_step >= cfg.vae_steps else "(not yet: VAE phase)"
    print(f"{'finished' if trainer.done else 'paused (run again with --resume)'}: VAE step {trainer.vae_step}/"
          f"{cfg.vae_steps}, UNet step {trainer.step}/{cfg.steps}, {trainer.seconds / 60:.1f} min wall, "
          f"{trainer.cpu_seconds / 60:.1f} CPU-min; pipeline: {where}")
    return 0


def run_score_dm(args: ScoreDMConfig) -> int:
    import torch

    from lavender.world.dm import CHECKPOINT_DIR, format_table, score_dm

    torch.set_num_threads(args.threads)
    result = score_dm(args.dm or CHECKPOINT_DIR, n=args.n, seed=args.seed, split=args.split, device=args.device,
                      combine=[c.split("+") for c in args.combine], timesteps=args.timesteps)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def run_train_vlm(args: TrainVLMConfig) -> int:
    import torch

    from lavender.world.vlm import TINY, Recipe, WorldVLMConfig, train_vlm

    torch.set_num_threads(args.threads)
    recipe = Recipe(**args.overrides(), model=TINY if args.tiny else WorldVLMConfig())
    result = train_vlm(args.out, recipe, resume=args.resume, max_minutes=args.chunk_minutes)
    return 0 if result.get("step", 0) > 0 else 1


SUBCOMMANDS = {
    "scenes": ("write scenes as JSONL records with PNG images and mask files", (ScenesConfig,), run_scenes),
    "train-dm": ("train the world's tiny Stable Diffusion pipeline from scratch (resumable in chunks; "
                 "docs/world_dm.md)", (TrainDMConfig,), run_train_dm),
    "score-dm": ("how well a DM's Stage-1 maps localise colour and shape words, per layer", (ScoreDMConfig,),
                 run_score_dm),
    "train-vlm": ("pre-train the world's tiny VLM (Mllama or LLaVA) on scene captions (docs/world_vlm.md)",
                  (TrainVLMConfig,), run_train_vlm),
}
