"""The world-v2 experiment's arms, paired by seed, and the summary in the ``results.json`` contract.

Arms (identical data, steps, seed and — for the attention arms — one loss, Aligner and λ rule):

- ``ar``: λ = 0, plain autoregressive fine-tuning.
- ``lavender``: the DM teacher's Stage-1 maps.
- ``oracle``: the referent's TRUE mask as the target of the answer word.
- ``shuffled``: the referent mask of ANOTHER record (a seeded derangement of the records; never
  another object of the same scene, which could be the decoy and teach the shortcut). It is the
  control that separates "the right attention" from "any extra loss of this size".

λ comes from ``--calibrate-lambda RATIO`` (the same ratio for every attention arm, measured on the
arm's own first batches), never from an accuracy-based per-arm choice. Everything a run produces
is cached in its folder (``result.json``), so an interrupted experiment resumes.

The records are world-v2 records (:mod:`lavender.world.v2`): each names its ``referent`` and
``decoy`` objects and carries ``align_pairs`` linking the answer word to the referent's occurrence
in the caption (the DM text), so every arm aligns exactly that one word.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lavender.config import AlignmentConfig

ARMS: tuple[str, ...] = ("ar", "lavender", "oracle", "shuffled")


@dataclass
class Recipe:
    """How every arm fine-tunes (one recipe for all arms; chosen on ``iid-val`` for AR only)."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    full: bool = True  # full fine-tuning: the world VLM is small, and LoRA on q/k/v/o did not fit
    ratio: float = 1.0  # ‖λ·∇L_att‖ / ‖∇L_VLM‖ for every attention arm
    att_loss: str = "mse"
    aligner: str = "identity"  # cannot absorb the loss: only the VLM can lower it
    calibration_batches: int = 4
    alignment: AlignmentConfig = field(default_factory=lambda: AlignmentConfig(aggregation="mean-mean"))


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in open(path) if ln.strip()]


def _pair(rec: dict) -> tuple[str, tuple[int, int]]:
    """The DM word (and its offsets in the DM text) the record's answer is paired with."""
    p = rec["align_pairs"][0]
    return rec["align_text"][p["dm_start"]: p["dm_end"]], (int(p["dm_start"]), int(p["dm_end"]))


def referent_masks(path: Path) -> dict[str, np.ndarray]:
    """``{record id: referent mask (64, 64) bool}`` of a world-v2 records file."""
    from lavender.world.write import load_object_masks

    out = {}
    for rec in _records(path):
        masks = load_object_masks(rec, path.parent)
        out[rec["id"]] = np.asarray(masks[rec["referent"]], dtype=bool)
    return out


def write_mask_attention(records_path: Path, out: Path, shuffle_seed: int | None = None) -> Path:
    """An attention dataset whose map for each record's paired word is a referent mask.

    ``shuffle_seed`` None: the record's own referent (the oracle). Otherwise the referent of the
    record a seeded derangement assigns (the shuffled control): no record keeps its own mask.
    """
    from lavender.attnstore import AttentionStore, AttentionWriter
    from lavender.world.scenes import downsample_masks

    if (out / "manifest.json").exists() and len(AttentionStore(out)):
        return out
    recs = _records(records_path)
    masks = referent_masks(records_path)
    ids = [r["id"] for r in recs]
    source = dict(zip(ids, ids))
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        while True:
            perm = rng.permutation(len(ids))
            if len(ids) < 2 or not np.any(perm == np.arange(len(ids))):
                break
        source = {ids[i]: ids[j] for i, j in enumerate(perm)}
    what = "true referent masks (oracle)" if shuffle_seed is None else \
        f"referent masks of other records (shuffled control, seed {shuffle_seed})"
    writer = AttentionWriter(out, {"map_size": 32, "frame": {"mode": "squash"}, "source": what,
                                   "normalization": "minmax"})
    for rec in recs:
        word, offsets = _pair(rec)
        m = downsample_masks(masks[source[rec["id"]]][None].astype(np.float32), 32)
        m = m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
        writer.add(rec["id"], [word], [offsets], m.astype(np.float32))
    writer.close()
    return out


def decoy_follow(records_path: Path, predictions: Sequence[dict]) -> float:
    """Share of answers that name the DECOY's attribute where it differs from the referent's."""
    from lavender.metrics import normalize_text

    by_id = {r["id"]: r for r in _records(records_path)}
    hits = n = 0
    for p in predictions:
        rec = by_id[p["id"]]
        attr = "colour" if rec["type"] == "colour" else "shape"
        decoy = rec["objects"][rec["decoy"]][attr]
        if decoy == rec["objects"][rec["referent"]][attr]:
            continue
        n += 1
        hits += normalize_text(p["prediction"]) == decoy
    return hits / n if n else float("nan")


