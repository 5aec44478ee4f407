"""``lavender demo``: the method on world v2, end to end, through the library calls users' commands make.

1. Scenes (:mod:`lavender.world.v2`): a fine-tuning set whose decoy shares the answer with
   probability p, an ``iid`` and a ``shift`` test split (the decoy never shares there), and an
   analysis set (``shift-val``).
2. Stage 1: :func:`lavender.diffusion.extract.run_extract` with the world's diffusion model, on the
   :class:`~lavender.config.ExtractConfig` its checkpoint recommends for the teacher: ``--teacher
   phrase`` (default) pairs each answer with the referent's phrase ("red circle") and reads the DM
   for binding (``stage1_binding.yaml``: the ``noise`` recipe at t = 100, an 8×8 layer); ``--teacher
   word`` pairs it with the answer word alone (``stage1.yaml``, ``ddim``). Then the oracle's maps (the
   referent's true mask) and, per seed, the shuffled control's.
3. Stage 2: :func:`lavender.world.arms.run_arm` for AR, Lavender, oracle and shuffled at every
   seed (one recipe; λ calibrated to one gradient ratio for every attention arm).
4. Scores, paired differences with 95 % intervals (:mod:`lavender.stats`), attention on the referent
   vs the decoy, figures; ``results.json``, ``report.md`` and a self-contained ``report.html``.

Everything is seeded and cached (a rerun resumes); ``--quick`` shrinks the sets and steps.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lavender.config import AlignmentConfig, DemoConfig, ExtractConfig, LavenderError, config_from_file
from lavender.versions import software_versions

CHECKPOINTS = Path(__file__).parent / "checkpoints"
STAGE1_FILE = "stage1.yaml"  # beside a DM checkpoint: the ExtractConfig overrides it recommends
STAGE1_BINDING_FILE = "stage1_binding.yaml"  # the same, for a teacher read for binding (world v2)


def world_checkpoint(path: str | None, name: str, recipe: str) -> str:
    """``path``, or the committed world checkpoint ``name`` (made by ``recipe``)."""
    if path:
        return path
    p = CHECKPOINTS / name
    if not (p / "model_index.json").exists() and not (p / "config.json").exists():
        raise LavenderError(f"the world's {name} checkpoint is missing at {p}; make it with `{recipe}` "
                            f"or pass a path")
    return str(p)


def stage1_config(dm: str, data: str | Path, out: str | Path, teacher: str = "word", **overrides: Any
                  ) -> ExtractConfig:
    """The Stage-1 config for ``dm``: its recommendations, then ``overrides``.

    ``teacher="word"``: ``stage1.yaml`` (``ddim``; for the world DM, the layer its word-localisation
    scores chose). ``teacher="phrase"``: ``stage1_binding.yaml`` (for the world DM, the reading that
    tells a world-v2 referent from the decoy best, chosen on ``iid-val``: docs/experiments.md).
    """
    base = {"dm": dm, "data": str(data), "out": str(out), "recipe": "ddim", "batch_size": 16, **overrides}
    path = Path(dm) / (STAGE1_FILE if teacher == "word" else STAGE1_BINDING_FILE)
    if path.exists() and "resolutions" not in overrides:
        base.pop("recipe")
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



def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """World v2 end to end, four arms over paired seeds; writes ``results.json``, ``report.md/.html``."""
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from lavender.diffusion.extract import run_extract
    from lavender.world.arms import (
        ARMS,
        Recipe,
        attention_on_objects,
        run_arm,
        summarise,
        write_mask_attention,
    )
    from lavender.world.v2 import write_v2_split, write_with_pairs

    torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # one progress bar: the demo's (runs), not one per weight load
    t0 = time.time()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    data = out / "data"
    dm = world_checkpoint(cfg.dm, "dm", "lavender world train-dm")
    vlm = world_checkpoint(cfg.vlm, "vlm_mllama", "lavender world train-vlm --arch mllama")
    seeds = list(range(cfg.seeds))

    _log(f"1/4 world-v2 scenes (p={cfg.p}): {cfg.n_train} train, {cfg.n_test} iid + {cfg.n_test} shift test, "
         f"{cfg.n_analysis} analysis (shift-val)")
    paths = {}
    for split, n in (("train", cfg.n_train), ("iid", cfg.n_test), ("shift", cfg.n_test), ("shift-val", cfg.n_analysis)):
        paths[split] = data / f"{split}.jsonl"
        if not paths[split].exists():
            write_v2_split(data, split, n, seed=cfg.data_seed, p=cfg.p)
    timings["scenes_s"] = time.time() - t0

    t = time.time()
    _log(f"2/4 Stage 1 (world DM, {cfg.teacher} teacher) on train and analysis; oracle and shuffled maps")
    if cfg.teacher != "word":  # the Lavender arm's records: the same data, the answer paired with the phrase
        for split in ("train", "shift-val"):
            paths[f"{split}_teacher"] = write_with_pairs(paths[split], data / f"{split}_{cfg.teacher}.jsonl",
                                                         cfg.teacher)
    attn = {}
    for split in ("train", "shift-val"):
        attn[split] = out / f"attn_{split}_{cfg.teacher}"
        if not (attn[split] / "manifest.json").exists():
            run_extract(stage1_config(dm, paths[split], attn[split], cfg.teacher, progress=False))
    oracle = write_mask_attention(paths["train"], out / "attn_oracle")
    timings["extract_s"] = time.time() - t

    t = time.time()
    recipe = Recipe(steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, ratio=cfg.ratio,
                    att_loss=cfg.att_loss)
    probe = (paths.get("shift-val_teacher", paths["shift-val"]), attn["shift-val"])
    premise = attention_on_objects(vlm, *probe, alignment=recipe.alignment)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    jobs = [(seed, arm) for seed in seeds for arm in ARMS]
    _log(f"3/4 Stage 2: {len(ARMS)} arms × {len(seeds)} seeds, {cfg.steps} full fine-tuning steps each")
    bar = tqdm(jobs, desc="fine-tune + eval", unit="run", mininterval=1.0)
    for seed, arm in bar:
        bar.set_postfix_str(f"{arm} seed {seed}")
        shuffled = write_mask_attention(paths["train"], out / f"attn_shuffled_s{seed}", shuffle_seed=1000 + seed)
        attention = {"lavender": attn["train"], "oracle": oracle, "shuffled": shuffled}
        train = paths.get("train_teacher", paths["train"]) if arm == "lavender" else paths["train"]
        results[arm].append(run_arm(arm, seed, vlm=vlm, train=train, attention=attention,
                                    evals={"iid": paths["iid"], "shift": paths["shift"]},
                                    out=out / "runs" / arm / f"seed{seed}", recipe=recipe, probe=probe,
                                    keep=seed == seeds[0], log=lambda m: bar.write(f"   {m}")))
    bar.close()
    timings["train_eval_s"] = time.time() - t

    t = time.time()
    _log("4/4 figures and report")
    majority = {s: majority_accuracy(paths["train"], paths[s])[1] for s in ("iid", "shift")}
    summary = summarise(results, ["iid", "shift"], majority, seeds)
    summary["p"] = cfg.p
    summary["premise_shift_val"] = premise
    summary["attention_shift_val"] = {arm: _mean_dicts([r["attention"] for r in rs]) for arm, rs in results.items()}
    summary["lambda"] = {arm: [r["lambda"] for r in rs] for arm, rs in results.items()}
    figures = _figures(out, vlm, paths, attn, results, summary, seeds[0], recipe)
    timings["report_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    summary["timings"] = timings
    summary["config"] = {**asdict(cfg), "dm": dm, "vlm": vlm}
    summary["software"] = software_versions()
    summary = strict_json(summary)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = report(summary, figures)
    (out / "report.md").write_text(text)
    from lavender.analysis import html_report

    html_report(str(out / "report.html"), text, title="Lavender demo: world v2")
    _log(f"done in {timings['total_s']:.0f} s: {out / 'report.md'} and report.html")
    return summary


def _mean_dicts(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def strict_json(x: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def _figures(out: Path, vlm: str, paths: dict[str, Path], attn: dict[str, Path], results: dict[str, list[dict]],
             summary: dict[str, Any], seed: int, recipe: Any) -> dict[str, str]:
    """Word maps (truth as a contour), entropy histograms, loss curves and the paired differences."""
    from lavender.analysis import (
        collect_word_maps,
        normalized_entropy,
        plot_curves,
        plot_entropy_histograms,
        plot_paired_differences,
        plot_word_maps,
    )
    from lavender.attnstore import AttentionStore
    from lavender.records import load_image, read_records
    from lavender.vlm.load import load_vlm
    from lavender.world.write import load_object_masks

    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    store = AttentionStore(attn["shift-val"])
    probe = paths.get("shift-val_teacher", paths["shift-val"])  # the DM map shown is the teacher's target
    records = [r for r in read_records(probe) if r.id in store]
    raw = {json.loads(ln)["id"]: json.loads(ln) for ln in open(probe)}
    models = {"VLM before": vlm, **{f"after {a}": str(out / "runs" / a / f"seed{seed}" / "run")
                                    for a in ("ar", "lavender", "oracle")}}
    rows: dict[str, dict[str, dict]] = {}
    for name, path in models.items():
        model, processor, family = load_vlm(path)
        rows[name] = {r["id"]: r for r in collect_word_maps(model.eval(), processor, family, records, store,
                                                            recipe.alignment)}
    shown = []
    for rid in list(rows["VLM before"])[:6]:
        if not all(rid in rows[k] for k in rows):
            continue
        rec = raw[rid]
        item = {"image": np.asarray(load_image(str(paths["shift-val"].parent / rec["images"][0])).resize((128, 128))),
                "word": rows["VLM before"][rid]["word"], "mask": load_object_masks(rec, paths["shift-val"].parent)[
                    rec["referent"]], "DM": rows["VLM before"][rid]["dm"]}
        item.update({k: rows[k][rid]["vlm"] for k in rows})
        shown.append(item)
    out_figs: dict[str, str] = {}
    if shown:
        plot_word_maps(str(figs / "word_maps.png"), shown, ["DM", *rows])
        out_figs["word_maps"] = "figures/word_maps.png"
    ent = {"DM": [r["dm"] for r in rows["VLM before"].values()], **{k: [r["vlm"] for r in v.values()]
                                                                      for k, v in rows.items()}}
    ent = {k: normalized_entropy(np.stack(v)).tolist() for k, v in ent.items() if v}
    if ent:
        plot_entropy_histograms(str(figs / "entropy.png"), ent, "answer-word map entropy, shift-val")
        out_figs["entropy"] = "figures/entropy.png"
        summary["entropy_shift_val"] = {k: float(np.mean(v)) for k, v in ent.items()}
    curves = {a: [json.loads(ln) for ln in open(out / "runs" / a / f"seed{seed}" / "run" / "metrics.jsonl")]
              for a in results}
    plot_curves(str(figs / "curves.png"), curves, ["loss_vlm", "loss_att_raw"])
    out_figs["curves"] = "figures/curves.png"
    plot_paired_differences(str(figs / "paired.png"), summary["paired"])
    out_figs["paired"] = "figures/paired.png"
    return out_figs


LABELS = {"ar": "AR (λ = 0)", "lavender": "Lavender (DM teacher)", "oracle": "oracle (referent's true mask)",
          "shuffled": "shuffled oracle (another record's referent mask)"}


def report(s: dict[str, Any], figures: dict[str, str]) -> str:
    """The Markdown report of a demo run (multi-seed table, paired differences, attention, figures)."""
    n = len(s["seeds"])
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["# Lavender on the miniature world (v2)", "",
             f"Each record asks for the colour or shape of one small referent; a large decoy shares the answer "
             f"with probability p = {s['p']} in training and iid test, never in the shift test. Every arm "
             f"fine-tunes the same pre-trained world VLM on identical data, steps and seed; {n} paired seeds "
             f"({', '.join(map(str, s['seeds']))}).", "",
             "## Accuracy (exact match, mean ± std over seeds)", "",
             "| arm | iid | shift | shift: answers naming the decoy |", "| --- | ---: | ---: | ---: |",
             f"| majority answer | {pct(s['iid']['majority'])} | {pct(s['shift']['majority'])} | |"]
    for arm in LABELS:
        if arm in s["iid"]:
            i, sh = s["iid"][arm], s["shift"][arm]
            lines.append(f"| {LABELS[arm]} | {pct(i['mean'])} ± {pct(i['std'])} | {pct(sh['mean'])} ± "
                         f"{pct(sh['std'])} | {pct(s['decoy_follow']['shift'].get(arm))} |")
    lines += ["", f"## Paired difference vs AR (points; 95 % t-interval over n = {n} seeds, {n - 1} df)", "",
              "| arm | iid | shift |", "| --- | ---: | ---: |"]
    for arm in LABELS:
        if arm in s["paired"]["iid"]:
            cells = []
            for split in ("iid", "shift"):
                d = s["paired"][split][arm]
                lo, hi = d["ci95"]
                cells.append(f"{pct(d['mean'])} [{pct(lo)}, {pct(hi)}]")
            lines.append(f"| {LABELS[arm]} | {cells[0]} | {cells[1]} |")
    pr = s.get("premise_shift_val", {})
    lines += ["", "## Attention on the referent vs the decoy (shift-val, answer word, before any Aligner)", "",
              "Mass ratio: the map's mass inside the object's true mask over the mask's area share (1 = uniform).",
              "", "| maps | referent | decoy | selectivity | sink mass |", "| --- | ---: | ---: | ---: | ---: |"]
    if pr:
        lines.append(f"| DM teacher (Stage 1) | {pr['dm_referent_mass_ratio']:.2f} | {pr['dm_decoy_mass_ratio']:.2f} | "
                     f"{pr['dm_selectivity']:.2f} | |")
        lines.append(f"| pre-trained VLM | {pr['vlm_referent_mass_ratio']:.2f} | {pr['vlm_decoy_mass_ratio']:.2f} | "
                     f"{pr['vlm_selectivity']:.2f} | {pr['sink_mass']:.3f} |")
    for arm, a in s.get("attention_shift_val", {}).items():
        lines.append(f"| after {LABELS[arm]} | {a['vlm_referent_mass_ratio']:.2f} | {a['vlm_decoy_mass_ratio']:.2f} | "
                     f"{a['vlm_selectivity']:.2f} | {a['sink_mass']:.3f} |")
    lines.append("")
    for key, title in (("paired", "paired differences"), ("word_maps", "word maps (white: the referent's true mask)"),
                       ("entropy", "entropy"), ("curves", "training curves (seed 0)")):
        if key in figures:
            lines += [f"![{title}]({figures[key]})", ""]
    lines.append(f"Total time: {s['timings']['total_s']:.0f} s. Everything else: `results.json`.")
    return "\n".join(lines) + "\n"
