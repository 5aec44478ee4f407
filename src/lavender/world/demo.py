"""``lavender demo``: the whole method on the miniature world, through the library calls users' commands make.

1. Scenes: a fine-tuning set (VQA), a test split, an out-of-distribution split, and an analysis set.
2. Stage 1: :func:`lavender.diffusion.extract.run_extract` (``ddim``) with the world's diffusion
   model, on the :class:`~lavender.config.ExtractConfig` its checkpoint recommends (``stage1.yaml``).
   Also an "oracle teacher": the ground-truth masks of the caption words written as an attention
   dataset.
3. Stage 2: :func:`lavender.trainer.run_training` from the world's pre-trained VLM, twice on
   identical data, steps and seed — AR (λ = 0) and Lavender (λ) — and once with the oracle maps.
4. :func:`lavender.evaluate.evaluate` (exact match) on test and OOD; the majority-answer baseline.
5. Analysis on held-out images: entropy of DM vs VLM maps, IoU of VLM attention with the true
   object, before and after fine-tuning; figures; ``report.md`` and ``results.json``.

Everything is seeded; ``--quick`` shrinks the sets and steps to fit a test budget.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lavender.config import AlignmentConfig, DemoConfig, ExtractConfig, LavenderError, config_from_file

CHECKPOINTS = Path(__file__).parent / "checkpoints"
STAGE1_FILE = "stage1.yaml"  # beside a DM checkpoint: the ExtractConfig overrides it recommends


def world_checkpoint(path: str | None, name: str, recipe: str) -> str:
    """``path``, or the committed world checkpoint ``name`` (made by ``recipe``)."""
    if path:
        return path
    p = CHECKPOINTS / name
    if not (p / "model_index.json").exists() and not (p / "config.json").exists():
        raise LavenderError(f"the world's {name} checkpoint is missing at {p}; make it with `{recipe}` "
                            f"or pass a path")
    return str(p)


def stage1_config(dm: str, data: str | Path, out: str | Path, **overrides: Any) -> ExtractConfig:
    """The ``ddim`` Stage-1 config for ``dm``: its ``stage1.yaml`` recommendations (for the world DM, the
    resolution and layer its ground-truth localisation scores chose), then ``overrides``."""
    base = {"dm": dm, "data": str(data), "out": str(out), "recipe": "ddim", "batch_size": 16, **overrides}
    path = Path(dm) / STAGE1_FILE
    if path.exists() and "resolutions" not in overrides:
        return config_from_file(ExtractConfig, str(path), **base)
    return ExtractConfig(**base)


def finetune(vlm: str, train: Path, run_dir: Path, attention: Path | None, lambda_att: float, *, steps: int,
             seed: int, batch_size: int, learning_rate: float, alignment: AlignmentConfig,
             progress: bool = True) -> Path:
    """One Stage-2 run (λ = 0 or no attention: plain AR fine-tuning); a finished run is kept."""
    from lavender.config import TrainConfig
    from lavender.trainer import run_training

    if not (run_dir / "adapter_model.safetensors").exists():
        train_cfg = TrainConfig(model=vlm, data=str(train), output_dir=str(run_dir), max_steps=steps,
                                per_device_train_batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                lambda_att=lambda_att, attention=str(attention) if attention else None,
                                save_steps=10 * steps, logging_steps=1, disable_tqdm=not progress,
                                dataloader_pin_memory=False)
        run_training(train_cfg, alignment)
    return run_dir


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def oracle_attention(records_path: Path, out: Path) -> Path:
    """An attention dataset whose maps are the ground-truth masks of the caption's grounded words."""
    from lavender.attnstore import AttentionStore, AttentionWriter
    from lavender.world.scenes import downsample_masks
    from lavender.world.write import load_word_masks

    if (out / "manifest.json").exists() and len(AttentionStore(out)):
        return out
    writer = AttentionWriter(out, {"map_size": 32, "frame": {"mode": "squash"}, "source": "ground-truth masks (oracle)",
                                   "normalization": "minmax"})
    with open(records_path) as f:
        for line in f:
            rec = json.loads(line)
            words, offsets, masks = load_word_masks(rec, records_path.parent)
            if len(words):
                maps = downsample_masks(np.asarray(masks), 32)
                maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
                writer.add(rec["id"], list(words), [tuple(o) for o in offsets], maps.astype(np.float32))
    writer.close()
    return out


def majority_accuracy(train: Path, split: Path) -> tuple[str, float]:
    """The fine-tuning set's most frequent answer, and its exact-match accuracy on ``split``."""
    from lavender.metrics import normalize_text

    def answers(p: Path) -> list[str]:
        return [normalize_text(json.loads(ln)["answers"][0]) for ln in open(p) if ln.strip()]

    top = Counter(answers(train)).most_common(1)[0][0]
    ans = answers(split)
    return top, float(np.mean([a == top for a in ans]))


