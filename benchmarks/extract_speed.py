"""Stage 1 speed: `lavender extract` vs a plain per-image reference on the same tiny pipeline.

    .venv/bin/python benchmarks/extract_speed.py [--images 32] [--batch-size 16] [--reference-images 8]

The reference is written the obvious way: fp32, one image at a time, diffusers' classic
``AttnProcessor`` (explicit softmax probabilities) in EVERY attention layer, the cross-attention
probabilities of each call appended to Python lists, averaged at the end. Same recipe (``ddim``: 5
inversion + 10 denoising steps, guidance 1), same frames, same word merging. The maps of both are
checked equal (within float16 storage), then images/s of each and their ratio are printed.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
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


def reference_extract(dm_path: str, records, size_sides=(16, 32), map_size=32, steps=10, inv_steps=5):
    """Per-image Stage 1 (ddim recipe, guidance 1): returns {id: (words, maps)} and seconds."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lavender.diffusion.extract import frame_image
    from lavender.records import dm_text, load_image
    from lavender.words import split_words, word_token_spans

    pipe = StableDiffusionPipeline.from_pretrained(dm_path, safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    log: list = []
    unet.set_attn_processor(RecordingAttnProcessor(log))
    size = unet.config.sample_size * pipe.vae_scale_factor
    ac = sched.alphas_cumprod
    out = {}
    t0 = time.perf_counter()
    for rec in records:
        img = frame_image(load_image(rec.images[0]), size, "squash")
        px = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():
            x = vae.encode(px).latent_dist.mean * vae.config.scaling_factor
            text = dm_text(rec)
            enc = tok(text, padding="max_length", max_length=77, truncation=True, return_offsets_mapping=True,
                      return_special_tokens_mask=True, return_tensors="pt")
            emb = te(enc["input_ids"])[0]
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
            wm.append(((m - m.min()) / (m.max() - m.min())).numpy())
        out[rec.id] = ([w.text for w in words], np.stack(wm))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reference-images", type=int, default=8,
                    help="images the (slow) reference runs on; its images/s is per image anyway")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from PIL import Image

    from lavender.attnstore import AttentionStore
    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.diffusion.tiny import make_tiny_dm
    from lavender.records import read_records

    work = Path(tempfile.mkdtemp(prefix="lavender-bench-"))
    dm = str(make_tiny_dm(work / "dm"))
    rng = np.random.default_rng(0)
    words = "a red circle left of the blue square above two green stars near a small yellow triangle".split()
    rows = []
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (64 + 8 * (i % 3), 64, 3), dtype=np.uint8)).save(work / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "caption": " ".join(rng.choice(words, 8))})
    (work / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(work / "r.jsonl")

    cfg = ExtractConfig(dm=dm, data=str(work / "r.jsonl"), out=str(work / "attn"), batch_size=args.batch_size)
    summary = run_extract(cfg, progress=False)
    fast = summary["images_per_s"]
    ref_records = records[: args.reference_images]
    ref, ref_s = reference_extract(dm, ref_records)
    slow = len(ref_records) / ref_s

    store = AttentionStore(work / "attn")
    worst = 0.0
    for id, (w, m) in ref.items():
        ex = store.get(id)
        assert ex["words"] == w, (id, ex["words"], w)
        worst = max(worst, float(np.abs(ex["maps"].astype(np.float32) - m).max()))
    assert worst < 2e-3, f"maps differ from the reference by {worst}"
    print(f"images: {len(records)} (reference: {len(ref_records)}), tiny DM 64 px, recipe ddim (5 + 10 steps), torch threads {torch.get_num_threads()}")
    print(f"lavender extract (batch {args.batch_size}): {fast:.2f} images/s")
    print(f"per-image reference:            {slow:.2f} images/s")
    print(f"maps equal within {worst:.1e}; speed-up ratio: {fast / slow:.2f}x")


if __name__ == "__main__":
    main()
