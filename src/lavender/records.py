"""Input records: read and validate JSONL files or HF datasets, load images, build the DM's text.

Two row shapes are accepted (docs/records.md):

- conversations: ``{"id", "images": [...], "messages": [{"role", "content"}, ...], "align_text"?}``
  — the ecosystem's (TRL, LLaMA-Factory) shape, ``<image>`` tags in the user turn;
- captions: ``{"id", "image", "caption"}`` — turned into a user turn ``"<image>" + CAPTION_PROMPT`` and
  an assistant turn holding the caption, so Stage 2 trains on both shapes the same way.

Image paths are relative to the JSONL file's folder unless absolute (or relative to ``images_root``
when given). A bad row never raises from :func:`iter_records`: it is yielded as a :class:`RecordError`
whose message names the record, the field and the fix, so a long job can log it and go on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavender.config import QA_MODES, LavenderError
from lavender.maps import minmax_np

CAPTION_PROMPT = "Describe the image."
IMAGE_TAG = "<image>"
MIN_SIDE = 8  # a map is 32×32; an image under 8 px carries no spatial information worth aligning


class RecordError(LavenderError, ValueError):
    """A record that cannot be used, with where it is and what to do about it.

    Attributes:
        index: 0-based position of the record in its source.
        record_id: its ``id`` (or ``None`` when the row has none / is not JSON).
        reason: the specific problem and fix, without the ``record N (id ...)`` prefix.
    """

    def __init__(self, index: int, record_id: str | None, reason: str):
        self.index = index
        self.record_id = record_id
        self.reason = reason
        where = f"record {index}" + (f" (id {record_id!r})" if record_id is not None else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class Record:
    """One validated example. ``images`` are resolved paths; ``messages`` are role/content dicts."""

    id: str
    index: int
    images: list[str]
    messages: list[dict] = field(default_factory=list)
    align_text: str | None = None
    caption: str | None = None
    source: str = ""
    align_pairs: list[dict] | None = None  # explicit VLM-word ↔ DM-word pairs (see _align_pairs)


def _strip_tags(text: str) -> str:
    return text.replace(IMAGE_TAG, " ").strip()


def dm_text(record: Record, qa_mode: str = "question+answer") -> str:
    """The text the diffusion model sees for ``record``.

    ``align_text`` when given, else the caption, else built from the conversation: ``question+answer``
    (the user turns' text without ``<image>`` tags, then the assistant turns'), ``answer`` or
    ``question`` alone. Raises ``ValueError`` on an unknown mode.
    """
    if qa_mode not in QA_MODES:
        raise ValueError(f"unknown --qa-text {qa_mode!r}; choose one of {QA_MODES}")
    if record.align_text:
        return record.align_text.strip()
    if record.caption:
        return record.caption.strip()
    questions = [_strip_tags(m["content"]) for m in record.messages if m["role"] == "user"]
    answers = [m["content"].strip() for m in record.messages if m["role"] == "assistant"]
    parts = {"question+answer": questions + answers, "answer": answers, "question": questions}[qa_mode]
    return " ".join(p for p in parts if p)


def _content_text(content: Any) -> str | None:
    """Message content as text: a string, or the text parts of a list of typed parts (OpenAI/TRL style)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict):
                return None
            if part.get("type") == "image":
                out.append(IMAGE_TAG)
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                return None
        return "".join(out)
    return None


