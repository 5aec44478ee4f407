"""Training-step cost of Lavender (λ > 0) vs plain fine-tuning (λ = 0), side by side, through `lavender train`'s code.

A Mllama model with Llama-3.2-11B-Vision's TEXT width (hidden 4096, 32 heads, 8 KV heads, MLP
14336) and a reduced depth (``--layers`` text layers, the last one cross-attention), random weights,
one 560-px tile (1601 vision tokens per tile; a narrow random vision tower, the same in both arms),
LoRA on the language model (the family's targets), the same batch of records in both arms:

* ``lambda0``: :class:`lavender.trainer.LavenderTrainer` with λ = 0 (no head, capture off);
* ``lavender``: λ = 10, the default aggregation (``heads``) and Aligner (``sim``), capture on.

Each measured step is ``compute_loss`` + ``backward`` (what ``training_step`` runs), the arms
alternating ``--repeat`` times so machine noise hits both. Prints the median milliseconds, peak
memory (CUDA: allocator peak; CPU: bytes autograd saves for backward) and the ratios.

The measured steps are ordinary ones. Every ``--grad-ratio-steps`` optimiser steps (50 by default,
and at the first) the trainer also logs ``grad_ratio``, which costs two extra backward passes; that
step is timed once on its own (``grad_ratio_step_ms``) and its cost spread over the steps between
two such logs is reported as ``amortised_ratio``. The head's share of Lavender's extra (pooling,
word averaging, resampling, Aligner and loss on the captured maps, forward + backward) is timed
apart (``head_ms``), so the cost model can tell what grows with the watched layers (the capture)
from what is paid once per step (the head).

    python benchmarks/train_step.py                                  # CPU, 2 layers (minutes)
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --layers 5 --text-tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_model(out: Path, layers: int, seed: int = 0) -> None:
    """Mllama at Llama-3.2-11B-Vision's text width, ``layers`` deep, the last one cross-attention."""
    from lavender.vlm.families import families
    from lavender.vlm.tiny import TinySizes

    sizes = TinySizes(image_size=560, patch_size=14, vision_hidden=64, vision_layers=1, vision_global_layers=1,
                      vision_heads=4, vision_mlp=128, vision_intermediate=(0,), text_hidden=4096, text_layers=layers,
                      text_heads=32, kv_heads=8, text_mlp=14336, cross_layers=(layers - 1,), max_positions=2048)
    families()["mllama"].make_tiny(str(out), seed=seed, sizes=sizes)


