"""The attention dataset: per-word DM maps keyed by example id, written shard by shard, atomically.

Layout of ``ATTN_DIR`` (format version 1)::

    manifest.json                         what produced the maps (DM, recipe, frame, normalisation...) + counts
    shards/r{rank:03d}-{seq:05d}.safetensors
        tensor "maps": float16 (total_words, S, S), the words of all examples of the shard, in order
        metadata "index": JSON list, one entry per example:
            {"id", "start", "count", "words": [...], "offsets": [[s, e], ...], "extra": {...}}
    errors-r{rank:03d}.jsonl              one {"index", "id", "reason"} line per bad record

Why this shape: a shard is ONE file, so ``os.replace`` of a fully written, fsync'ed temp file makes
it appear complete or not at all (a SIGKILL mid-write leaves only a ``.tmp`` file, ignored and later
removed). The index sits in the safetensors header, so opening a store reads headers only, and
``get(id)`` reads just that example's rows. Shard names carry the process rank, so N processes
(``accelerate launch``) never collide; together their shards are one dataset. Resume = skip ids
already in a complete shard; an example is in exactly one shard, never duplicated.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lavender.config import LavenderError, UsageError
from lavender.maps import minmax_np

FORMAT = "lavender-attention"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
SHARD_RE = re.compile(r"^r(\d{3,})-(\d{5,})\.safetensors$")
ERRORS_RE = re.compile(r"^errors-r(\d{3,})\.jsonl$")
# manifest keys that may differ between a run and its resumption
VOLATILE_KEYS = ("counts", "created", "software", "dm_path")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_manifest(out_dir: str | Path, manifest: dict) -> None:
    _atomic_write(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def _comparable(manifest: Mapping) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE_KEYS}


def _as_numpy(maps: Any) -> np.ndarray:
    if hasattr(maps, "detach"):  # torch tensor
        maps = maps.detach().float().cpu().numpy()
    return np.asarray(maps, dtype=np.float32)


class AttentionWriter:
    """Append examples' word maps to shards of ``out_dir`` for process ``rank``.

    Args:
        out_dir: the attention dataset folder (created).
        manifest: what produced the maps. Written by rank 0 when the folder is new; when it exists, the
            stored manifest must match (ignoring ``counts``/``created``/``software``), else ``ValueError``
            — resuming with other arguments would mix incompatible maps.
        rank: process index; shard and error file names carry it.
        shard_size: examples per shard. Smaller = less work lost on a kill, more files.
    """

    def __init__(self, out_dir: str | Path, manifest: dict, rank: int = 0, shard_size: int = 256):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.shard_size = max(1, int(shard_size))
        (self.out_dir / SHARDS).mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
        path = self.out_dir / MANIFEST
        if path.exists():
            old = json.loads(path.read_text())
            if _comparable(old) != _comparable(manifest):
                diff = sorted(k for k in set(old) | set(manifest)
                              if k not in VOLATILE_KEYS and old.get(k) != manifest.get(k))
                raise UsageError(
                    f"{path} was written with different settings ({', '.join(diff)}); resuming would mix "
                    "incompatible maps. Use the same arguments, or a new --out folder."
                )
            self.manifest = old
        else:
            if rank == 0:
                write_manifest(self.out_dir, manifest)
            self.manifest = manifest
        # leftovers of a killed writer of this rank: never complete, safe to drop
        for p in (self.out_dir / SHARDS).glob(f".r{rank:03d}-*.tmp-*"):
            p.unlink(missing_ok=True)
        if rank == 0:  # a manifest temp file of a process that is gone (killed mid-write)
            for p in self.out_dir.glob(f".{MANIFEST}.tmp-*"):
                if not _pid_alive(p.name.rsplit("-", 1)[-1]):
                    p.unlink(missing_ok=True)
        seqs = [int(m.group(2)) for p in (self.out_dir / SHARDS).iterdir()
                if (m := SHARD_RE.match(p.name)) and int(m.group(1)) == rank]
        self._seq = max(seqs, default=-1) + 1
        self._index: list[dict] = []
        self._maps: list[np.ndarray] = []
        self._n_words = 0
        self._map_shape: tuple[int, int] | None = None
        errors_path = self.out_dir / f"errors-r{rank:03d}.jsonl"
        self._known_errors: set[str] = set()  # a resume meets the same bad records again: list them once
        if errors_path.exists():
            self._known_errors = {ln.strip() for ln in errors_path.read_text(encoding="utf-8", errors="replace")
                                  .splitlines() if ln.strip()}
        self._errors = open(errors_path, "a", encoding="utf-8")

    def done_ids(self) -> set[str]:
        """Ids already in complete shards of ANY rank (what a resumed run skips)."""
        return set(read_shard_indexes(self.out_dir))

    def done_fingerprints(self) -> dict[str, dict | None]:
        """id → the fingerprint its stored maps were computed from (None: written before fingerprints)."""
        return stored_fingerprints(self.out_dir)

    def add(self, id: str, words: list[str], offsets: list[tuple[int, int]], maps: Any,
            extra: dict | None = None) -> None:
        """Queue one example: ``maps`` is (n_words, S, S), one map per word occurrence, in ``words`` order.

        ``extra`` is small JSON-able per-example metadata (e.g. the original image size, truncation).
        A shard is written when ``shard_size`` examples are queued.
        """
        arr = _as_numpy(maps)
        if arr.ndim != 3 or arr.shape[0] != len(words) or len(offsets) != len(words):
            raise ValueError(f"example {id!r}: maps {arr.shape} must be (n_words={len(words)}, S, S) and "
                             f"offsets must have one (start, end) per word ({len(offsets)} given)")
        if self._map_shape is None:
            self._map_shape = arr.shape[1:]
        elif arr.shape[1:] != self._map_shape and arr.shape[0]:
            raise ValueError(f"example {id!r}: map size {arr.shape[1:]} differs from {self._map_shape}")
        self._index.append({"id": str(id), "start": self._n_words, "count": len(words), "words": list(words),
                            "offsets": [[int(s), int(e)] for s, e in offsets], "extra": extra or {}})
        self._maps.append(arr.astype(np.float16))
        self._n_words += len(words)
        if len(self._index) >= self.shard_size:
            self.flush()

    def add_error(self, index: int, id: str | None, reason: str) -> None:
        """Record a bad record (flushed at once, so a crash still leaves it in the errors file)."""
        line = json.dumps({"index": index, "id": id, "reason": reason})
        if line in self._known_errors:
            return
        self._known_errors.add(line)
        self._errors.write(line + "\n")
        self._errors.flush()

    def flush(self) -> None:
        """Write the queued examples as one shard (atomic); no-op when nothing is queued."""
        if not self._index:
            return
        from safetensors.numpy import save

        side = self._map_shape or (0, 0)
        maps = np.concatenate(self._maps) if self._n_words else np.zeros((0, *side), np.float16)
        data = save({"maps": np.ascontiguousarray(maps)},
                    metadata={"index": json.dumps(self._index), "format_version": str(FORMAT_VERSION)})
        name = f"r{self.rank:03d}-{self._seq:05d}.safetensors"
        _atomic_write(self.out_dir / SHARDS / name, data)
        self._seq += 1
        self._index, self._maps, self._n_words = [], [], 0

    def close(self) -> None:
        self.flush()
        self._errors.close()

    def __enter__(self) -> AttentionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_paths(root: str | Path) -> list[Path]:
    d = Path(root) / SHARDS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))


def shard_entries(root: str | Path) -> Iterator[tuple[Path, dict]]:
    """(shard path, index entry) for every example of every complete shard, duplicates included."""
    from safetensors import safe_open

    for p in shard_paths(root):
        try:
            with safe_open(str(p), framework="numpy") as f:
                index = json.loads(f.metadata()["index"])
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise LavenderError(f"{p}: corrupt shard ({str(e).splitlines()[0][:120]}); shards are written "
                                "atomically, so this is damage from outside: delete the file and rerun the "
                                "same `lavender extract` to recompute its examples") from None
        for entry in index:
            yield p, entry


def read_shard_indexes(root: str | Path) -> dict[str, tuple[Path, dict]]:
    """id → (shard path, index entry) over all complete shards.

    An id stored twice keeps the copy a resumed extraction RECOMPUTED (``extra.redo``: its record or
    image changed since the first copy was written); otherwise the first shard wins (two runs that
    wrote one folder: ``inspect`` reports it)."""
    out: dict[str, tuple[Path, dict]] = {}
    for p, entry in shard_entries(root):
        if entry["id"] not in out or entry.get("extra", {}).get("redo"):
            out[entry["id"]] = (p, entry)
    return out


def stored_fingerprints(root: str | Path) -> dict[str, dict | None]:
    """id → the fingerprint (``extra.fp``) of each stored example of ``root``; {} for no dataset yet."""
    return {id: e.get("extra", {}).get("fp") for id, (_, e) in read_shard_indexes(root).items()}


class AttentionStore:
    """Read an attention dataset: ``store.get(id) -> {"words", "offsets", "maps"}`` and friends.

    Opening reads the manifest and every shard's header (not the maps); ``get`` reads only the rows of
    the example, through a small cache of open shard handles, so random access by id is cheap — the
    trainer joins maps to examples by id.
    """

    def __init__(self, root: str | Path, max_open: int = 16):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not an attention dataset (no {MANIFEST}); "
                                    "create one with `lavender extract` or import_authors_layout")
        self.manifest: dict = json.loads(path.read_text())
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise LavenderError(f"{self.root}: format version {self.manifest['format_version']} is newer than "
                             f"this lavender reads ({FORMAT_VERSION}); upgrade lavender")
        self._entries = read_shard_indexes(self.root)
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, id: object) -> bool:
        return id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def entry(self, id: str) -> dict:
        """The index entry of ``id`` (words, offsets, extra) without reading maps."""
        return self._entries[id][1]

    def _handle(self, path: Path):
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            h = safe_open(str(path), framework="numpy")
            self._handles[path] = h
            if len(self._handles) > self._max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(path)
        return h

    def get(self, id: str) -> dict:
        """``{"words": list[str], "offsets": list[(s, e)], "maps": float16 array (n_words, S, S), "extra"}``."""
        try:
            path, e = self._entries[id]
        except KeyError:
            raise KeyError(f"no maps for example {id!r} in {self.root}") from None
        maps = self._handle(path).get_slice("maps")[e["start"]: e["start"] + e["count"]]
        return {"words": list(e["words"]), "offsets": [tuple(o) for o in e["offsets"]],
                "maps": np.asarray(maps), "extra": dict(e.get("extra", {}))}

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for id in self._entries:
            yield id, self.get(id)

    def map_shape(self) -> list[int]:
        for p in shard_paths(self.root):
            shape = self._handle(p).get_slice("maps").get_shape()
            if shape[0]:
                return list(shape[1:])
        size = self.manifest.get("map_size")
        return [size, size] if size else []

    def n_words(self) -> int:
        return sum(e["count"] for _, e in self._entries.values())

    def errors(self) -> list[dict]:
        """Bad records of all runs, deduplicated by id (latest reason), minus ids that now have maps."""
        latest: dict[Any, dict] = {}
        for p in sorted(self.root.glob("errors-r*.jsonl")):
            for line in p.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                key = row.get("id") if row.get("id") is not None else ("#", row.get("index"))
                latest[key] = row
        return [r for k, r in latest.items() if not (isinstance(k, str) and k in self._entries)]

    def to_hf_dataset(self):
        """The dataset as an HF ``datasets.Dataset`` with columns id, words, offsets, maps (float16)."""
        import datasets

        shape = self.map_shape() or [32, 32]
        features = datasets.Features({
            "id": datasets.Value("string"),
            "words": datasets.List(datasets.Value("string")),
            "offsets": datasets.List(datasets.List(datasets.Value("int32"), length=2)),
            "maps": datasets.Array3D(shape=(None, *shape), dtype="float16"),
        })
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shard_paths(self.root)]
        return datasets.Dataset.from_generator(
            _hf_rows, features=features, gen_kwargs={"root": str(self.root.resolve()), "stamp": stamp})


def _hf_rows(root: str, stamp: list) -> Iterator[dict]:
    # ``stamp`` only makes the datasets cache key change when the shards change
    store = AttentionStore(root)
    for id, ex in store:
        yield {"id": id, "words": ex["words"], "offsets": [list(o) for o in ex["offsets"]], "maps": ex["maps"]}


def update_counts(root: str | Path) -> dict:
    """Recount examples/words/errors from the shards and store them in the manifest (call after all ranks)."""
    store = AttentionStore(root)
    counts = {"examples": len(store), "words": store.n_words(), "errors": len(store.errors()),
              "shards": len(shard_paths(root))}
    manifest = dict(store.manifest, counts=counts)
    write_manifest(root, manifest)
    return counts


# ---------------------------------------------------------------------------------------------------
# The authors' released layout: <image folder>/lpm_attention/<image stem>/attention_<word>.jpg
# (8-bit grey, 32×32, one file per distinct word). See docs/stage1.md for what cannot survive it.

AUTHORS_DIR = "lpm_attention"


def escape_word(word: str) -> str:
    """A word as a file-name part that round-trips: percent-encode everything but letters/digits/-,
    including ``_`` and ``.`` (the authors' names break on them: ``attention_e.g.jpg``)."""
    return urllib.parse.quote(word, safe="").replace("_", "%5F").replace(".", "%2E").replace("~", "%7E")


def unescape_word(name: str) -> str:
    """Inverse of :func:`escape_word`; an authors' raw name (``a_b``) has no ``%`` and stays as is."""
    return urllib.parse.unquote(name)


def authors_folder(image_path: str | Path) -> Path:
    p = Path(image_path)
    return p.parent / AUTHORS_DIR / p.stem


def export_authors_layout(store: AttentionStore | str | Path, images: Mapping[str, str | Path]) -> int:
    """Write each example's maps as ``<image dir>/lpm_attention/<stem>/attention_<escaped word>.jpg``.

    Args:
        store: the attention dataset (or its folder).
        images: example id → its image path (e.g. ``{r.id: r.images[0] for r in records}``).

    One file per distinct word (case kept): a repeated word collapses to its FIRST occurrence's map,
    the layout has no place for more. Maps are min–max scaled to 0..255 if not already in [0, 1].
    Returns the number of files written.
    """
    from PIL import Image

    store = store if isinstance(store, AttentionStore) else AttentionStore(store)
    n = 0
    for id, image_path in images.items():
        if id not in store:
            continue
        ex = store.get(id)
        folder = authors_folder(image_path)
        folder.mkdir(parents=True, exist_ok=True)
        written: set[str] = set()
        for word, m in zip(ex["words"], ex["maps"].astype(np.float32)):
            if word in written:
                continue
            written.add(word)
            if m.min() < 0 or m.max() > 1:
                m = minmax_np(m).astype(np.float32)
            Image.fromarray((m * 255).round().astype(np.uint8), mode="L").save(
                folder / f"attention_{escape_word(word)}.jpg", quality=95)
            n += 1
    return n


def import_authors_layout(records: Iterable, out_dir: str | Path, manifest: dict | None = None,
                          qa_mode: str = "question+answer", map_size: int = 32) -> dict:
    """Build an attention dataset from the authors' layout next to each record's image.

    Args:
        records: :class:`lavender.records.Record` objects (their first image locates the folder, their
            DM text orders the words and gives offsets).
        out_dir: the new attention dataset.
        manifest: extra manifest fields (e.g. which DM the authors used).
        map_size: maps of another size are resized (bilinear) to this.

    File names are read as ``attention_<word>.jpg`` with ``<word>`` everything between the first
    ``attention_`` and the final ``.jpg``, percent-decoded (so our own exports round-trip, and the
    authors' raw ``attention_a_b.jpg`` is the word ``a_b``). The authors' names are ambiguous: a word
    with ``.`` or ``_`` cannot be told from a file-name artefact, so an imported word that is not in
    the record's text is kept with offsets ``(-1, -1)`` after the text's words. A word found in the
    text gets the offsets of EVERY occurrence (compared case-insensitively), each with the same map —
    the layout stored one map per distinct word. Returns ``{"examples", "words", "missing"}``.
    """
    from PIL import Image

    from lavender.records import dm_text
    from lavender.words import split_words

    man = {"source": "authors-layout", "map_size": map_size, "normalization": "minmax",
           "dtype": "float16", **(manifest or {})}
    counts = {"examples": 0, "words": 0, "missing": 0}
    with AttentionWriter(out_dir, man) as w:
        for rec in records:
            folder = authors_folder(rec.images[0])
            files = sorted(folder.glob("attention_*.jpg")) if folder.is_dir() else []
            if not files:
                counts["missing"] += 1
                w.add_error(rec.index, rec.id, f"no {AUTHORS_DIR} maps in {folder}")
                continue
            by_word: dict[str, np.ndarray] = {}
            for f in files:
                word = unescape_word(f.name[len("attention_"): -len(".jpg")])
                with Image.open(f) as im:
                    im = im.convert("L")
                    if im.size != (map_size, map_size):
                        im = im.resize((map_size, map_size), Image.BILINEAR)
                    by_word[word] = np.asarray(im, dtype=np.float32) / 255.0
            lower = {k.lower(): k for k in by_word}
            words, offsets, maps, used = [], [], [], set()
            for wd in split_words(dm_text(rec, qa_mode)):
                key = wd.text if wd.text in by_word else lower.get(wd.text.lower())
                if key is None:
                    continue
                used.add(key)
                words.append(wd.text)
                offsets.append((wd.start, wd.end))
                maps.append(by_word[key])
            for key in sorted(set(by_word) - used):
                words.append(key)
                offsets.append((-1, -1))
                maps.append(by_word[key])
            w.add(rec.id, words, offsets, np.stack(maps))
            counts["examples"] += 1
            counts["words"] += len(words)
    update_counts(out_dir)
    return counts


# ------------------------------------------------------------------------ Hugging Face datasets
def to_hf_dataset(root: str | Path) -> Any:
    """An attention dataset as a ``datasets.Dataset`` with typed columns, ready for ``push_to_hub``:
    ``id`` (string), ``words`` (list of strings), ``offsets`` (list of [start, end] int32),
    ``maps`` (``Array3D`` (n_words, S, S) float16), ``extra`` (JSON string). The manifest travels in
    ``info.description`` as JSON (:func:`from_hf_dataset` reads it back)."""
    from datasets import Array3D, Dataset, DatasetInfo, Features, Sequence, Value

    store = AttentionStore(root)
    side = int(store.manifest.get("map_size", 32))
    features = Features({"id": Value("string"), "words": Sequence(Value("string")),
                         "offsets": Sequence(Sequence(Value("int32"), length=2)),
                         "maps": Array3D(shape=(None, side, side), dtype="float16"), "extra": Value("string")})

    def rows():
        for id, ex in store:
            entry = store.entry(id)
            yield {"id": id, "words": list(ex["words"]), "offsets": [list(o) for o in ex["offsets"]],
                   "maps": np.asarray(ex["maps"], dtype=np.float16), "extra": json.dumps(entry.get("extra", {}))}

    info = DatasetInfo(description=json.dumps({"lavender_manifest": store.manifest}))
    return Dataset.from_generator(rows, features=features, info=info)


def export_parquet(root: str | Path, out_dir: str | Path) -> Path:
    """Write ``OUT/attention.parquet`` (the typed columns of :func:`to_hf_dataset`) and
    ``OUT/manifest.json``; ``datasets.load_dataset("parquet", data_files=...)`` reads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = to_hf_dataset(root)
    ds.to_parquet(str(out / "attention.parquet"))
    (out / MANIFEST).write_text(json.dumps(AttentionStore(root).manifest, indent=2))
    return out


def from_hf_dataset(ds: Any, out_dir: str | Path, manifest: dict | None = None, shard_size: int = 256) -> int:
    """Write a ``datasets.Dataset`` with :func:`to_hf_dataset`'s columns back as an attention dataset
    (a folder ``AttentionStore`` reads); returns the examples written. ``manifest`` defaults to the
    one in ``ds.info.description``."""
    if manifest is None:
        try:
            manifest = json.loads(ds.info.description or "{}").get("lavender_manifest")
        except json.JSONDecodeError:
            manifest = None
    if not manifest:
        raise LavenderError("the dataset carries no Lavender manifest; pass manifest= (the one written beside it)")
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", *VOLATILE_KEYS)}
    n = 0
    with AttentionWriter(out_dir, manifest, shard_size=shard_size) as writer:
        for row in ds.with_format("numpy"):
            words = [str(w) for w in row["words"]]
            maps = np.asarray(row["maps"], dtype=np.float32).reshape(len(words), *np.asarray(row["maps"]).shape[-2:]) \
                if len(words) else np.zeros((0, 1, 1), np.float32)
            writer.add(str(row["id"]), words, [tuple(int(x) for x in o) for o in row["offsets"]], maps,
                       extra=json.loads(str(row["extra"]) or "{}"))
            n += 1
    update_counts(out_dir)
    return n


def import_parquet(path: str | Path, out_dir: str | Path) -> int:
    """Read :func:`export_parquet`'s folder (or a parquet file with ``manifest.json`` beside it)."""
    from datasets import load_dataset

    p = Path(path)
    if not p.exists():
        raise LavenderError(f"{p}: not found; give the folder `lavender data attention-export` wrote "
                            "(attention.parquet + manifest.json) or a parquet file")
    folder = p if p.is_dir() else p.parent
    files = str(folder / "attention.parquet") if p.is_dir() else str(p)
    ds = load_dataset("parquet", data_files=files, split="train")
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else None
    return from_hf_dataset(ds, out_dir, manifest)
