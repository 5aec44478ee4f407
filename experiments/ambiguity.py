"""Which target does each ``--ambiguous`` policy give a repeated answer word? Measured against the truth.

On world-v2 records (the answer word occurs in the caption at the referent and, when the decoy
shares it, at the decoy), each policy of :func:`lavender.words.match_words` picks DM word(s) for the
answer; this script scores the resulting target map — the DM's Stage-1 map(s), or the true mask of
the named object(s) — against the REFERENT's true mask: the wrong-occurrence rate (the pick is not
the referent's word), mass ratio and IoU. The explicit ``align_pairs`` are the reference.

    python experiments/ambiguity.py --records runs/world_v2/data/iid-val.jsonl --attention runs/world_v2/attn_iid-val

Reads an attention dataset that ``experiments/world_v2.py`` already wrote (no model runs: seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lavender.analysis import iou, mass_ratio
from lavender.attnstore import AttentionStore
from lavender.maps import minmax_np
from lavender.words import match_words
from lavender.world.write import load_object_masks

POLICIES = ("occurrence", "first", "skip", "mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--attention", required=True)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    a = ap.parse_args()
    path = Path(a.records)
    store = AttentionStore(a.attention)
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    stats: dict[str, dict[str, list[float]]] = {p: {} for p in (*POLICIES, "pairs")}
    n_ambiguous = 0
    for rec in rows:
        if rec["id"] not in store:
            continue
        entry = store.get(rec["id"])
        answer = rec["messages"][1]["content"]
        pair = rec["align_pairs"][0]
        truth = next(j for j, o in enumerate(entry["offsets"]) if tuple(o) == (pair["dm_start"], pair["dm_end"]))
        masks = load_object_masks(rec, path.parent)
        ref = masks[rec["referent"]]
        n_ambiguous += sum(w == answer for w in entry["words"]) > 1
        picks = {p: match_words([answer], entry["words"], "exact", p)[0] for p in POLICIES}
        picks["pairs"] = [truth]
        for policy, js in picks.items():
            s = stats[policy]
            s.setdefault("aligned", []).append(float(bool(js)))
            if not js:
                continue
            target = minmax_np(np.mean(np.asarray(entry["maps"][js], dtype=np.float64), axis=0))
            s.setdefault("wrong_occurrence", []).append(float(truth not in js or len(js) > 1))
            s.setdefault("dm_mass_ratio", []).append(mass_ratio(target, ref))
            s.setdefault("dm_iou", []).append(iou(target, ref))
    table = {p: {k: float(np.nanmean(v)) for k, v in s.items()} for p, s in stats.items()}
    table["_records"] = {"n": len(rows), "ambiguous_share": n_ambiguous / max(len(rows), 1)}
    print(f"{path.name}: {len(rows)} records, answer word repeated in the DM text in "
          f"{100 * table['_records']['ambiguous_share']:.1f} %")
    print(f"{'policy':<12}{'aligned':>9}{'wrong occ.':>12}{'mass ratio':>12}{'IoU':>8}")
    for p in (*POLICIES, "pairs"):
        t = table[p]
        print(f"{p:<12}{100 * t['aligned']:>8.1f}%{100 * t.get('wrong_occurrence', np.nan):>11.1f}%"
              f"{t.get('dm_mass_ratio', np.nan):>12.2f}{t.get('dm_iou', np.nan):>8.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