def build_data(root: Path, n: int, text_tokens: int, tiles: int = 1) -> tuple[Path, Path]:
    """``n`` records with ``text_tokens`` answer words; images fill ``tiles`` 560-px tiles (1: 560×560;
    4: 1120×1120, a 2×2 canvas; 2: 1120×560)."""
    from lavender.attnstore import AttentionWriter
    from lavender.words import split_words

    side = {1: (560, 560), 2: (1120, 560), 4: (1120, 1120)}[tiles]
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "a red circle and a blue square left of the green triangle".split()
    answer = " ".join(words[i % len(words)] for i in range(text_tokens))
    writer = AttentionWriter(root / "attn", {"map_size": 32, "frame": {"mode": "squash"}})
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side[1], side[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"b{i}", "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>Describe the image."}, {"role": "assistant", "content": answer}]})
        ws = split_words(answer)
        writer.add(f"b{i}", [w.text for w in ws], [(w.start, w.end) for w in ws],
                   rng.random((len(ws), 32, 32)).astype(np.float32))
    writer.close()
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl", root / "attn"


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (CPU memory proxy)."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--text-tokens", type=int, nargs="+", default=[128],
                   help="answer words (≈ tokens) per record; two or more values fit the per-word cost model")
    p.add_argument("--tiles", type=int, nargs="+", default=[1], choices=(1, 2, 4),
                   help="560-px tiles the image fills (real images use 2–4)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--aggregation", default="heads", help="Lavender arm's aggregation (default: the trainer's)")
    p.add_argument("--capture-chunk-mib", type=float, default=None,
                   help="AttentionCapture.chunk_bytes in MiB (default: the capture's; a huge value = unchunked)")
    p.add_argument("--json", default=None, help="also write the measurements and the cost model here")
    args = p.parse_args()
    for name in ("layers", "text_tokens", "batch_size", "repeat"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            p.error(f"--{name.replace('_', '-')} {values}: use 1 or more")
    if args.capture_chunk_mib is not None and args.capture_chunk_mib <= 0:
        p.error(f"--capture-chunk-mib {args.capture_chunk_mib}: use a positive size in MiB")

    tmp = Path(tempfile.mkdtemp(prefix="lav_bench_"))
    build_model(tmp / "model", args.layers)
    print(f"Mllama text width 4096/32 heads/8 KV, {args.layers} layers (the last cross-attention, the one "
          f"watched), 1601 vision tokens per tile, aggregation {args.aggregation}, batch {args.batch_size}, "
          f"{args.dtype} on {args.device}, LoRA; median of {args.repeat}, arms alternating")
    results = []
    for tiles in args.tiles:
        for words in args.text_tokens:
            results.append(measure(args, tmp, tiles, words))
    model = cost_model(results, args.layers)
    if model:
        print(model["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results,
                                               "cost_model": {k: v for k, v in (model or {}).items() if k != "text"}},
                                              indent=2))


def measure(args: argparse.Namespace, tmp: Path, tiles: int, words: int) -> dict:
    """Both arms on one batch of ``words``-word answers over ``tiles``-tile images."""
    from lavender.config import AlignmentConfig, TrainConfig
    from lavender.trainer import build_trainer

    data, attn = build_data(tmp / f"t{tiles}_w{words}", args.batch_size, words, tiles)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    arms = {}
    for name, lam in (("lambda0", 0.0), ("lavender", 10.0)):
        targs = TrainConfig(model=str(tmp / "model"), data=str(data), attention=str(attn),
                            output_dir=str(tmp / f"{name}_t{tiles}_w{words}"), lambda_att=lam,
                            per_device_train_batch_size=args.batch_size,
                            use_cpu=args.device == "cpu", report_to="none", disable_tqdm=True)
        trainer = build_trainer(targs, AlignmentConfig(aggregation=args.aggregation))
        if trainer.capture is not None and args.capture_chunk_mib is not None:
            trainer.capture.chunk_bytes = int(args.capture_chunk_mib * 2**20)
        trainer.model.to(device=device, dtype=dtype)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch_size)])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        arms[name] = (trainer, batch)

    def step(name: str, diagnostic: bool = False) -> tuple[float, int]:
        trainer, batch = arms[name]
        # global_step 0 is a grad_ratio logging step (two extra backwards): ordinary steps use 1
        trainer.state.global_step = 0 if diagnostic else 1
        trainer.model.zero_grad(set_to_none=True)
        mem = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()

        def run() -> None:
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()

        if device.type == "cuda":
            run()
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated() - base
        else:
            mem = saved_bytes(run)
        if trainer.capture is not None:
            trainer.capture.clear()
        return (time.perf_counter() - t) * 1000, mem

    for name in arms:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in arms}
    mems: dict[str, int] = {}
    for _ in range(args.repeat):
        for name in arms:
            ms, mem = step(name)
            times[name].append(ms)
            mems[name] = mem
    med = {n: statistics.median(v) for n, v in times.items()}
    diag_ms, _ = step("lavender", diagnostic=True)
    every = arms["lavender"][0].args.grad_ratio_steps
    head = [measure_head(*arms["lavender"], device) for _ in range(args.repeat)]
    head_ms, head_bytes = statistics.median(h[0] for h in head), head[-1][1]
    align = arms["lavender"][1]["lavender"]
    n_words = int(align.n_matched)
    aligner_ms = measure_aligner(arms["lavender"][0], n_words, device, args.repeat)
    n_tiles = int(arms["lambda0"][1]["aspect_ratio_mask"].sum()) if "aspect_ratio_mask" in arms["lambda0"][1] \
        else tiles
    print(f"{tiles} tile(s) ({n_tiles} valid), {words} answer words ({n_words} matched maps):")
    for n in arms:
        print(f"  {n:9s} {med[n]:10.1f} ms   {mems[n] / 2**20:9.1f} MiB   runs {[round(x) for x in times[n]]}")
    r_t, r_m = med["lavender"] / med["lambda0"], mems["lavender"] / max(mems["lambda0"], 1)
    print(f"  ratio lavender/lambda0: time {r_t:.3f}, memory {r_m:.3f}")
    amortised = (med["lavender"] + (diag_ms - med["lavender"]) / every) / med["lambda0"] if every else r_t
    print(f"  head (pool, resample, Aligner, loss; fwd+bwd) {head_ms:.1f} ms, {head_bytes / 2**20:.1f} MiB, of which "
          f"the Aligner alone {aligner_ms:.1f} ms ({aligner_ms / med['lambda0']:.3f} of the plain step); "
          f"grad_ratio step {diag_ms:.0f} ms, once per {every} steps: amortised time ratio {amortised:.3f}")
    for trainer, _ in arms.values():
        del trainer
    return {"tiles": tiles, "valid_tiles": n_tiles, "words": words, "matched": n_words,
            "ms": med, "runs_ms": times, "bytes": mems, "time_ratio": r_t, "memory_ratio": r_m,
            "head_ms": head_ms, "head_bytes": head_bytes, "aligner_ms": aligner_ms, "grad_ratio_step_ms": diag_ms,
            "grad_ratio_steps": every, "amortised_time_ratio": amortised}


