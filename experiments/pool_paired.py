"""Pool the paired seeds of independent replicates (e.g. two data seeds) into one paired comparison.

Each replicate is a ``summary_*.json`` of ``experiments/world_v2.py``; a pair is (arm, AR) at one
seed of one replicate, so n = seeds × replicates, with a 95 % t-interval on n − 1 degrees of freedom.

    python experiments/pool_paired.py runs/world_v2/summary_mllamamass_.json runs/world_v2_d1/summary_mllamamass_.json
"""

from __future__ import annotations

import argparse
import json

from lavender.stats import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("--size", default="300")
    ap.add_argument("--against", default="ar", help="the reference arm (default AR)")
    a = ap.parse_args()
    parts = [json.load(open(p))["sizes"][a.size] for p in a.summaries]
    arms = [arm for arm in parts[0]["shift"] if arm not in ("majority", a.against)]
    print(f"{len(parts)} replicates, size {a.size}: arm − {a.against}, points [95 % CI], n pairs")
    for split in ("iid", "shift"):
        for arm in arms:
            x = [v for s in parts for v in s[split][arm]["per_seed"]]
            y = [v for s in parts for v in s[split][a.against]["per_seed"]]
            d = paired_difference(x, y)
            lo, hi = d["ci95"]
            print(f"{split:6}{arm:10}{100 * d['mean']:+6.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]  n={d['n']}")


if __name__ == "__main__":
    main()
