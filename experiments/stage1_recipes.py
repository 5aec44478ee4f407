"""Stage-1 recipes, quality against cost, on the miniature world (issue #16, item 3).

For each recipe — the one-pass ``noise`` recipe at one and at three timesteps, ``ddim`` and
``nulltext`` — Stage 1 runs through the real extraction path (``lavender extract``'s
:func:`run_extract`, stored maps unnormalised) over the same world-v2 validation records, at each
READING (the DM's word-localisation layer, ``stage1.yaml``, and its binding reading,
``stage1_binding.yaml``), and every colour/shape word map is scored against its own object's true
mask:

- ``ratio``: mass ratio of the raw map on the word's object (mass share / area share; 1 = uniform);
- ``iou``: IoU of the map's top half (min–max ≥ 0.5) with the object's mask;
- ``ratio_other``: mass ratio on the scene's OTHER objects (a map that binds the word ranks its own
  object above them);
- ``agree_nulltext``: Pearson correlation of the word's map with the ``nulltext`` recipe's map of the
  same word (1 = the same map up to scale);
- ``evals``: UNet evaluations per image (``nulltext``: its upper bound, and the number it made after
  its early stops) and measured seconds per image (the extraction loop, not loading the DM).

One command reproduces the table (cached per recipe; ``--n`` records of ``iid-val``, data seed 0):

    python experiments/stage1_recipes.py --out runs/stage1_recipes --n 100

Timings are this machine's, single process, and only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lavender.analysis import mass_ratio
from lavender.attnstore import AttentionStore
from lavender.config import ExtractConfig, config_from_file
from lavender.diffusion.extract import evals_per_image, run_extract
from lavender.world.demo import world_checkpoint
from lavender.world.dm import thresholded_iou
from lavender.world.scenes import COLOURS, SHAPES, downsample_masks
from lavender.world.v2 import write_v2_split
from lavender.world.write import load_object_masks

RECIPES: dict[str, dict] = {
    "noise t=100": {"recipe": "noise", "timesteps": [100]},
    "noise t=100,250,400": {"recipe": "noise", "timesteps": [100, 250, 400]},
    "ddim": {"recipe": "ddim"},
    "nulltext": {"recipe": "nulltext"},
}
READINGS = ("stage1.yaml", "stage1_binding.yaml")


def word_objects(text: str) -> dict[tuple[int, int], int]:
    """Offsets of each colour/shape word of a world caption → the index of the object it names."""
    spans, start = [], 0
    for w in text.split(" "):
        if w in COLOURS or w in SHAPES:
            spans.append((start, start + len(w)))
        start += len(w) + 1
    return {s: k // 2 for k, s in enumerate(spans)}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/stage1_recipes")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.n < 1:
        ap.error(f"--n {a.n}: the number of iid-val records must be at least 1")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    data = out / "data"
    records = data / "iid-val.jsonl"
    if not records.exists() or sum(1 for _ in open(records)) < a.n:  # prefix-stable: a larger --n extends it
        write_v2_split(data, "iid-val", a.n, seed=0, p=1.0)
    recs = [json.loads(ln) for ln in open(records)][: a.n]
    dm = world_checkpoint(None, "dm", "lavender world train-dm")
    result: dict = {"n_records": len(recs), "records": str(records), "readings": {}}
    for reading in READINGS:
        stores, cost = {}, {}
        for name, opts in RECIPES.items():
            folder = out / f"{Path(reading).stem}_{name.replace(' ', '_').replace('=', '').replace(',', '-')}"
            cfg = config_from_file(ExtractConfig, str(Path(dm) / reading), dm=dm, data=str(records), out=str(folder),
                                   normalize="none", batch_size=10, progress=False, limit=a.n, **opts)
            timing = folder / "timing.json"
            if not timing.exists():
                t0 = time.perf_counter()
                summary = run_extract(cfg)
                timing.write_text(json.dumps({"seconds": time.perf_counter() - t0, "summary": summary}))
            summary = json.loads(timing.read_text())["summary"]  # its seconds exclude loading the DM
            cost[name] = {"evals_per_image": evals_per_image(cfg),
                          "evals_per_image_measured": summary["unet_evals"] / max(summary["done"], 1),
                          "seconds_per_image": summary["seconds"] / max(summary["done"], 1)}
            stores[name] = AttentionStore(folder)
        rows = {}
        for name, store in stores.items():
            acc: list[tuple[float, float, float, float]] = []
            for rec in recs:
                got, ref = store.get(rec["id"]), stores["nulltext"].get(rec["id"])
                ref_maps = dict(zip(ref["offsets"], ref["maps"]))
                masks = load_object_masks(rec, data)
                objects = word_objects(rec["align_text"])
                for off, m in zip(got["offsets"], got["maps"]):
                    k = objects.get(tuple(off))
                    if k is None:
                        continue
                    size = m.shape[-1]
                    mask = downsample_masks(masks[k][None], size)[0]
                    others = [masks[j] for j in range(len(masks)) if j != k and not np.array_equal(masks[j], masks[k])]
                    other = downsample_masks(np.any(others, axis=0)[None], size)[0] if others else None
                    acc.append((mass_ratio(m, mask), thresholded_iou(m, mask),
                                mass_ratio(m, other) if other is not None else float("nan"),
                                pearson(m, ref_maps[tuple(off)])))
            arr = np.array(acc, dtype=np.float64)
            rows[name] = {"ratio": float(np.nanmean(arr[:, 0])), "iou": float(np.nanmean(arr[:, 1])),
                          "ratio_other": float(np.nanmean(arr[:, 2])), "agree_nulltext": float(np.nanmean(arr[:, 3])),
                          "words": len(arr), **cost[name]}
        result["readings"][reading] = rows
    (out / "result.json").write_text(json.dumps(result, indent=2))
    for reading, rows in result["readings"].items():
        print(f"\n{reading} ({result['n_records']} iid-val records)\n")
        print("| recipe | UNet evals / image (made) | s / image | mass ratio | IoU | ratio on other objects | "
              "agreement with nulltext (r) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r in rows.items():
            print(f"| `{name}` | {r['evals_per_image']:g} ({r['evals_per_image_measured']:.3g}) | "
                  f"{r['seconds_per_image']:.3f} | {r['ratio']:.2f} | "
                  f"{r['iou']:.3f} | {r['ratio_other']:.2f} | {r['agree_nulltext']:.3f} |")


if __name__ == "__main__":
    main()
