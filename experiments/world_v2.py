"""World v2: does aligning the VLM's attention with a teacher make it answer better when a shortcut breaks?

One command, cached and resumable (every run's result is a JSON file under ``--out``; rerun to go on):

    python experiments/world_v2.py --out runs/world_v2 --seeds 0 1 2 3 4 --sizes 300 1000

Phases:

1. Data (deterministic by ``--data-seed``): ``train`` (the largest size; smaller sizes are its
   prefix), ``iid-val`` and ``shift-val`` (200 each), ``iid`` and ``shift`` test (``--n-test``).
2. Stage 1 with the world DM on train / iid-val / shift-val; the oracle's maps (the referent's true
   mask) and, per seed, the shuffled control's (another record's referent mask).
3. The premise: on ``iid-val``, the DM teacher's map for the paired answer word against the
   pre-trained VLM's aligned-row attention (mass on the referent and the decoy, IoU, selectivity).
4. The recipe, for AR only and on ``iid-val`` only: a small grid of steps × learning rate; the
   best iid-val accuracy is the recipe of every arm (ties → fewer steps). Training accuracy is
   reported (the issue's bar: ≥ 95 %).
5. Arms × seeds × sizes with :func:`lavender.world.arms.run_arm`: AR, Lavender (DM), oracle,
   shuffled; λ from ``--calibrate-lambda`` at one fixed ratio for every attention arm.
6. Summary per size (:func:`lavender.world.arms.summarise`: mean ± std, paired differences vs AR
   with 95 % t-intervals over seeds) → ``summary.json``, figures, ``report.md``.

Torch uses ``--threads`` (default 2) threads so numbers do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lavender.config import ExtractConfig, config_from_file
from lavender.diffusion.extract import run_extract
from lavender.versions import software_versions
from lavender.world.arms import ARMS, Recipe, attention_on_objects, run_arm, summarise, write_mask_attention
from lavender.world.demo import majority_accuracy, stage1_config, strict_json, world_checkpoint
from lavender.world.v2 import PAIRINGS, write_v2_split, write_with_pairs

GRID = [(150, 1e-3), (300, 1e-3), (300, 2e-3), (300, 3e-3), (600, 1e-3), (600, 2e-3)]  # (steps, lr) for AR, on iid-val


def log(msg: str) -> None:
    print(f"[world_v2 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prefix(path: Path, n: int, name: str) -> Path:
    """The first ``n`` records of ``path`` as ``name`` beside it (same images)."""
    out = path.parent / name
    if not out.exists():
        lines = open(path).read().splitlines()[:n]
        out.write_text("\n".join(lines) + "\n")
    return out


def data(a: argparse.Namespace) -> dict[str, Path]:
    root = Path(a.out) / "data"
    paths = {}
    tests = [("iid", a.n_test), ("shift", a.n_test)] + ([("combo", a.n_test)] if a.combo else [])
    for split, n in (("train", max(a.sizes)), ("iid-val", 200), ("shift-val", 200), *tests):
        p = root / f"{split}.jsonl"
        if not p.exists():
            write_v2_split(root, split, n, seed=a.data_seed, p=a.p, binding=a.binding)
        paths[split] = p
    for n in a.sizes:
        paths[f"train{n}"] = prefix(paths["train"], n, f"train{n}.jsonl")
    paths["train_acc"] = prefix(paths["train"], 300, "train_acc.jsonl")  # training accuracy probe
    if a.teacher != "word":  # the DM teacher's records: the same data, the answer paired with another span
        teach = write_with_pairs(paths["train"], root / f"train_{a.teacher}.jsonl", a.teacher)
        for n in a.sizes:
            paths[f"teacher{n}"] = prefix(teach, n, f"train{n}_{a.teacher}.jsonl")
    return paths


LABELS = {"ar": "AR (λ = 0)", "lavender": "Lavender (DM teacher)", "oracle": "oracle (true referent mask)",
          "shuffled": "shuffled oracle (control)"}


def markdown(summary: dict[str, Any]) -> str:
    """Tables of a summary: accuracy mean ± std, paired differences vs AR with 95 % intervals, attention."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = []
    for size, s in summary["sizes"].items():
        n = len(s.get("seeds", []))
        lines += [f"### {summary['arch']}, {size} records, p = {summary['p']}, n = {n} seeds", "",
                  "| arm | train | iid | shift | shift − AR [95 % CI] | decoy-follow (shift) | λ (mean) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for arm in LABELS:
            if arm not in s.get("iid", {}):
                continue
            i, sh = s["iid"][arm], s["shift"][arm]
            d = s["paired"]["shift"].get(arm)
            diff = "" if d is None else f"{pct(d['mean'])} [{pct(d['ci95'][0])}, {pct(d['ci95'][1])}]"
            lam = s["lambda"][arm]
            lines.append(f"| {LABELS[arm]} | {pct(s['train_accuracy'][arm])} | {pct(i['mean'])} ± {pct(i['std'])} | "
                         f"{pct(sh['mean'])} ± {pct(sh['std'])} | {diff} | {pct(s['decoy_follow']['shift'][arm])} | "
                         f"{sum(lam) / len(lam):.3g} |")
        if "combo" in s:  # the second shift: held-out colour–shape referents
            lines += ["", "| arm | combo | combo − AR [95 % CI] |", "| --- | ---: | ---: |"]
            for arm in LABELS:
                if arm in s["combo"]:
                    c, d = s["combo"][arm], s["paired"]["combo"].get(arm)
                    diff = "" if d is None else f"{pct(d['mean'])} [{pct(d['ci95'][0])}, {pct(d['ci95'][1])}]"
                    lines.append(f"| {LABELS[arm]} | {pct(c['mean'])} ± {pct(c['std'])} | {diff} |")
        lines += ["", "Answer-word attention on shift-val after fine-tuning (before any Aligner; mass ratio, 1 = "
                  "uniform):", "", "| arm | referent | decoy | selectivity | IoU | sink mass |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for arm, a in s["attention_shift_val"].items():
            lines.append(f"| {LABELS[arm]} | {a['vlm_referent_mass_ratio']:.2f} | {a['vlm_decoy_mass_ratio']:.2f} | "
                         f"{a['vlm_selectivity']:.2f} | {a['vlm_referent_iou']:.3f} | {a['sink_mass']:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/world_v2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--p", type=float, default=1.0, help="decoy rate of train/iid splits")
    ap.add_argument("--arch", default="mllama", choices=["mllama", "llava"])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--ratio", type=float, default=1.0, help="‖λ∇L_att‖/‖∇L_VLM‖ of every attention arm")
    ap.add_argument("--recipe", default=None, help="steps,lr: skip the AR grid (e.g. 300,1e-3)")
    ap.add_argument("--att-loss", default="mse", choices=["mse", "kl", "mass"],
                    help="the one attention loss of every attention arm")
    ap.add_argument("--aligner", default="identity", choices=["identity", "sim", "light", "deep", "mlp"],
                    help="the Aligner of every attention arm (identity: nothing can absorb the loss)")
    ap.add_argument("--teacher", default="word", choices=PAIRINGS,
                    help="the Lavender arm's pairs: the referent's answer word (default) or its whole phrase")
    ap.add_argument("--stage1", default=None,
                    help="a Stage-1 YAML (ExtractConfig) for the DM teacher instead of the DM's stage1.yaml")
    ap.add_argument("--binding", action="store_true",
                    help="binding pressure: the decoy shares the referent's naming attribute; the question names "
                         "the referent's side too (use a fresh --out: the data folder is cached)")
    ap.add_argument("--combo", action="store_true",
                    help="also score the combo test split (held-out colour–shape referents, decoy rate p)")
    ap.add_argument("--name", default="", help="prefix of the run folders (variants beside the main runs)")
    ap.add_argument("--publish", default=None,
                    help="write the FIRST size's summary here in the demo's results.json contract (+ size, p)")
    ap.add_argument("--no-train", action="store_true",
                    help="summarise the cached runs only: a seed missing any arm is left out, a size with "
                         "fewer than 2 complete seeds is skipped")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = data(a)
    dm = world_checkpoint(None, "dm", "lavender world train-dm")
    vlm = world_checkpoint(None, f"vlm_{a.arch}", f"lavender world train-vlm --arch {a.arch}")

    log("Stage 1 (world DM) on train, iid-val, shift-val")
    attn = {}
    tag = f"_{Path(a.stage1).stem}" if a.stage1 else ""
    for split in ("train", "iid-val", "shift-val"):
        attn[split] = out / f"attn_{split}{tag}"
        if not (attn[split] / "manifest.json").exists():
            if a.stage1:
                cfg = config_from_file(ExtractConfig, a.stage1, dm=dm, data=str(paths[split]), out=str(attn[split]),
                                       batch_size=16, progress=False)
            else:
                cfg = stage1_config(dm, paths[split], attn[split], progress=False)
            run_extract(cfg)
    oracle = write_mask_attention(paths["train"], out / "attn_oracle")

    premise = {}
    for split in ("iid-val", "shift-val"):
        premise_file = out / f"premise_{a.arch}_{split}{tag}{'' if a.teacher == 'word' else '_' + a.teacher}.json"
        if not premise_file.exists():
            log(f"premise: DM teacher vs pre-trained VLM on {split}")
            records = paths[split]
            if a.teacher != "word":
                records = write_with_pairs(records, records.parent / f"{split}_{a.teacher}.jsonl", a.teacher)
            premise_file.write_text(json.dumps(strict_json(attention_on_objects(vlm, records, attn[split])), indent=2))
        premise[split] = json.loads(premise_file.read_text())
        log(f"premise ({split}): {premise[split]}")

    base = Recipe(ratio=a.ratio, att_loss=a.att_loss, aligner=a.aligner)
    if a.recipe:
        steps, lr = a.recipe.split(",")
        base.steps, base.learning_rate = int(steps), float(lr)
        grid = {}
    else:
        log(f"recipe: AR grid on iid-val {GRID} (size {max(a.sizes)}, seed {a.seeds[0]})")
        grid = {}
        for steps, lr in GRID:
            r = Recipe(steps=steps, learning_rate=lr, ratio=a.ratio)
            res = run_arm("ar", a.seeds[0], vlm=vlm, train=paths[f"train{max(a.sizes)}"], attention={},
                          evals={"iid-val": paths["iid-val"], "train": paths["train_acc"]},
                          out=out / a.arch / "grid" / f"s{steps}_lr{lr:g}", recipe=r, log=log)
            grid[f"{steps},{lr:g}"] = {"iid-val": res["iid-val"], "train": res["train"]}
        best = max(grid, key=lambda k: (grid[k]["iid-val"], -int(k.split(",")[0])))
        base.steps, base.learning_rate = int(best.split(",")[0]), float(best.split(",")[1])
        log(f"recipe: {best} (iid-val {grid[best]['iid-val']:.3f}, train {grid[best]['train']:.3f})")

    tests = ["iid", "shift"] + (["combo"] if a.combo else [])
    evals = {**{t: paths[t] for t in tests}, "train": paths["train_acc"]}
    summary: dict[str, Any] = {"p": a.p, "arch": a.arch, "binding": a.binding, "seeds": a.seeds, "recipe": {
        "steps": base.steps, "learning_rate": base.learning_rate, "full": base.full, "ratio": base.ratio,
        "att_loss": base.att_loss, "aligner": base.aligner, "batch_size": base.batch_size},
        "recipe_grid_iid_val": grid, "premise": premise, "software": software_versions(), "sizes": {}}
    for size in a.sizes:
        train = paths[f"train{size}"]
        results: dict[str, list[dict]] = {arm: [] for arm in a.arms}
        seeds = [seed for seed in a.seeds if not a.no_train or all(
            (out / a.arch / f"{a.name}n{size}" / arm / f"seed{seed}" / "result.json").exists() for arm in a.arms)]
        if len(seeds) < 2 and a.no_train:
            log(f"size {size}: fewer than 2 complete seeds cached; skipped")
            continue
        for seed in seeds:
            shuffled = write_mask_attention(paths["train"], out / f"attn_shuffled_s{seed}", shuffle_seed=1000 + seed)
            attention = {"lavender": attn["train"], "oracle": oracle, "shuffled": shuffled}
            for arm in a.arms:
                results[arm].append(run_arm(
                    arm, seed, vlm=vlm, train=paths.get(f"teacher{size}", train) if arm == "lavender" else train,
                    attention=attention, evals=evals,
                    out=out / a.arch / f"{a.name}n{size}" / arm / f"seed{seed}", recipe=base,
                    probe=(paths["shift-val"], attn["shift-val"]), log=log))
        if len(seeds) < 2:  # one seed trains and is cached; paired intervals need two
            log(f"size {size}: one seed, no summary")
            continue
        majority = {s: majority_accuracy(train, paths[s])[1] for s in tests}
        s = summarise(results, tests, majority, seeds) if "ar" in results else {}
        s["train_accuracy"] = {arm: sum(r["train"] for r in rs) / len(rs) for arm, rs in results.items()}
        s["attention_shift_val"] = {arm: {k: sum(r["attention"][k] for r in rs) / len(rs)
                                          for k in rs[0]["attention"]} for arm, rs in results.items()}
        s["lambda"] = {arm: [r["lambda"] for r in rs] for arm, rs in results.items()}
        s["grad_ratio_last"] = {arm: [r.get("grad_ratio_last") for r in rs] for arm, rs in results.items()}
        summary["sizes"][str(size)] = s
        (out / f"summary_{a.arch}{a.name}.json").write_text(json.dumps(strict_json(summary), indent=2))
        log(f"size {size}: " + json.dumps(strict_json({k: s[k] for k in ("paired", "decoy_follow") if k in s})))
        (out / f"report_{a.arch}{a.name}.md").write_text(markdown(strict_json(summary)))
        if "paired" in s:
            from lavender.analysis import plot_paired_differences

            plot_paired_differences(str(out / f"paired_{a.arch}{a.name}_n{size}.png"), s["paired"])
        if a.publish and size == a.sizes[0]:
            Path(a.publish).parent.mkdir(parents=True, exist_ok=True)
            Path(a.publish).write_text(json.dumps(strict_json({**s, "size": size, "p": a.p, "arch": a.arch,
                                                         "recipe": summary["recipe"], "premise": premise,
                                                         "software": summary["software"]}), indent=2))
    log(f"done: {out / f'summary_{a.arch}{a.name}.json'}")


if __name__ == "__main__":
    main()
