"""Stage 1 speed: `lavender extract` vs a plain per-image reference on the same random pipeline.

    .venv/bin/python benchmarks/extract_speed.py [--images 32] [--batch-size 16] [--reference-images 8]
        [--architecture tiny|sd14] [--device cuda|cpu] [--dtype float32|float16|bfloat16] [--threads N]

On a GPU, at the real size of Stable Diffusion 1.4 (random weights, built offline by ``make_tiny_dm``):

    python benchmarks/extract_speed.py --architecture sd14 --device cuda --dtype float16 --images 64 \
        --batch-size 16 --reference-images 8

The reference is written the obvious way: fp32, one image at a time, diffusers' classic
``AttnProcessor`` (explicit softmax probabilities) in EVERY attention layer, the cross-attention
probabilities of each call appended to Python lists, averaged at the end. Same recipe (``ddim``: 5
inversion + 10 denoising steps, guidance 1), same frames, same word merging, same device.
``--dtype`` is lavender's compute dtype only (the reference stays float32). The maps of both are
checked equal: every value within 2e-3 (float16 storage) when lavender computes in float32, the mean
difference within 2e-2 in float16/bfloat16 (half-precision compute); then images/s of each and their ratio are printed.
Both are timed after a CUDA synchronize, excluding model loading; on CUDA or with ``sd14``, each
first runs untimed (lavender on one batch, into a separate folder; the reference on one image) so
kernel selection/autotuning is not counted. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class RecordingAttnProcessor:
    """Explicit attention for every layer; cross-attention probabilities appended to a list."""

    def __init__(self, log: list):
        self.log = log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, N, K)
        if cross:
            self.log.append((attn.heads, probs.detach().clone()))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reference_extract(dm_path: str, records, device: str = "cpu", warmup: int = 0, size_sides=(16, 32),
                      map_size=32, steps=10, inv_steps=5):
    """Per-image Stage 1 (ddim recipe, guidance 1) in float32 on ``device``: ({id: (words, maps)}, seconds).

    The first ``warmup`` records are run once more, untimed, before the clock starts.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lavender.diffusion.extract import frame_image
    from lavender.records import dm_text, load_image
    from lavender.words import split_words, word_token_spans

    pipe = StableDiffusionPipeline.from_pretrained(dm_path, safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None, dtype=torch.float32).to(device)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    log: list = []
    unet.set_attn_processor(RecordingAttnProcessor(log))
    size = unet.config.sample_size * pipe.vae_scale_factor
    ac = sched.alphas_cumprod

    def one(rec):
        img = frame_image(load_image(rec.images[0]), size, "squash")
        px = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None].to(device) / 127.5 - 1
        with torch.no_grad():
            x = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
            text = dm_text(rec)
            enc = tok(text, padding="max_length", max_length=77, truncation=True, return_offsets_mapping=True,
                      return_special_tokens_mask=True, return_tensors="pt")
            emb = te(enc["input_ids"].to(device))[0]
            sched.set_timesteps(steps)
            t_max = int(sched.timesteps[0])
            # inversion: from clean up to t_max in inv_steps steps, eps taken at the target level
            levels = [-1] + [round(t_max * (i + 1) / inv_steps) for i in range(inv_steps)]
            for a, b in zip(levels[:-1], levels[1:]):
                a_from = ac[a] if a >= 0 else sched.final_alpha_cumprod
                eps = unet(x, b, emb).sample
                x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
                x = ac[b].sqrt() * x0 + (1 - ac[b]).sqrt() * eps
            log.clear()
            for t in sched.timesteps:
                eps = unet(x, t, emb).sample
                x = sched.step(eps, t, x).prev_sample
        maps = []
        for heads, p in log:
            n = p.shape[1]
            s = int(round(n**0.5))
            if s not in size_sides:
                continue
            m = p.view(-1, heads, n, 77).mean(1)[0]  # (N, 77)
            m = m.T.reshape(77, 1, s, s)
            maps.append(F.interpolate(m, size=(map_size, map_size), mode="bilinear", align_corners=False,
                                      antialias=s > map_size)[:, 0])
        token_maps = torch.stack(maps).mean(0)  # (77, S, S)
        words = split_words(text)
        spans = word_token_spans(words, [tuple(o) for o in enc["offset_mapping"][0].tolist()],
                                 [bool(v) for v in enc["special_tokens_mask"][0].tolist()])
        wm = []
        for toks in spans:
            m = token_maps[toks].mean(0)
            wm.append(((m - m.min()) / (m.max() - m.min())).cpu().numpy())
        return [w.text for w in words], np.stack(wm)

    for rec in records[:warmup]:
        one(rec)
    _sync(device)
    t0 = time.perf_counter()
    out = {rec.id: one(rec) for rec in records}
    _sync(device)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reference-images", type=int, default=8,
                    help="images the (slow) reference runs on; its images/s is per image anyway")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--architecture", choices=("tiny", "sd14"), default="tiny",
                    help="tiny (default: 64 px) or sd14 (Stable Diffusion 1.4 sizes, 512 px), random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of both runs (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="lavender extract's compute dtype (default float32); the reference is always float32")
    ap.add_argument("--also", nargs="*", default=[], choices=("nulltext", "noise"),
                    help="also time these recipes (lavender only; no reference): images/s and UNet evaluations")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lavender-bench-"))
    try:
        _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the sd14 pipeline alone is 2 GB


