"""Recipes of the miniature world.

  lavender world scenes --out DIR --split train --n 1000 --seed 0            VQA records
  lavender world scenes --out DIR --split train --n 5000 --seed 0 --captions caption rows
  lavender world train-dm --out DIR [--steps 3000] [--seed 0] [--device cuda] [--chunk-minutes 10] [--resume]
  lavender world score-dm --dm DIR/pipeline [--n 100] [--out scores.json]
  lavender world train-vlm --arch mllama --out DIR --steps 800 --seed 0 [--chunk-minutes 10] [--resume]

Each recipe is a sub-subcommand with one small function here; the work lives in lavender.world.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    _add_scenes(sub)
    _add_train_dm(sub)
    _add_train_vlm(sub)


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


def _add_train_dm(sub) -> None:
    from lavender.world.dm import DMConfig

    d = DMConfig()
    p = sub.add_parser("train-dm", help="train the world's tiny Stable Diffusion pipeline from scratch",
                       description="Train the miniature world's text-to-image DM (VAE, then UNet + CLIP text "
                                   "encoder) on fresh scenes; resumable in chunks. The pipeline is written "
                                   "with save_pretrained to OUT/pipeline after every chunk. See docs/world_dm.md.")
    p.add_argument("--out", required=True, help="run folder (train_state.pt, train_info.json, pipeline/)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"UNet + text-encoder steps (default {d.steps})")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps,
                   help=f"VAE reconstruction steps, run first (default {d.vae_steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"scenes per UNet step (default {d.batch_size})")
    p.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size,
                   help=f"scenes per VAE step (default {d.vae_batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, data and noise (default {d.seed})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"UNet/text-encoder peak learning rate (default {d.lr})")
    p.add_argument("--unet-channels", type=int, nargs="+", default=list(d.unet_channels),
                   help="UNet block widths; one level per entry (default %(default)s)")
    p.add_argument("--vae-channels", type=int, nargs="+", default=list(d.vae_channels),
                   help="VAE block widths; the latent side is 64 / 2^(len-1) (default %(default)s)")
    p.add_argument("--text-width", type=int, default=d.text_width, help="text encoder width (default %(default)s)")
    p.add_argument("--text-layers", type=int, default=d.text_layers,
                   help="text encoder layers; 0 = token + position embeddings only, so no token (padding "
                        "included) carries the rest of the caption (default %(default)s)")
    p.add_argument("--chunk-minutes", type=float, default=None,
                   help="stop after this many minutes, saving state (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu",
                   help="cpu (the recipe's budget is CPU time) or cuda; the batches are the same (default cpu)")
    p.set_defaults(run=_train_dm)

    s = sub.add_parser("score-dm", help="how well a DM's Stage-1 maps localise colour and shape words",
                       description="Run Stage 1's ddim recipe on held-out scenes and report, per cross-attention "
                                   "layer and per resolution, the attention mass inside each colour/shape "
                                   "word's object over a uniform map's (1.0 = none) and the IoU of the map "
                                   "thresholded at 0.5 of its min-max range with the mask.")
    s.add_argument("--dm", default=None, help="pipeline folder (default: the committed world DM)")
    s.add_argument("--n", type=int, default=100, help="held-out scenes (default 100)")
    s.add_argument("--seed", type=int, default=1234, help="scene seed (default 1234)")
    s.add_argument("--split", default="test", help="scene split (default test)")
    s.add_argument("--out", default=None, help="write the result JSON here")
    s.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    s.add_argument("--device", default="cpu", help="torch device (default cpu)")
    s.add_argument("--combine", nargs="+", default=[], metavar="L1+L2",
                   help="also score layer combinations: short layer names joined by '+', as the table names "
                        "them (e.g. up_blocks.1.a0.attn2+up_blocks.0.a0.attn2)")
    s.set_defaults(run=_score_dm)


def _train_dm(args: argparse.Namespace) -> int:
    import torch

    from lavender.world.dm import DMConfig, train_dm

    torch.set_num_threads(args.threads)
    if args.steps < 0 or args.vae_steps < 1 or args.batch_size < 1:
        raise SystemExit("lavender world train-dm: --steps must be >= 0, --vae-steps and --batch-size >= 1")
    cfg = DMConfig(steps=args.steps, vae_steps=args.vae_steps, batch_size=args.batch_size,
                   vae_batch_size=args.vae_batch_size, seed=args.seed,
                   lr=args.lr, unet_channels=tuple(args.unet_channels), vae_channels=tuple(args.vae_channels),
                   text_width=args.text_width, text_layers=args.text_layers)
    trainer = train_dm(args.out, cfg, resume=args.resume, chunk_minutes=args.chunk_minutes,
                       device=args.device)
    where = f"{args.out}/pipeline" if trainer.vae_step >= cfg.vae_steps else "(not yet: VAE phase)"
    print(f"{'finished' if trainer.done else 'paused (run again with --resume)'}: VAE step {trainer.vae_step}/"
          f"{cfg.vae_steps}, UNet step {trainer.step}/{cfg.steps}, {trainer.seconds / 60:.1f} min wall, "
          f"{trainer.cpu_seconds / 60:.1f} CPU-min; pipeline: {where}")
    return 0


def _score_dm(args: argparse.Namespace) -> int:
    import json

    import torch

    from lavender.world.dm import CHECKPOINT_DIR, format_table, score_dm

    torch.set_num_threads(args.threads)
    result = score_dm(args.dm or CHECKPOINT_DIR, n=args.n, seed=args.seed, split=args.split, device=args.device,
                      combine=[c.split("+") for c in args.combine])
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _add_train_vlm(sub) -> None:
    from lavender.world.vlm import ARCHS, Recipe

    r = Recipe()
    p = sub.add_parser("train-vlm", help="pre-train the world's tiny VLM (Mllama or LLaVA) on scene captions",
                       description="Pre-train a world-sized VLM from scratch on fresh train-split scenes "
                                   "(\"<image>Describe the image.\" -> caption; optionally a share of "
                                   "seen-template questions); resumable in chunks. OUT holds the model and "
                                   "processor (save_pretrained) after every chunk. See docs/world_vlm.md.")
    p.add_argument("--arch", default=r.arch, choices=ARCHS, help=f"architecture (default {r.arch})")
    p.add_argument("--out", required=True, help="model folder (+ training_state/ until the run completes)")
    p.add_argument("--steps", type=int, default=r.steps, help=f"optimiser steps in total (default {r.steps})")
    p.add_argument("--batch-size", type=int, default=r.batch_size, help=f"scenes per step (default {r.batch_size})")
    p.add_argument("--seed", type=int, default=r.seed, help=f"seed of weights and data (default {r.seed})")
    p.add_argument("--lr", type=float, default=r.lr, help=f"AdamW peak learning rate (default {r.lr})")
    p.add_argument("--vqa-fraction", type=float, default=r.vqa_fraction,
                   help="share of examples that are seen-template questions instead of captions "
                        f"(default {r.vqa_fraction}: captions only)")
    p.add_argument("--save-every", type=int, default=r.save_every, help="steps between resumable checkpoints")
    p.add_argument("--eval-every", type=int, default=r.eval_every, help="steps between held-out evaluations")
    p.add_argument("--tiny", action="store_true", help="a unit-test-sized model (seconds, learns little)")
    p.add_argument("--chunk-minutes", type=float, default=None,
                   help="stop after this many minutes, saving state (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(run=_train_vlm)


def _train_vlm(args: argparse.Namespace) -> int:
    import torch

    from lavender.world.vlm import TINY, Recipe, WorldVLMConfig, train_vlm

    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit(f"lavender world train-vlm: --steps and --batch-size must be >= 1, got "
                         f"{args.steps} and {args.batch_size}")
    if not 0 <= args.vqa_fraction <= 1:
        raise SystemExit(f"lavender world train-vlm: --vqa-fraction must be in [0, 1], got {args.vqa_fraction}")
    torch.set_num_threads(args.threads)
    recipe = Recipe(arch=args.arch, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    vqa_fraction=args.vqa_fraction, save_every=args.save_every, eval_every=args.eval_every,
                    model=TINY if args.tiny else WorldVLMConfig())
    result = train_vlm(args.out, recipe, resume=args.resume, max_minutes=args.chunk_minutes)
    return 0 if result.get("step", 0) > 0 else 1
