"""Which Stage-1 reading of the world DM localises the REFERENT of a world-v2 answer word?

For each record of a world-v2 split, the DM's raw map of the paired answer-word occurrence (the
referent's word in the caption) under several Stage-1 readings — every cross-attention layer and the
resolution means, under the ``ddim`` recipe and the one-pass ``noise`` recipe at several timesteps —
is compared with the referent's and the decoy's true masks: mass ratio (1 = uniform), selectivity =
referent / decoy, IoU with the referent. The pre-trained world VLM's row scores selectivity 1.59 on
shift-val (docs/experiments.md, "The premise"); a reading above it makes the paper's premise true.

    python experiments/dm_probe.py --records runs/world_v2/data/iid-val.jsonl --out runs/dm_probe_iid-val.json

Choose on ``iid-val`` (never on a test split); ``shift-val`` shows whether the choice holds where
the decoy does not share the answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lavender.analysis import iou, mass_ratio
from lavender.maps import minmax_np
from lavender.world.demo import world_checkpoint
from lavender.world.dm import LayerMaps
from lavender.world.v2 import referent_phrase
from lavender.world.write import load_object_masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[100, 250, 400, 550, 700, 850])
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=30, help="rows printed (all are in --out)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = Path(a.records)
    recs = [json.loads(line) for line in open(path)][: a.limit]
    lm = LayerMaps(world_checkpoint(None, "dm", "lavender world train-dm"),
                   combine=[["up_blocks.1.a0.attn2", "up_blocks.0.a0.attn2"], ["up_blocks.1.a0.attn2", "mid_block.a0.attn2"]])
    readings = [("ddim", None)] + [(f"noise t={t}", [t]) for t in a.timesteps]
    acc: dict[str, list[tuple[float, float, float]]] = {}
    t0 = time.perf_counter()
    for i in range(0, len(recs), a.batch_size):
        batch = recs[i: i + a.batch_size]
        images = np.stack([np.asarray(Image.open(path.parent / r["images"][0]).convert("RGB")) for r in batch])
        caps = [r["align_text"] for r in batch]
        masks = [load_object_masks(r, path.parent) for r in batch]
        for name, ts in readings:
            maps = lm.maps_by_group(images, caps, timesteps=ts, ids=[r["id"] for r in batch])
            for g, per in maps.items():
                for r, mk, words in zip(batch, masks, per):
                    pair = r["align_pairs"][0]
                    word = words[(pair["dm_start"], pair["dm_end"])]
                    # the referent's phrase ("red circle"): its answer word and its naming word, each
                    # min-max normalised as Stage 1 stores them, averaged as a phrase pair's target is
                    phrase = np.mean([minmax_np(words[o]) for o in referent_phrase(r)], axis=0)
                    ref, dec = mk[r["referent"]], mk[r["decoy"]]
                    for target, m in (("word", word), ("phrase", phrase)):
                        row = (mass_ratio(m, ref), mass_ratio(m, dec), iou(m, ref))
                        for key in (f"{name} | {g} | {target} | all", f"{name} | {g} | {target} | {r['type']}"):
                            acc.setdefault(key, []).append(row)
        print(f"{i + len(batch)}/{len(recs)} records, {time.perf_counter() - t0:.0f} s", flush=True)
    table = {}
    for key, rows in acc.items():
        arr = np.array(rows)
        table[key] = {"referent": float(arr[:, 0].mean()), "decoy": float(arr[:, 1].mean()),
                      "selectivity": float(arr[:, 0].mean() / arr[:, 1].mean()), "iou": float(arr[:, 2].mean()),
                      "n": len(rows)}
    Path(a.out).write_text(json.dumps({"records": str(path), "table": table}, indent=2))
    print("| reading | layers | target | words | referent | decoy | selectivity | IoU |\n"
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for key, r in sorted(table.items(), key=lambda kv: -kv[1]["selectivity"])[: a.top]:
        name, g, target, kind = key.split(" | ")
        print(f"| {name} | {g} | {target} | {kind} | {r['referent']:.2f} | {r['decoy']:.2f} | {r['selectivity']:.2f} | "
              f"{r['iou']:.3f} |")


if __name__ == "__main__":
    main()
