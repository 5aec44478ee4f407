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


def build_data(root: Path, n: int, text_tokens: int) -> tuple[Path, Path]:
    from lavender.attnstore import AttentionWriter
    from lavender.words import split_words

    rng = np.random.default_rng(0)
    words = "a red circle and a blue square left of the green triangle".split()
    answer = " ".join(words[i % len(words)] for i in range(text_tokens))
    writer = AttentionWriter(root / "attn", {"map_size": 32, "frame": {"mode": "squash"}})
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (560, 560, 3), dtype=np.uint8)).save(root / f"{i}.png")
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
    p.add_argument("--text-tokens", type=int, default=128, help="answer words (≈ tokens) per record")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--aggregation", default="heads", help="Lavender arm's aggregation (default: the trainer's)")
    p.add_argument("--capture-chunk-mib", type=float, default=None,
                   help="AttentionCapture.chunk_bytes in MiB (default: the capture's; a huge value = unchunked)")
    args = p.parse_args()

    from lavender.config import AlignmentConfig, TrainConfig
    from lavender.trainer import build_trainer

    tmp = Path(tempfile.mkdtemp(prefix="lav_bench_"))
    build_model(tmp / "model", args.layers)
    data, attn = build_data(tmp, args.batch_size, args.text_tokens)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    arms = {}
    for name, lam in (("lambda0", 0.0), ("lavender", 10.0)):
        targs = TrainConfig(model=str(tmp / "model"), data=str(data), attention=str(attn),
                            output_dir=str(tmp / name), lambda_att=lam, per_device_train_batch_size=args.batch_size,
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

    def step(name: str) -> tuple[float, int]:
        trainer, batch = arms[name]
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
    n_words = int(arms["lavender"][1]["lavender"].n_matched)
    print(f"Mllama text width 4096/32 heads/8 KV, {args.layers} layers (last cross-attention), 1601 vision tokens, "
          f"{args.text_tokens} answer words ({n_words} matched maps), aggregation {args.aggregation}, "
          f"batch {args.batch_size}, {args.dtype} on "
          f"{args.device}, LoRA; median of {args.repeat}, arms alternating")
    for n in arms:
        print(f"  {n:9s} {med[n]:10.1f} ms   {mems[n] / 2**20:9.1f} MiB   runs {[round(x) for x in times[n]]}")
    print(f"  ratio lavender/lambda0: time {med['lavender'] / med['lambda0']:.3f}, "
          f"memory {mems['lavender'] / max(mems['lambda0'], 1):.3f}")


if __name__ == "__main__":
    main()
