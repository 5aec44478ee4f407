"""Mix record files by ratio, and split one into train / val by image.

Both rewrite relative image paths so they stay valid from the output's folder, and both are
deterministic given ``seed``. Ratio semantics (also in docs/data.md):

- without ``total``: ``A.jsonl:0.5`` takes round(0.5 x len(A)) records of A, sampled without
  replacement; a ratio above 1 up-samples (whole copies, then a random remainder), ``:1`` or no
  ratio takes all of A. This is how the paper's RV83k + Flk30k + OV30k mixture is written.
- with ``total=N``: the ratios are relative weights, normalised to sum to 1; A contributes
  round(N x weight) records (largest remainders, so the counts add up to exactly N), up-sampled
  as above when A is too small.

Ids stay as they are when unique, so Stage 1 maps keyed by id still match. An id that two sources
share becomes ``<source stem>:<id>``; the 2nd, 3rd... copy of an up-sampled record gets ``#2``,
``#3``...; a changed record keeps its original id in ``source_id``. Every record gets ``source``
(the file stem it came from), unless it already has one.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from lavender.config import UsageError


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a JSONL file; a line that is not a JSON object raises naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {str(path)!r} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def image_paths(row: dict, base: Path) -> list[Path]:
    """The record's images as absolute paths (relative ones are relative to ``base``)."""
    images = row.get("images")
    if images is None:
        images = [row["image"]] if isinstance(row.get("image"), str) else []
    elif isinstance(images, str):
        images = [images]
    return [Path(os.path.abspath(p if os.path.isabs(p) else base / p)) for p in images]


def rebase(row: dict, src_dir: Path, out_dir: Path) -> dict:
    """A copy of ``row`` whose relative image paths point at the same files from ``out_dir``."""
    row = dict(row)

    def move(p: Any) -> Any:
        if not isinstance(p, str) or os.path.isabs(p):
            return p
        try:
            return os.path.relpath(os.path.abspath(src_dir / p), os.path.abspath(out_dir))
        except ValueError:  # different drives (Windows): keep it absolute
            return os.path.abspath(src_dir / p)

    if isinstance(row.get("images"), list):
        row["images"] = [move(p) for p in row["images"]]
    elif isinstance(row.get("images"), str):
        row["images"] = move(row["images"])
    if isinstance(row.get("image"), str):
        row["image"] = move(row["image"])
    return row


def parse_source(spec: str) -> tuple[Path, float]:
    """``"A.jsonl:0.5"`` -> (A.jsonl, 0.5); without ``:RATIO`` the ratio is 1."""
    path, sep, ratio = spec.rpartition(":")
    if not sep:
        return Path(spec), 1.0
    try:
        value = float(ratio)
    except ValueError:
        return Path(spec), 1.0  # a ':' that is part of the path
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"mix source {spec!r}: the ratio must be a number >= 0, got {ratio!r}")
    return Path(path), value