def _run(args: argparse.Namespace, work: Path) -> None:
    from PIL import Image

    from lavender.attnstore import AttentionStore
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.diffusion.tiny import make_tiny_dm
    from lavender.records import read_records

    dm = str(make_tiny_dm(work / "dm", architecture=args.architecture))
    side = 512 if args.architecture == "sd14" else 64  # input images about the DM's size, framed by squashing
    rng = np.random.default_rng(0)
    words = "a red circle left of the blue square above two green stars near a small yellow triangle".split()
    rows = []
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (side + 8 * (i % 3), side, 3), dtype=np.uint8)).save(work / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "caption": " ".join(rng.choice(words, 8))})
    (work / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(work / "r.jsonl")

    warm = torch.device(args.device).type == "cuda" or args.architecture == "sd14"
    shared = dict(dm=dm, data=str(work / "r.jsonl"), batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    if warm:  # one untimed batch into its own folder: kernel selection / autotuning is not timed
        run_extract(ExtractConfig(out=str(work / "attn-warmup"), limit=min(args.batch_size, args.images), **shared),
                    progress=False)
        gc.collect()
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    _sync(args.device)
    # run_extract's images/s: wall time of the extraction loop (model loading excluded); its maps reach the
    # CPU per batch, so the GPU has finished when its clock stops
    summary = run_extract(ExtractConfig(out=str(work / "attn"), **shared), progress=False)
    fast = summary["images_per_s"]
    ref_records = records[: args.reference_images]
    ref, ref_s = reference_extract(dm, ref_records, args.device, warmup=1 if warm else 0)
    slow = len(ref_records) / ref_s

    store = AttentionStore(work / "attn")
    diffs = []
    for id, (w, m) in ref.items():
        ex = store.get(id)
        assert ex["words"] == w, (id, ex["words"], w)
        diffs.append(np.abs(ex["maps"].astype(np.float32) - m).ravel())
    diffs = np.concatenate(diffs)
    worst, mean = float(diffs.max()), float(diffs.mean())
    half = args.dtype != "float32"
    # float32: every value within float16 storage; half precision: rounding in a 15-step recurrence moves
    # single cells (fp16 worst 6.9e-2 on the tiny DM), so the MEAN difference is what is bounded
    stat, value, tol = ("mean", mean, 2e-2) if half else ("worst", worst, 2e-3)
    dev = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    print(f"images: {len(records)} (reference: {len(ref_records)}), {args.architecture} DM {side} px, recipe ddim "
          f"(5 + 10 steps), device {args.device} ({dev_name}), lavender dtype {args.dtype} (reference float32), "
          f"torch threads {torch.get_num_threads()}")
    print(f"lavender extract (batch {args.batch_size}): {fast:.2f} images/s")
    print(f"per-image reference:            {slow:.2f} images/s")
    print(f"speed-up ratio: {fast / slow:.2f}x")
    print(f"maps vs reference: worst difference {worst:.1e}, mean {mean:.1e}; bound on the {stat}: {tol:.0e} "
          f"({'half-precision compute and storage' if half else 'float16 storage'})")
    figures = {"device": dev_name, "architecture": args.architecture, "dtype": args.dtype, "images": len(records),
               "batch_size": args.batch_size, "ddim_images_per_s": fast, "reference_images_per_s": slow,
               "speedup": fast / slow, "maps_worst_diff": worst, "maps_mean_diff": mean,
               "unet_evals_per_image": {"ddim": summary.get("unet_evals_per_image")}}
    for recipe in args.also:
        extra = run_extract(ExtractConfig(out=str(work / f"attn-{recipe}"), recipe=recipe, **shared), progress=False)
        figures[f"{recipe}_images_per_s"] = extra["images_per_s"]
        figures["unet_evals_per_image"][recipe] = extra.get("unet_evals_per_image")
        print(f"lavender extract --recipe {recipe}: {extra['images_per_s']:.2f} images/s "
              f"({extra.get('unet_evals_per_image')} UNet evaluations/image)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    # checked after the timings are printed, so a half-precision mismatch still reports the speeds
    assert value < tol, f"maps differ from the reference: {stat} {value:.3g} (≥ {tol})"


if __name__ == "__main__":
    main()
