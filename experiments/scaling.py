"""AR vs Lavender fine-tuning at several data sizes × seeds on the miniature world (paper Fig. 14 style).

Every (size, seed, method) run is cached under ``--out`` (its eval JSON), so an interrupted sweep
resumes where it stopped. The fine-tuning sets are nested (record ``i`` of the train split is the
same scene whatever ``n``), so Stage 1 runs once on the largest set and every size reuses its maps.
Hyper-parameters (λ, align-on) are chosen on the VALIDATION split only (``--select``), never on test.

    python experiments/scaling.py --out runs/scaling --sizes 250 1000 --seeds 0 1 2 --steps 200
    python experiments/scaling.py --out runs/scaling --select          # λ choice on validation

Prints a table of test and OOD exact-match accuracy, mean ± std over seeds, and writes
``OUT/summary_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

import numpy as np

from lavender.config import AlignmentConfig, ExtractConfig, LavenderParser
from lavender.diffusion.extract import run_extract
from lavender.world.demo import accuracy, finetune, stage1_config, world_checkpoint
from lavender.world.write import write_split


def subset(src: Path, n: int, dst: Path) -> Path:
    """The first ``n`` records of ``src`` (image paths stay valid: same folder)."""
    lines = [ln for ln in open(src) if ln.strip()][:n]
    dst.write_text("".join(lines))
    return dst


def alignment_from_flags(align_on: str, extra: str = "") -> AlignmentConfig:
    """The Lavender arm's :class:`AlignmentConfig`: ``--align-on`` plus alignment flags in ``--extra``."""
    parser = LavenderParser([AlignmentConfig], prog="scaling.py --extra")
    return parser.parse(["--align_on", align_on, *shlex.split(extra)])[0]


def run_one(out: Path, vlm: str, train: Path, attn: Path | None, lam: float, steps: int, seed: int,
            evals: dict[str, Path], batch_size: int, lr: float, alignment: AlignmentConfig) -> dict:
    """Train one configuration (cached) and score it on each eval split."""
    cache = out / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    finetune(vlm, train, run_dir, attn, lam, steps=steps, seed=seed, batch_size=batch_size, learning_rate=lr,
             alignment=alignment, progress=False)
    result = {split: accuracy(str(run_dir), path, out / f"eval_{split}")["accuracy"] for split, path in evals.items()}
    cache.write_text(json.dumps(result))
    shutil.rmtree(run_dir)  # keep the sweep's disk small; the scores are what is cached
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 1000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    # defaults = the validation choice of `--select` (docs/experiments.md)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0)
    p.add_argument("--align-on", default="answer", choices=("answer", "all"))
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--select", action="store_true", help="choose λ on the validation split at the smallest size")
    p.add_argument("--evals", nargs="+", default=["test", "ood"], choices=("validation", "test", "ood"),
                   help="splits the sweep scores (default test ood; validation for choosing among --name variants)")
    p.add_argument("--name", default="lavender", help="the Lavender arm's name in the cache and table")
    p.add_argument("--extra", default="", help='alignment flags for the Lavender arm, e.g. '
                                               '"--aggregation mean-mean" (give it its own --name)')
    p.add_argument("--dm")
    p.add_argument("--stage1", default="", help='`lavender extract` flags instead of the DM checkpoint\'s '
                                                'choice, e.g. "--resolutions 16 8 --modules up_blocks.1.attentions.0 '
                                                'up_blocks.0.attentions.0" (use its own --out: maps are cached)')
    p.add_argument("--vlm")
    a = p.parse_args()

    out = Path(a.out)
    data = out / "data"
    dm = world_checkpoint(a.dm, "dm", "lavender world train-dm")
    vlm = world_checkpoint(a.vlm, "vlm_mllama", "lavender world train-vlm --arch mllama")
    full = write_split(data, "train", max(a.sizes), seed=0)
    attn = out / "attn"
    stage1 = stage1_config(dm, full, attn)
    if a.stage1:  # the same parser as `lavender extract`, so the same flags
        stage1 = LavenderParser([ExtractConfig], prog="scaling.py --stage1").parse(
            ["--dm", dm, "--data", str(full), "--out", str(attn), "--batch-size", "16", *shlex.split(a.stage1)])[0]
    run_extract(stage1)
    lavender = alignment_from_flags(a.align_on, a.extra)

    if a.select:
        val = write_split(data, "validation", a.n_eval, seed=0)
        n = min(a.sizes)
        train = subset(full, n, data / f"train_{n}.jsonl")
        rows = {}
        for lam in (0.0, 1.0, 10.0, 30.0):
            for align_on in ("answer", "all"):
                if lam == 0.0 and align_on == "all":
                    continue
                key = f"lambda{lam}_{align_on}"
                rows[key] = run_one(out / "select" / key, vlm, train, attn if lam else None, lam, a.steps, 0,
                                    {"validation": val}, a.batch_size, a.lr,
                                    AlignmentConfig(align_on=align_on))["validation"]
                print(f"{key}: validation {100 * rows[key]:.1f}")
        (out / "select.json").write_text(json.dumps(rows, indent=2))
        return

    evals = {split: write_split(data, split, a.n_eval, seed=0) for split in a.evals}
    table: dict[str, dict] = {}
    for n in a.sizes:
        train = subset(full, n, data / f"train_{n}.jsonl")
        for method, lam in (("ar", 0.0), (a.name, a.lam)):
            scores = [run_one(out / f"n{n}" / method / f"seed{s}", vlm, train, attn if lam else None, lam,
                              a.steps, s, evals, a.batch_size, a.lr, lavender)
                      for s in a.seeds]
            table[f"{n}/{method}"] = {split: {"mean": float(np.mean([x[split] for x in scores])),
                                              "std": float(np.std([x[split] for x in scores])),
                                              "runs": [x[split] for x in scores]} for split in evals}
    (out / f"summary_{a.name}.json").write_text(json.dumps({"config": vars(a), "table": table}, indent=2))
    print(f"{'size/method':<24} " + " ".join(f"{s:>14}" for s in evals))
    for key, row in table.items():
        cells = [f"{100 * row[s]['mean']:5.1f} ± {100 * row[s]['std']:4.1f}" for s in evals]
        print(f"{key:<24} " + " ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
