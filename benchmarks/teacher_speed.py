"""Stage 1 throughput of each teacher (SD-1.x, SDXL, SD3, Flux) through `lavender extract`, per recipe.

No per-image reference here (``extract_speed.py`` keeps the SD-1.x one, with its map-equality check):
this measures what a user gets — images/s of ``run_extract`` (the extraction loop; loading the
pipeline excluded) and the denoiser evaluations per image — on random weights of the real sizes
(``make_tiny_dm`` presets) or of the tiny architectures (for CPU smoke runs).

    python benchmarks/teacher_speed.py --architecture sdxl --recipes noise ddim              # CPU, tiny
    python benchmarks/teacher_speed.py --architecture sdxl-base sd3-medium --device cuda --dtype float16 \
        --images 32 --batch-size 8 --recipes noise --json teachers.json                      # GPU, real size

On CUDA one untimed batch runs first (kernel selection). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REAL_SIDE = {"sd14": 512, "sdxl-base": 1024, "sd3-medium": 1024, "flux-dev": 1024}


def measure(architecture: str, recipes: list[str], images: int, batch_size: int, device: str, dtype: str,
            work: Path) -> dict:
    """{recipe: {images_per_s, evals_per_image}} for one teacher, plus its build time."""
    from PIL import Image

    from lavender.diffusion.extract import ExtractConfig, run_extract
    from lavender.diffusion.tiny import make_tiny_dm

    t0 = time.perf_counter()
    dm = str(make_tiny_dm(work / architecture, architecture=architecture))
    built = time.perf_counter() - t0
    side = REAL_SIDE.get(architecture, 64)
    rng = np.random.default_rng(0)
    words = "a red circle left of the blue square above two green stars near a small yellow triangle".split()
    data = work / f"{architecture}.jsonl"
    with open(data, "w") as f:
        for i in range(images):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(work / f"{architecture}_{i}.png")
            f.write(json.dumps({"id": str(i), "image": f"{architecture}_{i}.png",
                                "caption": " ".join(rng.choice(words, 8))}) + "\n")
    out: dict = {"build_seconds": built, "image_side": side}
    for recipe in recipes:
        shared = dict(dm=dm, data=str(data), batch_size=batch_size, dtype=dtype, device=device, recipe=recipe)
        try:
            if torch.device(device).type == "cuda":  # one untimed batch: kernel selection is not timed
                run_extract(ExtractConfig(out=str(work / f"warm-{architecture}-{recipe}"), limit=batch_size, **shared),
                            progress=False)
            s = run_extract(ExtractConfig(out=str(work / f"attn-{architecture}-{recipe}"), **shared), progress=False)
            out[recipe] = {"images_per_s": s["images_per_s"], "evals_per_image": s["unet_evals"] / max(s["done"], 1),
                           "done": s["done"], "failed": s["failed"]}
        except Exception as e:  # a recipe the teacher refuses (e.g. nulltext on a flow model): reported, not fatal
            out[recipe] = {"error": str(e).splitlines()[0]}
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        print(f"{architecture:>11} {recipe:>8}: {out[recipe]}", flush=True)
    shutil.rmtree(work / architecture, ignore_errors=True)  # real-size pipelines are GBs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lavender.diffusion.tiny import ARCHITECTURES

    ap.add_argument("--architecture", nargs="+", default=["tiny", "sdxl", "sd3", "flux"], choices=list(ARCHITECTURES),
                    help="make_tiny_dm architectures (tiny ones, or the real-size presets sd14, sdxl-base, "
                         "sd3-medium, flux-dev)")
    ap.add_argument("--recipes", nargs="+", default=["noise", "ddim"], choices=("noise", "ddim", "nulltext"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.images < 1 or a.batch_size < 1:
        ap.error("--images and --batch-size must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="lavender-teachers-"))
    result = {"device": torch.cuda.get_device_name(0) if torch.device(a.device).type == "cuda" else "cpu",
              "dtype": a.dtype, "images": a.images, "batch_size": a.batch_size, "teachers": {}}
    try:
        for arch in a.architecture:
            result["teachers"][arch] = measure(arch, a.recipes, a.images, a.batch_size, a.device, a.dtype, work)
            if a.json:  # after each teacher: a run cut by a timeout keeps what it measured
                Path(a.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