def measure_head(trainer, batch: dict, device: torch.device) -> tuple[float, int]:
    """Milliseconds and saved bytes of the head alone: L_att from captured maps (held as leaves, so
    nothing upstream of the capture runs), forward + backward."""
    align = batch["lavender"]
    inputs = {k: v for k, v in batch.items() if k != "lavender"}
    trainer.capture.arm(align.plan)
    with torch.no_grad():
        trainer.model(**inputs)
    trainer.capture.maps = {k: v.detach().requires_grad_() for k, v in trainer.capture.maps.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    mem = saved_bytes(lambda: trainer._attention_term(align, device, {}).backward())
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1000
    trainer.capture.clear()
    trainer.head.zero_grad(set_to_none=True)
    return ms, mem


def measure_aligner(trainer, n_words: int, device: torch.device, repeat: int) -> float:
    """Median milliseconds of the Aligner alone on ``n_words`` maps (forward, the recompute, backward):
    the part of the head that does not depend on the model, the floor of Lavender's extra time."""
    from lavender.aligner import apply_aligner

    aligner = trainer.head.aligner
    channels = aligner.config["in_channels"]
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        x = torch.rand(n_words, channels, 32, 32, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        apply_aligner(aligner, x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    aligner.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


# The models the cost model extrapolates to: (text layers, watched layers, tokens per image tile or image)
REAL = {"Llama-3.2-11B-Vision (40 layers, its 8 cross-attention layers watched, 4 tiles)": (40, 8, 4),
        "LLaVA-1.5-7B (32 layers, 6 watched, 576 image tokens ≈ 0.36 tile)": (32, 6, 576 / 1601)}


def cost_model(results: list[dict], layers: int) -> dict | None:
    """Fit Lavender's extra cost as ``watched × capture(words) + head(words)`` and predict the ratio for
    real models from it.

    * ``capture`` — the slice of ONE watched layer (``extra − head``; the benchmark watches one layer):
      ``fixed + per_word × words``.
    * ``head`` — pooling, word averaging, resampling, Aligner and loss, paid once per step however
      many layers are watched (they are pooled first): ``fixed + per_word × words``, timed apart.

    Assumptions, stated because they bound the prediction: the plain step's time is split evenly over
    its ``layers`` text layers (the narrow random vision tower is not counted, so a real model's base
    time is UNDER-estimated and the predicted ratio is an upper bound); per-layer quantities at another
    tile count are interpolated between the measured tile counts (or scaled linearly in valid keys
    when one tile count was run).
    """
    by_tiles: dict[int, list[dict]] = {}
    for r in results:
        by_tiles.setdefault(r["valid_tiles"], []).append(r)
    fits: dict[int, dict] = {}
    for tiles, rs in by_tiles.items():
        if len({r["matched"] for r in rs}) < 2:
            continue
        w = np.array([r["matched"] for r in rs], dtype=float)
        for what, key, head_key in (("ms", "ms", "head_ms"), ("bytes", "bytes", "head_bytes")):
            head = np.array([r[head_key] for r in rs], dtype=float)
            capture = np.array([r[key]["lavender"] - r[key]["lambda0"] for r in rs], dtype=float) - head
            for part, y in (("capture", capture), ("head", head)):
                b, a = np.polyfit(w, y, 1)
                fits.setdefault(tiles, {}).setdefault(part, {})[what] = {"fixed": float(a), "per_word": float(b)}
        fits[tiles]["base_ms_per_layer"] = float(np.mean([r["ms"]["lambda0"] for r in rs]) / layers)
        fits[tiles]["base_bytes_per_layer"] = float(np.mean([r["bytes"]["lambda0"] for r in rs]) / layers)
    if not fits:
        return None
    lines = ["cost model (extra = watched layers × capture + head; fixed + per_word × words, from the runs above):"]
    for tiles, f in sorted(fits.items()):
        for part in ("capture", "head"):
            t, m = f[part]["ms"], f[part]["bytes"]
            lines.append(f"  {tiles} tile(s), {part:7s}: time {t['fixed']:7.1f} ms + {t['per_word']:.3f} ms/word; "
                         f"memory {m['fixed'] / 2**20:7.1f} MiB + {m['per_word'] / 2**20:.3f} MiB/word")
    predictions = {}
    known = sorted(fits)

    def at(tiles: float, *path: str) -> float:
        """A fitted quantity at ``tiles``: interpolated between measured tile counts, else scaled by keys."""
        vals = []
        for t in known:
            v: object = fits[t]
            for k in path:
                v = v[k]  # type: ignore[index]
            vals.append(float(v))  # type: ignore[arg-type]
        if len(known) == 1 or tiles < known[0]:
            return vals[0] * (tiles / known[0] if path[0] == "capture" else 1.0)  # the head: not fewer keys
        return float(np.interp(tiles, known, vals))

    for name, (n_layers, watched, tiles) in REAL.items():
        for words in (64, 256):
            def extra(what: str, tiles: float = tiles, words: int = words, watched: int = watched) -> float:
                return sum(n * (at(tiles, part, what, "fixed") + at(tiles, part, what, "per_word") * words)
                           for part, n in (("capture", watched), ("head", 1)))
            base_t = n_layers * at(tiles, "base_ms_per_layer")
            base_m = n_layers * at(tiles, "base_bytes_per_layer")
            predictions[f"{name}, {words} words"] = {"time_ratio": 1 + extra("ms") / base_t,
                                                     "memory_ratio": 1 + extra("bytes") / base_m}
    lines.append("predicted Lavender / plain fine-tuning (upper bounds: see cost_model's docstring):")
    for k, v in predictions.items():
        lines.append(f"  {k}: time {v['time_ratio']:.3f}, memory {v['memory_ratio']:.3f}")
    return {"fits": fits, "predictions": predictions, "text": "\n".join(lines)}


if __name__ == "__main__":
    main()
