"""Answer records with a model and score the answers (``lavender eval``).

Predictions come from :func:`lavender.generation.generate` (batched, greedy, the family's chat
template); scores from :mod:`lavender.metrics`. A record's references are its ``answers`` field, else
its last assistant turn; its metric is its ``metric`` field, else the command's ``--metric``; with
neither, both ``exact`` (normalised exact match) and ``contains`` (relaxed match: a reference occurs
as whole words in the answer) are reported. Bad records are skipped, counted and listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lavender.metrics import format_table, score
from lavender.records import RecordError, iter_records, load_image


def _raw_rows(path: str) -> list[Any]:
    """The JSONL rows in the order :func:`iter_records` numbers them (non-blank lines)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
    return rows


def evaluation_items(data: str, images_root: str | None = None, limit: int | None = None
                     ) -> tuple[list[dict[str, Any]], list[RecordError]]:
    """Records to answer, each ``{id, messages, images, answers, type, metric, choices}``, and the bad ones."""
    raw = _raw_rows(data)
    items, errors = [], []
    for rec in iter_records(data, images_root=images_root):
        if isinstance(rec, RecordError):
            errors.append(rec)
            continue
        row = raw[rec.index] or {}
        answers = row.get("answers")
        if answers is None:
            last = [m["content"] for m in rec.messages if m["role"] == "assistant"]
            answers = last[-1:]
        if not answers:
            errors.append(RecordError(rec.index, rec.id, "no 'answers' field and no assistant turn to score against"))
            continue
        items.append({"id": rec.id, "messages": rec.messages, "images": rec.images,
                      "answers": [str(a) for a in answers], "type": row.get("type"),
                      "metric": row.get("metric"), "choices": row.get("choices")})
        if limit is not None and len(items) >= limit:
            break
    return items, errors


def evaluate(model: Any, processor: Any, data: str, *, metric: str | None = None, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 16, images_root: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Generate and score; returns ``{"n", "skipped", "scores": {metric: score-result}, "predictions"}``."""
    from lavender.generation import generate

    items, errors = evaluation_items(data, images_root, limit)
    prompts, ok = [], []
    for it in items:
        try:
            prompts.append((it["messages"], [load_image(p) for p in it["images"]]))
            ok.append(it)
        except (OSError, ValueError) as e:
            errors.append(RecordError(-1, it["id"], str(e)))
    preds = generate(model, processor, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     progress=progress)
    for it, p in zip(ok, preds):
        it["prediction"] = p
    scores = {m: score(group, m) for m, group in _metric_groups(ok, metric).items()}
    return {"n": len(ok), "skipped": [str(e) for e in errors], "scores": scores,
            "predictions": [{k: it[k] for k in ("id", "type", "answers", "prediction")} for it in ok]}


def _metric_groups(items: list[dict[str, Any]], metric: str | None) -> dict[str, list[dict[str, Any]]]:
    """Which records each metric scores: ``--metric`` for all; else each record's own; else exact + contains."""
    if metric:
        return {metric: items}
    groups: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        for m in [it["metric"]] if it["metric"] else ["exact", "contains"]:
            groups.setdefault(m, []).append(it)
    return groups


def write_results(result: dict[str, Any], out: str) -> Path:
    """``out/results.json`` (summary, per-type) and ``out/predictions.jsonl`` (per record, with scores)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_id: dict[str, dict] = {}
    for m, s in result["scores"].items():
        for row in (s or {}).get("per_record", []):
            per_id.setdefault(row["id"], {})[m] = row["score"]
    with open(out_dir / "predictions.jsonl", "w") as f:
        for p in result["predictions"]:
            f.write(json.dumps({**p, "scores": per_id.get(p["id"], {})}) + "\n")
    summary = {"n": result["n"], "skipped": result["skipped"],
               "scores": {m: {k: v for k, v in (s or {}).items() if k != "per_record"}
                          for m, s in result["scores"].items()}}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "results.json")
    return out_dir / "results.json"


def summary_table(result: dict[str, Any]) -> str:
    return "\n\n".join(format_table(s) for s in result["scores"].values() if s)
