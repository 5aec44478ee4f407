"""Counts and checks of an attention dataset: examples, word maps, bad records, map shape, manifest.

  lavender inspect ATTN_DIR [--json]

Checks that every shard opens, every map is finite and in [0, 1] when the manifest says min–max, and
every example has one offset pair per word. Exit 1 when a check fails.
"""

from __future__ import annotations

import json

from lavender.config import InspectConfig

CONFIGS = (InspectConfig,)


def inspect_store(root: str) -> dict:
    """The report ``lavender inspect`` prints (integers for counts, a list for the map shape)."""
    import numpy as np

    from lavender.attnstore import AttentionStore, shard_entries, shard_paths

    store = AttentionStore(root)
    problems: list[str] = []
    minmax = store.manifest.get("normalization") == "minmax"
    words = 0
    for id, ex in store:
        m = ex["maps"].astype(np.float32)
        words += len(ex["words"])
        if len(ex["offsets"]) != len(ex["words"]) or m.shape[0] != len(ex["words"]):
            problems.append(f"example {id!r}: {len(ex['words'])} words, {len(ex['offsets'])} offsets, "
                            f"{m.shape[0]} maps")
        if not np.isfinite(m).all():
            problems.append(f"example {id!r}: non-finite map values")
        elif minmax and m.size and (m.min() < -1e-3 or m.max() > 1 + 1e-3):
            problems.append(f"example {id!r}: values outside [0, 1] although normalization is minmax")
    seen: dict[str, str] = {}
    superseded = 0
    for p, entry in shard_entries(root):  # the store keeps the first copy of an id; a second is a problem
        id = entry["id"]
        if id in seen and entry.get("extra", {}).get("redo"):
            superseded += 1  # recomputed by a resume after its record or image changed: the new copy is read
        elif id in seen:
            problems.append(f"example {id!r} is stored twice ({seen[id]} and {p.name}): two runs wrote "
                            "this folder; re-extract into a fresh one")
        else:
            seen[id] = p.name
    errors = store.errors()
    return {"examples": len(store), "words": words, "errors": len(errors), "map_shape": store.map_shape(),
            "superseded": superseded,
            "shards": len(shard_paths(root)), "problems": problems, "error_samples": errors,
            "manifest": store.manifest}


def main(args: InspectConfig) -> int:
    report = inspect_store(args.attn_dir)
    if args.json:
        print(json.dumps(report))
    else:
        r = report
        print(f"{args.attn_dir}: {r['examples']} examples, {r['words']} word maps of shape {r['map_shape']}, "
              f"{r['shards']} shards, {r['errors']} bad records")
        m = r["manifest"]
        print(f"recipe {m.get('recipe')}, frame {m.get('frame')}, normalization {m.get('normalization')}, "
              f"dm {m.get('dm')}")
        for e in r["error_samples"][: args.errors]:
            print(f"  bad record {e.get('index')} (id {e.get('id')!r}): {e.get('reason')}")
        for p in r["problems"]:
            print(f"  PROBLEM: {p}")
    return 1 if report["problems"] else 0