def accuracy(model_path: str, data: Path, out: Path) -> dict[str, Any]:
    """Exact-match accuracy (overall and per question type) of greedy answers on ``data``."""
    from lavender.evaluate import evaluate, write_results
    from lavender.vlm.load import load_vlm

    model, processor, _ = load_vlm(model_path)
    result = evaluate(model.eval(), processor, str(data), metric="exact", batch_size=32, max_new_tokens=4)
    write_results(result, str(out))
    s = result["scores"]["exact"]
    return {"accuracy": s["overall"]["exact"]["exact"],
            "by_type": {t: v["exact"]["exact"] for t, v in s["by_type"].items()}}


def _analysis_rows(model_path: str, records: list[Any], store: Any, root: Path, align_on: str) -> list[dict]:
    """VLM vs DM word maps on the analysis set, with each word's ground-truth mask."""
    from lavender.analysis import collect_word_maps
    from lavender.vlm.load import load_vlm
    from lavender.world.write import load_word_masks

    model, processor, family = load_vlm(model_path)
    rows = collect_word_maps(model.eval(), processor, family, records, store,
                             AlignmentConfig(aggregation="mean-mean", align_on=align_on))
    by_id = {r.id: r for r in records}
    raw = {json.loads(ln)["id"]: json.loads(ln) for ln in open(root / "analysis.jsonl")}
    for row in rows:
        entry = store.get(row["id"])
        start, end = entry["offsets"][row["dm_index"]]
        words, offsets, masks = load_word_masks(raw[row["id"]], root)
        gt = [m for o, m in zip(offsets, masks) if tuple(o) == (start, end)]
        row["mask"] = np.asarray(gt[0]) if gt else None
        row["image_path"] = by_id[row["id"]].images[0]
    return rows


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end; returns (and writes) ``results.json``."""
    from lavender.analysis import iou, mass_ratio, normalized_entropy, plot_curves, plot_entropy_histograms
    from lavender.attnstore import AttentionStore
    from lavender.diffusion.extract import run_extract
    from lavender.records import read_records
    from lavender.world.write import write_split

    t0 = time.time()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    data = out / "data"
    dm = world_checkpoint(cfg.dm, "dm", "lavender world train-dm")
    vlm = world_checkpoint(cfg.vlm, "vlm_mllama", "lavender world train-vlm --arch mllama")

    _log(f"1/5 scenes: {cfg.n_train} fine-tuning, {cfg.n_test} test, {cfg.n_ood} OOD, {cfg.n_analysis} analysis")
    train = write_split(data, "train", cfg.n_train, seed=cfg.seed)
    test = write_split(data, "test", cfg.n_test, seed=cfg.seed)
    ood = write_split(data, "ood", cfg.n_ood, seed=cfg.seed)
    analysis = write_split(data, "validation", cfg.n_analysis, seed=cfg.seed + 1)
    os.replace(analysis, data / "analysis.jsonl")
    analysis = data / "analysis.jsonl"
    timings["scenes_s"] = time.time() - t0

    t = time.time()
    _log("2/5 Stage 1: run_extract, recipe ddim (world DM)")
    overrides = {"resolutions": cfg.resolutions} if cfg.resolutions else {}
    for src, dst in ((train, out / "attn"), (analysis, out / "attn_analysis")):
        summary = run_extract(stage1_config(dm, src, dst, **overrides))
        _log(f"   {dst.name}: {summary['done']} done, {summary['skipped']} kept from before, "
             f"{summary['failed']} failed")
    if cfg.oracle:
        oracle_attention(train, out / "attn_oracle")
    timings["extract_s"] = time.time() - t

    t = time.time()
    runs = {"ar": (None, 0.0), "lavender": (out / "attn", cfg.lambda_att)}
    if cfg.oracle:
        runs["oracle"] = (out / "attn_oracle", cfg.lambda_att)
    alignment = AlignmentConfig(aggregation=cfg.aggregation, align_on=cfg.align_on)
    for name, (attn, lam) in runs.items():
        _log(f"3/5 Stage 2: run_training ({name}, λ={lam}, {cfg.steps} steps)")
        finetune(vlm, train, out / "runs" / name, attn, lam, steps=cfg.steps, seed=cfg.seed,
                 batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, alignment=alignment)
    timings["train_s"] = time.time() - t

    t = time.time()
    results: dict[str, Any] = {"test": {}, "ood": {}}
    models = {"base": vlm, **{k: str(out / "runs" / k) for k in runs}}
    for split, path in (("test", test), ("ood", ood)):
        answer, acc = majority_accuracy(train, path)
        results[split]["majority"] = acc
        results[split]["majority_answer"] = answer
        for name, path_m in models.items():
            _log(f"4/5 eval {name} on {split}")
            r = accuracy(path_m, path, out / "eval" / f"{name}_{split}")
            results[split][name] = r["accuracy"]
            results[split][f"{name}_by_type"] = r["by_type"]
    timings["eval_s"] = time.time() - t

    t = time.time()
    _log("5/5 analysis: entropy and IoU before/after, figures")
    store = AttentionStore(out / "attn_analysis")
    records = [r for r in read_records(analysis) if r.id in store]
    rows = {name: _analysis_rows(p, records, store, data, cfg.align_on) for name, p in models.items()}
    base_rows = rows["base"]
    ent = {"dm": normalized_entropy(np.stack([r["dm"] for r in base_rows])).tolist() if base_rows else []}
    loc: dict[str, Any] = {}
    for name, rs in rows.items():
        ent[name] = normalized_entropy(np.stack([r["vlm"] for r in rs])).tolist() if rs else []
        with_mask = [r for r in rs if r["mask"] is not None]
        loc[name] = {"iou": float(np.nanmean([iou(r["vlm"], r["mask"]) for r in with_mask])) if with_mask else None,
                     "mass_ratio": float(np.nanmean([mass_ratio(r["vlm"], r["mask"]) for r in with_mask]))
                     if with_mask else None, "words": len(with_mask)}
    dm_masked = [r for r in base_rows if r["mask"] is not None]
    loc["dm"] = {"iou": float(np.nanmean([iou(r["dm"], r["mask"]) for r in dm_masked])) if dm_masked else None,
                 "mass_ratio": float(np.nanmean([mass_ratio(r["dm"], r["mask"]) for r in dm_masked]))
                 if dm_masked else None, "words": len(dm_masked)}
    results["localisation"] = loc
    results["entropy"] = {k: float(np.mean(v)) if len(v) else None for k, v in ent.items()}
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    plot_entropy_histograms(str(figs / "entropy.png"), {"DM": ent["dm"], "VLM before": ent["base"],
                                                        "VLM after (Lavender)": ent["lavender"]},
                            "word-map entropy, analysis set")
    curves = {k: [json.loads(ln) for ln in open(out / "runs" / k / "metrics.jsonl")] for k in runs}
    plot_curves(str(figs / "curves.png"), curves, ["loss_vlm", "loss_att"])
    _word_map_figure(figs / "word_maps.png", rows)
    timings["analysis_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    results["timings"] = timings
    results["config"] = {**asdict(cfg), "dm": dm, "vlm": vlm}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(results))
    _log(f"done in {timings['total_s']:.0f} s: {out / 'report.md'}")
    return results


def _word_map_figure(path: Path, rows: dict[str, list[dict]], n: int = 6) -> None:
    from lavender.analysis import plot_word_maps
    from lavender.records import load_image

    keyed = {name: {(r["id"], r["word"], r["dm_index"]): r for r in rs} for name, rs in rows.items()}
    shown = []
    for key, r in list(keyed["base"].items())[: 4 * n]:
        if r["mask"] is None or not all(key in keyed[k] for k in keyed):
            continue
        item = {"image": np.asarray(load_image(r["image_path"]).resize((128, 128))), "word": r["word"],
                "ground truth": r["mask"].astype(np.float32), "DM": r["dm"], "VLM before": r["vlm"]}
        for name in ("ar", "lavender"):
            item[f"after {name.upper() if name == 'ar' else 'Lavender'}"] = keyed[name][key]["vlm"]
        shown.append(item)
        if len(shown) == n:
            break
    if shown:
        cols = [c for c in shown[0] if c not in ("image", "word")]
        plot_word_maps(str(path), shown, cols)


def report(results: dict[str, Any]) -> str:
    """The Markdown report of a demo run."""
    names = [k for k in ("majority", "base", "ar", "lavender", "oracle") if k in results["test"]]
    label = {"majority": "majority answer", "base": "pre-trained VLM (no fine-tuning)", "ar": "AR fine-tuning (λ = 0)",
             "lavender": "Lavender (DM teacher)", "oracle": "Lavender (oracle teacher: true masks)"}
    lines = ["# Lavender on the miniature world", "",
             "Exact-match accuracy of greedy answers (fine-tuned on identical data, steps and seed).", "",
             "| model | test | OOD |", "| --- | ---: | ---: |"]
    for n in names:
        lines.append(f"| {label[n]} | {100 * results['test'][n]:.1f} | {100 * results['ood'][n]:.1f} |")
    loc = results.get("localisation", {})
    lines += ["", "## Attention", "",
              "On held-out analysis images, for the aligned words that name an object: IoU of the attention map "
              "(min–max, ≥ 0.5) with the object's true mask, and the mass inside the mask over a uniform map's "
              "(1.0 = no localisation). Entropy: normalised, 1 = uniform.", "",
              "| maps | IoU | mass ratio | entropy |", "| --- | ---: | ---: | ---: |"]
    for n in ("dm", "base", "ar", "lavender", "oracle"):
        if n in loc and loc[n].get("iou") is not None:
            name = "DM (Stage 1)" if n == "dm" else label[n]
            lines.append(f"| {name} | {loc[n]['iou']:.3f} | {loc[n]['mass_ratio']:.2f} | "
                         f"{results['entropy'].get(n) or float('nan'):.3f} |")
    lines += ["", "![word maps](figures/word_maps.png)", "", "![entropy](figures/entropy.png)", "",
              "![curves](figures/curves.png)", "",
              f"Total time: {results['timings']['total_s']:.0f} s. Configuration: `results.json`."]
    return "\n".join(lines) + "\n"