def attention_on_objects(model_path: str, records_path: Path, attention: Path, limit: int = 200,
                         alignment: AlignmentConfig | None = None) -> dict[str, float]:
    """Where the answer word's attention lies, for the VLM (raw, before any Aligner) and its DM target.

    Per map: the mass ratio on the referent's and on the decoy's true mask (1.0 = uniform), their
    ratio (selectivity), and the IoU with the referent; plus the VLM rows' sink mass.
    """
    from lavender.analysis import collect_word_maps, iou, mass_ratio
    from lavender.attnstore import AttentionStore
    from lavender.records import read_records
    from lavender.vlm.load import load_vlm
    from lavender.world.write import load_object_masks

    model, processor, family = load_vlm(model_path)
    store = AttentionStore(attention)
    records = [r for r in read_records(records_path) if r.id in store][:limit]
    rows = collect_word_maps(model.eval(), processor, family, records, store,
                             alignment or AlignmentConfig(aggregation="mean-mean"))
    raw = {r["id"]: r for r in _records(records_path)}
    stats: dict[str, list[float]] = {}
    for row in rows:
        rec = raw[row["id"]]
        masks = load_object_masks(rec, records_path.parent)
        for who in ("vlm", "dm"):
            ref, dec = mass_ratio(row[who], masks[rec["referent"]]), mass_ratio(row[who], masks[rec["decoy"]])
            stats.setdefault(f"{who}_referent_mass_ratio", []).append(ref)
            stats.setdefault(f"{who}_decoy_mass_ratio", []).append(dec)
            stats.setdefault(f"{who}_referent_iou", []).append(iou(row[who], masks[rec["referent"]]))
        stats.setdefault("sink_mass", []).append(row["sink_mass"])
    out = {k: float(np.nanmean(v)) for k, v in stats.items()}
    for who in ("vlm", "dm"):
        d = out.get(f"{who}_decoy_mass_ratio")
        out[f"{who}_selectivity"] = out[f"{who}_referent_mass_ratio"] / d if d else float("nan")
    out["words"] = len(rows)
    return out


def run_arm(arm: str, seed: int, *, vlm: str, train: Path, attention: dict[str, Path], evals: dict[str, Path],
            out: Path, recipe: Recipe, keep: bool = False, progress: bool = False,
            probe: tuple[Path, Path] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune one arm at one seed (cached) and score it on every eval split.

    ``probe``: (records, attention dataset) on which the fine-tuned model's answer-word attention
    is measured (:func:`attention_on_objects`) before the run folder is removed.
    """
    from lavender.config import TrainConfig
    from lavender.evaluate import evaluate, write_results
    from lavender.trainer import run_training
    from lavender.versions import software_versions
    from lavender.vlm.load import load_vlm

    cache = out / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    run_dir = out / "run"
    if run_dir.exists() and not (run_dir / "metrics.jsonl").exists():
        shutil.rmtree(run_dir)
    t0 = time.time()
    att = attention.get(arm)
    train_cfg = TrainConfig(
        model=vlm, data=str(train), output_dir=str(run_dir), max_steps=recipe.steps,
        per_device_train_batch_size=recipe.batch_size, learning_rate=recipe.learning_rate, seed=seed,
        lora=not recipe.full, lambda_att=1.0 if att else 0.0, attention=str(att) if att else None,
        att_loss=recipe.att_loss, aligner=recipe.aligner,
        calibrate_lambda=recipe.ratio if att else None, calibration_batches=recipe.calibration_batches,
        save_steps=10 * recipe.steps, save_strategy="no", disable_tqdm=not progress, report_to=[],
        use_cpu=True, logging_steps=1)
    if not (run_dir / "README.md").exists():
        run_training(train_cfg, recipe.alignment if att else AlignmentConfig(), quiet=not progress)
    metrics = [json.loads(ln) for ln in open(run_dir / "metrics.jsonl")]
    model, processor, _ = load_vlm(str(run_dir))
    model.eval()
    result: dict[str, Any] = {"arm": arm, "seed": seed, "lambda": metrics[0].get("lambda", 0.0),
                              "train_loss_last": metrics[-1]["loss_vlm"] if metrics else None}
    for split, path in evals.items():
        r = evaluate(model, processor, str(path), metric="exact", batch_size=32, max_new_tokens=4,
                     progress=progress)
        write_results(r, str(out / f"eval_{split}"))
        result[split] = r["scores"]["exact"]["overall"]["exact"]["exact"]
        result[f"{split}_decoy_follow"] = decoy_follow(path, r["predictions"])
    if probe is not None:
        result["attention"] = attention_on_objects(str(run_dir), probe[0], probe[1], alignment=recipe.alignment)
    for key in ("grad_ratio", "loss_att", "loss_att_raw", "sink_mass"):
        vals = [m[key] for m in metrics if key in m]
        if vals:
            result[f"{key}_first"], result[f"{key}_last"] = vals[0], vals[-1]
    result["seconds"] = time.time() - t0
    result["software"] = software_versions()
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    if not keep:
        shutil.rmtree(run_dir)
    log(f"{arm} seed {seed}: " + ", ".join(f"{s} {100 * result[s]:.1f}" for s in evals)
        + f" (λ {result['lambda']:.3g}, {result['seconds']:.0f} s)")
    return result


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN (no warning) when there are none (e.g. no decoy differs at p = 1)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(results: dict[str, list[dict]], splits: Sequence[str], majority: dict[str, float],
              seeds: Sequence[int]) -> dict[str, Any]:
    """The ``results.json`` contract: per arm mean and per-seed accuracy, paired differences vs AR."""
    from lavender.stats import mean_std, paired_difference

    out: dict[str, Any] = {"seeds": list(seeds)}
    for split in splits:
        out[split] = {"majority": majority.get(split)}
        for arm, runs in results.items():
            out[split][arm] = mean_std([r[split] for r in runs])
    out["paired"] = {split: {arm: paired_difference([r[split] for r in runs], [r[split] for r in results["ar"]])
                             for arm, runs in results.items() if arm != "ar"} for split in splits}
    out["decoy_follow"] = {split: {arm: _nanmean([r[f"{split}_decoy_follow"] for r in runs])
                                   for arm, runs in results.items()} for split in splits}
    return out