def _quotas(sizes: list[int], ratios: list[float], total: int | None) -> list[int]:
    if total is None:
        return [round(r * n) for r, n in zip(ratios, sizes)]
    wsum = sum(ratios)
    if wsum <= 0:
        raise UsageError("mix: with --total the ratios are weights and must not all be 0")
    exact = [total * r / wsum for r in ratios]
    quotas = [math.floor(x) for x in exact]
    # largest remainders get the records left over, so the quotas add up to exactly `total`
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - quotas[i], reverse=True)[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _sample(n: int, k: int, rng: random.Random) -> list[tuple[int, int]]:
    """k (index, copy number) pairs from n items: whole copies first, then a sample of the rest."""
    if n == 0:
        return []
    full, rest = divmod(k, n)
    picks = [(i, c + 1) for c in range(full) for i in range(n)]
    picks += [(i, full + 1) for i in sorted(rng.sample(range(n), rest))]
    return picks


def mix(sources: list[tuple[str | Path, float]], out: str | Path, seed: int = 0,
        total: int | None = None) -> dict[str, Any]:
    """Write a shuffled mixture of record files; return per-source counts.

    Args:
        sources: ``(records.jsonl, ratio)`` pairs (see the module docstring for ratio semantics).
        out: the mixture's ``.jsonl``; relative image paths are rewritten for its folder.
        seed: seeds both the sampling and the final shuffle.
        total: if given, the mixture's exact size, the ratios being relative weights.
    """
    if not sources:
        raise ValueError("mix needs at least one SOURCE.jsonl[:RATIO]")
    if total is not None and total < 0:
        raise UsageError(f"--total must be >= 0, got {total}")
    out = Path(out)
    for p, _ in sources:
        if out.exists() and Path(p).exists() and out.resolve() == Path(p).resolve():
            raise UsageError(f"--out {out} is also a source: the mixture would overwrite its own input; "
                             "write it to another file")
    rng = random.Random(seed)
    loaded = [(Path(p), read_jsonl(p)) for p, _ in sources]
    quotas = _quotas([len(rows) for _, rows in loaded], [r for _, r in sources], total)
    names = [p.stem if [q.stem for q, _ in loaded].count(p.stem) == 1 else f"{p.stem}{i}"
             for i, (p, _) in enumerate(loaded)]
    picked: list[tuple[int, dict, int]] = []  # (source number, row, copy number)
    report: dict[str, Any] = {"out": str(out), "sources": []}
    for s, ((path, rows), k) in enumerate(zip(loaded, quotas)):
        if k and not rows:
            raise ValueError(f"mix: {path} has no records but a ratio > 0")
        picks = _sample(len(rows), k, rng)
        picked += [(s, rows[i], c) for i, c in picks]
        report["sources"].append({"path": str(path), "available": len(rows), "taken": k,
                                  "upsampled": k > len(rows)})
    # ids shared by two sources get a source prefix; repeated copies a #copy suffix
    owners: dict[str, set[int]] = {}
    for s, row, _ in picked:
        owners.setdefault(str(row.get("id")), set()).add(s)
    mixed = []
    for s, row, copy in picked:
        src_path = loaded[s][0]
        new = rebase(row, src_path.parent, out.parent)
        rid = str(row.get("id"))
        new_id = f"{names[s]}:{rid}" if len(owners[rid]) > 1 else rid
        if copy > 1:
            new_id = f"{new_id}#{copy}"
        if new_id != rid:
            new["id"], new["source_id"] = new_id, row.get("id")
        new.setdefault("source", names[s])
        mixed.append(new)
    rng.shuffle(mixed)
    counts = Counter(r["id"] for r in mixed)
    dup = [i for i, c in counts.items() if c > 1]
    if dup:
        raise ValueError(f"mix: ids repeat within one source ({dup[:3]}...); make them unique first")
    write_jsonl(mixed, out)
    report["written"] = len(mixed)
    return report


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)


def split(data: str | Path, val: float, out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Split records into ``out_dir/train.jsonl`` and ``out_dir/val.jsonl`` BY IMAGE.

    Records that share an image (directly, or through a chain of multi-image records) form one
    group and go to the same side, so no image is in both files. ``val`` is the fraction of those
    image groups sent to validation (at least one group each side when there are two or more).
    Images are identified by their absolute path: two copies of one picture under different names
    are not detected. Record order is kept within each file.
    """
    if not 0.0 < val < 1.0:
        raise UsageError(f"--val must be a fraction strictly between 0 and 1, got {val}")
    data, out_dir = Path(data), Path(out_dir)
    rows = read_jsonl(data)
    uf = _UnionFind()
    for i, row in enumerate(rows):
        uf.find(("record", i))
        for p in image_paths(row, data.parent):
            uf.union(("record", i), ("image", str(p)))
    groups: dict[Any, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(uf.find(("record", i)), []).append(i)
    keys = sorted(groups, key=lambda k: min(groups[k]))  # deterministic before the seeded shuffle
    random.Random(seed).shuffle(keys)
    n_val = round(val * len(keys))
    if len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val_idx = {i for k in keys[:n_val] for i in groups[k]}
    train_rows = [rebase(r, data.parent, out_dir) for i, r in enumerate(rows) if i not in val_idx]
    val_rows = [rebase(r, data.parent, out_dir) for i, r in enumerate(rows) if i in val_idx]
    write_jsonl(train_rows, out_dir / "train.jsonl")
    write_jsonl(val_rows, out_dir / "val.jsonl")
    return {"train": len(train_rows), "val": len(val_rows), "image_groups": len(keys),
            "val_groups": n_val, "out": str(out_dir)}
