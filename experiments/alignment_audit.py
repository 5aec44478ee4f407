"""Does the attention term reach the VLM? Gradient ratio, absorption and sink mass on the miniature world.

Arms, paired by seed (same data, order and initialisation): AR (λ = 0); Lavender with the ``sim``
Aligner at the demo's λ = 1; Lavender with the ``sim`` Aligner and with the parameter-free
``identity`` Aligner, each at the λ that ``--calibrate-lambda RATIO`` picks. Per run it reports
the gradient ratio ‖λ·∇L_att‖ / ‖∇L_VLM‖ at the first step, ``loss_att`` (through the Aligner) against
``loss_att_raw`` (the raw VLM map) averaged over the last 20 steps, and the sink mass of the
aligned answer rows (training's, and on held-out validation scenes through ``collect_word_maps``,
which also measures AR), plus validation accuracy (diagnostic only: no arm is chosen on it here).

Torch runs on ``--threads`` threads (default 2), fixed, so the numbers do not depend on the
machine's core count. Every run is cached under ``--out`` (its result JSON); rerun to resume.

    python experiments/alignment_audit.py --out runs/audit --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from lavender.analysis import collect_word_maps
from lavender.attnstore import AttentionStore
from lavender.config import AlignmentConfig, TrainConfig
from lavender.diffusion.extract import run_extract
from lavender.records import read_records
from lavender.stats import mean_std
from lavender.trainer import run_training
from lavender.vlm.load import load_vlm
from lavender.world.demo import accuracy, stage1_config, world_checkpoint
from lavender.world.write import write_split

ARMS = {  # name -> (aligner, λ, calibrate-to ratio)
    "ar": ("sim", 0.0, None),
    "sim_lambda1": ("sim", 1.0, None),
    "sim_calibrated": ("sim", 1.0, "ratio"),
    "identity_calibrated": ("identity", 1.0, "ratio"),
}


def run_arm(out: Path, name: str, seed: int, a: argparse.Namespace, data: dict[str, Path], vlm: str) -> dict:
    cache = out / name / f"seed{seed}" / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    aligner, lam, calibrate = ARMS[name]
    run_dir = cache.parent / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train = TrainConfig(model=vlm, data=str(data["train"]), output_dir=str(run_dir), max_steps=a.steps,
                        per_device_train_batch_size=a.batch_size, learning_rate=a.lr, seed=seed,
                        lambda_att=lam, attention=str(data["attn"]) if lam else None, aligner=aligner,
                        calibrate_lambda=a.ratio if calibrate else None, grad_ratio_steps=a.grad_ratio_steps,
                        save_steps=10 * a.steps, disable_tqdm=True, report_to=[], use_cpu=True)
    run_training(train, AlignmentConfig(align_on="answer"))
    rows = [json.loads(ln) for ln in open(run_dir / "metrics.jsonl")]
    last = rows[-20:]
    result: dict = {"lambda": rows[0]["lambda"], "steps": len(rows)}
    if lam:
        ratios = [r["grad_ratio"] for r in rows if "grad_ratio" in r]
        result.update({"grad_ratio_first": ratios[0], "grad_ratio_last": ratios[-1],
                       "loss_att_first": rows[0]["loss_att"], "loss_att_raw_first": rows[0]["loss_att_raw"],
                       "loss_att_last20": float(np.mean([r["loss_att"] for r in last])),
                       "loss_att_raw_last20": float(np.mean([r["loss_att_raw"] for r in last])),
                       "sink_mass_train_last20": float(np.mean([r["sink_mass"] for r in last]))})
    model, processor, family = load_vlm(str(run_dir))
    store = AttentionStore(data["attn_val"])
    records = [r for r in read_records(data["val"]) if r.id in store][: a.n_analysis]
    words = collect_word_maps(model.eval(), processor, family, records, store, AlignmentConfig(align_on="answer"))
    result["sink_mass_val"] = float(np.mean([w["sink_mass"] for w in words])) if words else None
    result["val_accuracy"] = accuracy(str(run_dir), data["val"], cache.parent / "eval")["accuracy"]
    cache.write_text(json.dumps(result, indent=2))
    shutil.rmtree(run_dir)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/audit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ratio", type=float, default=1.0, help="the calibrated arms' gradient ratio")
    p.add_argument("--grad-ratio-steps", type=int, default=50)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-analysis", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="torch threads, fixed for reproducibility")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    out = Path(a.out)
    dm = world_checkpoint(None, "dm", "lavender world train-dm")
    vlm = world_checkpoint(None, "vlm_mllama", "lavender world train-vlm --arch mllama")
    data = {"train": write_split(out / "data", "train", a.n_train, seed=0),
            "val": write_split(out / "data", "validation", a.n_val, seed=0)}
    data["attn"], data["attn_val"] = out / "attn", out / "attn_val"
    run_extract(stage1_config(dm, data["train"], data["attn"], progress=False))
    run_extract(stage1_config(dm, data["val"], data["attn_val"], progress=False))

    table: dict[str, dict] = {}
    for name in a.arms:
        runs = [run_arm(out, name, s, a, data, vlm) for s in a.seeds]
        table[name] = {k: mean_std([r[k] for r in runs]) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    (out / "summary.json").write_text(json.dumps({"config": vars(a), "table": table}, indent=2))
    keys = ["lambda", "grad_ratio_first", "grad_ratio_last", "loss_att_last20", "loss_att_raw_last20",
            "sink_mass_train_last20", "sink_mass_val", "val_accuracy"]
    print(f"{'arm':<22}" + "".join(f"{k:>24}" for k in keys))
    for name, row in table.items():
        cells = [f"{row[k]['mean']:.4g} ± {row[k]['std']:.2g}" if k in row else "—" for k in keys]
        print(f"{name:<22}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