def content_id(row: dict) -> str:
    """The id of a row that has none: ``"h"`` + 16 hex digits of the SHA-256 of its canonical JSON.

    Stable when other rows are inserted, removed or reordered; an edited row is a new record."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "h" + hashlib.sha256(blob).hexdigest()[:16]


def parse_record(row: Any, index: int, base_dir: Path, source: str, images_root: str | Path | None = None
                 ) -> Record:
    """Validate one row (a decoded JSON object) into a :class:`Record`; raise :class:`RecordError`."""
    if not isinstance(row, dict):
        raise RecordError(index, None, f"expected a JSON object, got {type(row).__name__}")
    rid = row.get("id")
    if rid is None:
        rid = content_id(row)  # by content, not position: inserting a row elsewhere shifts nothing
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise RecordError(index, None, f"field 'id' must be a string, got {type(rid).__name__}")
    rid = str(rid)

    def err(reason: str) -> RecordError:
        return RecordError(index, rid, reason)

    # images
    if "images" in row and row["images"] is not None:
        images = row["images"]
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise err("field 'images' must be a list of path strings")
    elif isinstance(row.get("image"), str):
        images = [row["image"]]
    elif "image" in row:
        raise err(f"field 'image' must be a path string, got {type(row['image']).__name__}")
    else:
        raise err("no 'images' (list of paths) or 'image' (path) field; every record needs an image")
    if not images:
        raise err("field 'images' is empty; every record needs an image")
    root = Path(images_root) if images_root is not None else base_dir
    resolved = []
    for p in images:
        path = Path(p) if os.path.isabs(p) else root / p
        if not path.is_file():
            where = f"under --images-root {str(root)!r}" if images_root is not None else f"next to {source}"
            raise err(f"image {p!r} not found {where}; fix the path or pass --images-root")
        resolved.append(str(path))

    # texts
    for key in ("align_text", "caption"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise err(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    caption = row.get("caption")
    align_text = row.get("align_text")
    messages: list[dict] = []
    if row.get("messages") is not None:
        if not isinstance(row["messages"], list):
            raise err("field 'messages' must be a list of {'role', 'content'} objects")
        for k, m in enumerate(row["messages"]):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise err(f"messages[{k}] must be an object with role 'system', 'user' or 'assistant'")
            text = _content_text(m.get("content"))
            if text is None:
                raise err(f"messages[{k}].content must be a string (or a list of text/image parts)")
            messages.append({"role": m["role"], "content": text})
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if n_tags and n_tags != len(images):
            raise err(f"{n_tags} '<image>' tags in messages but {len(images)} images; they must match")
    elif caption is not None:
        if not caption.strip() and not (align_text or "").strip():
            raise err("empty text: field 'caption' is empty and there is no align_text")
        messages = [{"role": "user", "content": IMAGE_TAG + CAPTION_PROMPT},
                    {"role": "assistant", "content": caption}]
    else:
        raise err("no 'messages' or 'caption' field; a record needs a conversation or a caption")
    rec = Record(id=rid, index=index, images=resolved, messages=messages, align_text=align_text,
                 caption=caption, source=source)
    if not dm_text(rec):
        raise err("empty text: align_text, caption and the conversation are all empty")
    if row.get("align_pairs") is not None:
        rec.align_pairs = _align_pairs(row["align_pairs"], rec, err)
    return rec


def _align_pairs(pairs: Any, rec: Record, err) -> list[dict]:
    """Validate ``align_pairs``: ``[{"message", "start", "end", "dm_start", "dm_end"}, ...]``.

    Each pair links the characters ``[start, end)`` of ``messages[message]["content"]`` (a VLM
    word) to ``[dm_start, dm_end)`` of the DM text (the word whose Stage-1 map is its target). It is
    how a record says WHICH of several equal words is meant ("red" of the referent, not of the decoy).
    """
    if not isinstance(pairs, list):
        raise err("field 'align_pairs' must be a list of {message, start, end, dm_start, dm_end} objects")
    text = dm_text(rec)
    out = []
    for k, p in enumerate(pairs):
        keys = ("message", "start", "end", "dm_start", "dm_end")
        if not isinstance(p, dict) or not all(isinstance(p.get(x), int) for x in keys):
            raise err(f"align_pairs[{k}] must be an object with integer fields {', '.join(keys)}")
        m = p["message"]
        if not 0 <= m < len(rec.messages):
            raise err(f"align_pairs[{k}].message {m} is not a message index (0..{len(rec.messages) - 1})")
        content = rec.messages[m]["content"]
        if not 0 <= p["start"] < p["end"] <= len(content):
            raise err(f"align_pairs[{k}]: [{p['start']}, {p['end']}) is outside messages[{m}].content "
                      f"({len(content)} characters)")
        if not 0 <= p["dm_start"] < p["dm_end"] <= len(text):
            raise err(f"align_pairs[{k}]: dm [{p['dm_start']}, {p['dm_end']}) is outside the DM text "
                      f"({len(text)} characters)")
        out.append({x: p[x] for x in keys})
    return out


def iter_records(source: Any, images_root: str | Path | None = None) -> Iterator[Record | RecordError]:
    """Yield a :class:`Record` or a :class:`RecordError` per row of ``source``; never raises for a row.

    Args:
        source: a ``.jsonl`` path, or an HF ``datasets.Dataset`` (image paths then resolve against
            ``images_root`` or the working directory).
        images_root: folder that relative image paths are relative to (default: the JSONL's folder).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"records file {str(path)!r} not found")
        name = path.name
        with open(path, "rb") as f:  # decoded per line: one bad byte costs one record, not the file
            index = 0
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RecordError(index, None, f"line {lineno} of {name} is not UTF-8 (byte {e.start}); "
                                                   "re-encode the file as UTF-8")
                    index += 1
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield RecordError(index, None, f"not valid JSON ({e.msg} at column {e.colno}) in {name}")
                else:
                    try:
                        yield parse_record(row, index, path.parent, name, images_root)
                    except RecordError as e:
                        yield e
                index += 1
        return
    # an HF Dataset (or any sequence of dict rows)
    base = Path(images_root) if images_root is not None else Path.cwd()
    name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "dataset"
    for index, row in enumerate(source):
        try:
            yield parse_record(dict(row), index, base, str(name), images_root)
        except RecordError as e:
            yield e


def read_records(source: Any, images_root: str | Path | None = None) -> list[Record]:
    """All records of ``source``; raises the first :class:`RecordError` (use :func:`iter_records` to skip)."""
    out = []
    for r in iter_records(source, images_root):
        if isinstance(r, RecordError):
            raise r
        out.append(r)
    return out


def load_image(path: str | Path):
    """Open ``path`` as an RGB ``PIL.Image``, converting any mode; ``ValueError`` if unusable.

    Greyscale, palette (with or without transparency), 16/32-bit integer and float, CMYK and RGBA images
    succeed; transparency is composited on white (what a viewer shows, and what the VLM's processor
    does not do consistently — so we do it once here). Unreadable, truncated or degenerate images
    (a side under 8 px) raise ``ValueError`` with the reason.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            img = im
    except FileNotFoundError as e:
        raise ValueError(f"image {str(path)!r} not found") from e
    except Image.DecompressionBombError as e:  # not an OSError: it would escape every caller's skip
        raise ValueError(f"image {str(path)!r} is larger than Pillow's decompression-bomb limit "
                         f"({Image.MAX_IMAGE_PIXELS} pixels); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if you trust the file") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {str(path)!r} is unreadable or corrupt ({e})") from e
    try:  # the orientation a viewer shows (phone photos store it in EXIF): both stages see the same image
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError):  # a malformed EXIF block: keep the stored orientation
        pass
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"image {str(path)!r} is {w}×{h} px; images need at least {MIN_SIDE} px per side")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float greyscale: rescale the actual range to 8 bits (PIL's convert('L') clips)
        a = minmax_np(np.asarray(img, dtype=np.float64)) * 255.0
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")
