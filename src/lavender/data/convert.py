"""Converters from public dataset and benchmark files to Lavender records (JSONL).

One small function per format turns one source row into records; :data:`CONVERTERS` registers it
with the reader of its files and its default prompt. :func:`convert` drives any of them: it counts
rows read, records written and rows skipped (by reason, with the first examples), writes embedded
images (parquet / HF rows, base64 TSV cells) to files, and stores every image path relative to the
output JSONL's folder, so the output folder can be moved as a whole. Formats and fields: docs/data.md.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavender.config import UsageError
from lavender.records import CAPTION_PROMPT, IMAGE_TAG

# LLaVA-1.5's short-answer instruction, also VLMEvalKit's for VQA-style benchmarks
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."
MC_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


class ConvertError(ValueError):
    """A problem with the conversion's settings (not with one row): stops the conversion."""


class Skip(Exception):
    """A source row that yields no record: ``reason`` is the short category counted in the report,
    ``detail`` says which value was wrong and how to fix it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ConvertReport:
    """What a conversion did. ``skipped`` counts rows per reason; ``examples`` keeps the first
    messages so a user can find the offending rows."""

    format: str
    out: str
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    renamed: int = 0  # records whose id repeated an earlier one and got a "#k" suffix
    images_written: int = 0  # embedded images saved as files
    attention: dict | None = None  # authors-attention: counts of the imported attention dataset
    examples: list[str] = field(default_factory=list)

    def skip(self, row: int, err: Skip) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"row {row}: {err}")

    def summary(self) -> str:
        lines = [f"{self.format}: read {self.read} rows, wrote {self.written} records to {self.out}"
                 + (f", saved {self.images_written} embedded images" if self.images_written else "")]
        if self.renamed:
            lines.append(f"  {self.renamed} repeated ids made unique with a '#k' suffix")
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason}")
        lines += [f"    {e}" for e in self.examples]
        if self.attention is not None:
            lines.append(f"  attention dataset: {self.attention}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "out": self.out, "read": self.read, "written": self.written,
                "skipped": dict(self.skipped), "renamed": self.renamed,
                "images_written": self.images_written, "attention": self.attention, "examples": self.examples}


@dataclass
class Context:
    """Per-conversion state a row function needs: where images are and go, and the options."""

    out: Path
    images_root: Path | None
    image_dir: Path
    prompt: str | None
    split: str | None
    current_input: Path = Path(".")
    row_index: int = 0
    saved: dict[str, str] = field(default_factory=dict)  # key -> written relative path (MMBench reuse)
    images_written: int = 0
    names: set[str] = field(default_factory=set)  # image files written by this run

    def rel(self, path: Path) -> str:
        """``path`` relative to the output JSONL's folder when possible (else absolute)."""
        try:
            return os.path.relpath(path.resolve(), self.out.parent.resolve())
        except ValueError:  # another drive on Windows: no relative path exists
            return str(path.resolve())

    def image_path(self, name: str) -> str:
        """A referenced image file: resolved against ``--images-root`` (default: the input's folder),
        checked to exist, returned relative to the output."""
        if not isinstance(name, str) or not name.strip():
            raise Skip("bad image field", f"expected a file name, got {name!r}")
        root = self.images_root or self.current_input.parent
        path = Path(name) if os.path.isabs(name) else root / name
        if not path.is_file():
            raise Skip("missing image", f"{name!r} not found under {str(root)!r}; pass --images-root")
        return self.rel(path)

    def save_image(self, data: bytes, stem: str) -> str:
        """Write embedded image bytes (format checked with PIL, bytes kept as they are) to
        ``image_dir/<stem>.<ext>``; return the path relative to the output."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "png").lower()
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise Skip("corrupt embedded image", f"{len(data)} bytes that PIL cannot read ({e})") from e
        ext = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        name = f"{_safe(stem)}.{ext}"
        k = 1
        while name in self.names:  # two rows with one id must not overwrite each other's image
            k += 1
            name = f"{_safe(stem)}-{k}.{ext}"
        self.names.add(name)
        path = self.image_dir / name
        path.write_bytes(data)
        self.images_written += 1
        return self.rel(path)

    def image(self, value: Any, stem: str) -> str:
        """Any image cell: a path string, an HF Image dict ``{"bytes", "path"}``, raw bytes or a PIL
        image (what ``datasets`` decodes to)."""
        if isinstance(value, str):
            return self.image_path(value)
        if isinstance(value, (bytes, bytearray)):
            return self.save_image(bytes(value), stem)
        if isinstance(value, dict):
            if value.get("bytes"):
                return self.save_image(bytes(value["bytes"]), stem)
            if value.get("path"):
                return self.image_path(value["path"])
        if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return self.save_image(buf.getvalue(), stem)
        raise Skip("bad image field", f"cannot read an image from a {type(value).__name__}")

    def fill(self, default: str, **fields: str) -> str:
        """The user prompt: ``--prompt`` (or the format's default) with ``{question}`` etc. filled."""
        template = self.prompt if self.prompt is not None else default
        try:
            return template.format(**fields)
        except (KeyError, IndexError) as e:
            raise ConvertError(f"--prompt {template!r} uses a placeholder this format does not provide "
                             f"({e}); available: {', '.join('{' + k + '}' for k in fields)}") from e


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(text)).strip("._") or "x"


# ---------------------------------------------------------------------------------------------------
# readers: rows out of files
# ---------------------------------------------------------------------------------------------------


def _json_list(path: Path, keys: tuple[str, ...] = ("data", "images", "annotations", "questions")) -> list:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), list):
                return obj[k]
        raise ValueError(f"{path}: a JSON object without a list under any of {keys}; is --from right?")
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(obj).__name__}")
    return obj


def _table_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json", ".arrow"))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet / .jsonl / .json / .arrow files in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input {str(path)!r} not found")
    return [path]


def read_table(path: Path) -> Iterator[Any]:
    """Rows of a JSONL, JSON list, parquet file, folder of those, or ``save_to_disk`` dataset folder.
    A JSONL line that is not JSON comes out as a :class:`Skip` so the driver reports it."""
    if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        import datasets

        yield from datasets.load_from_disk(str(path))
        return
    for file in _table_files(path):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
                yield from batch.to_pylist()
        elif file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield Skip("invalid JSON", f"{file.name} line {lineno}: {e.msg}")
        elif file.suffix == ".arrow":
            import datasets

            yield from datasets.Dataset.from_file(str(file))
        else:
            yield from _json_list(file)


def read_tsv(path: Path) -> Iterator[dict]:
    """Rows of a TSV (MMBench / VLMEvalKit layout; base64 image cells are large)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t")


# ---------------------------------------------------------------------------------------------------
# conversations (llava, sharegpt)
# ---------------------------------------------------------------------------------------------------

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "bot": "assistant", "system": "system"}


def conversation(turns: Any, n_images: int) -> list[dict]:
    """Normalise ``[{"from"|"role", "value"|"content"}]`` to role/content messages.

    ``<image>`` tags lose the newline LLaVA puts beside them; a conversation with images but no tag
    gets them prepended to its first user turn; the tag count must then equal the image count.
    Turns must alternate user/assistant (after an optional system turn) and end with the assistant.
    """
    if not isinstance(turns, list) or not turns:
        raise Skip("no conversation", f"expected a non-empty list of turns, got {type(turns).__name__}")
    messages: list[dict] = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise Skip("malformed turn", f"turn {k} is a {type(t).__name__}, not an object")
        who = t.get("role", t.get("from"))
        role = _ROLES.get(str(who).lower())
        text = t.get("content", t.get("value"))
        if role is None:
            raise Skip("unknown role", f"turn {k} has role/from {who!r}; expected one of {sorted(_ROLES)}")
        if not isinstance(text, str):
            raise Skip("malformed turn", f"turn {k} has no string 'value'/'content'")
        text = text.replace(IMAGE_TAG + "\n", IMAGE_TAG).replace("\n" + IMAGE_TAG, IMAGE_TAG).strip()
        messages.append({"role": role, "content": text})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for k, m in enumerate(body):
        if m["role"] != ("user" if k % 2 == 0 else "assistant"):
            raise Skip("roles do not alternate", f"turn {k} is {m['role']!r}; expected user/assistant turns")
    if not body or body[-1]["role"] != "assistant":
        raise Skip("no assistant answer", "the conversation must end with an assistant turn")
    if any(not m["content"] for m in body if m["role"] == "assistant"):
        raise Skip("empty answer", "an assistant turn is empty")
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if n_tags == 0 and n_images:
        body[0]["content"] = IMAGE_TAG * n_images + body[0]["content"]
    elif n_tags != n_images:
        raise Skip("image tag count", f"{n_tags} '<image>' tags but {n_images} images")
    return messages


# ---------------------------------------------------------------------------------------------------
# one function per format: row -> records
# ---------------------------------------------------------------------------------------------------

Records = list[dict | Skip]


def _karpathy_image(row: dict, ctx: Context) -> tuple[str, str]:
    if ctx.split is not None and row.get("split") != ctx.split:
        raise Skip("other split", f"split {row.get('split')!r} is not --split {ctx.split!r}")
    name = row["filename"]
    if row.get("filepath"):  # COCO's Karpathy file: "val2014" + "COCO_val2014_....jpg"
        name = f"{row['filepath']}/{name}"
    return Path(row["filename"]).stem, ctx.image_path(name)


def _sentences(row: dict) -> list[str]:
    return [(s.get("raw", "") if isinstance(s, dict) else str(s)).strip() for s in row["sentences"]]


def flickr30k(row: dict, ctx: Context) -> Records:
    """Karpathy-split JSON image entry -> one training record per caption (the caption is also the
    DM's ``align_text``)."""
    stem, image = _karpathy_image(row, ctx)
    prompt = IMAGE_TAG + ctx.fill(CAPTION_PROMPT)
    out: Records = []
    for k, caption in enumerate(_sentences(row)):
        if not caption:
            out.append(Skip("empty caption", f"image {stem!r} caption {k}"))
            continue
        out.append({"id": f"flickr30k-{stem}-{k}", "images": [image],
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}],
                    "align_text": caption})
    return out


def captions(row: dict, ctx: Context) -> Records:
    """Karpathy-split JSON image entry -> one evaluation record per image, all captions as references
    (CIDEr-D / BLEU-4). Works for Flickr30k and COCO Karpathy files."""
    stem, image = _karpathy_image(row, ctx)
    refs = [c for c in _sentences(row) if c]
    if not refs:
        raise Skip("no captions", f"image {stem!r} has no non-empty caption")
    return [{"id": f"caption-{stem}", "images": [image],
             "messages": [{"role": "user", "content": IMAGE_TAG + ctx.fill(CAPTION_PROMPT)}],
             "answers": refs, "metric": "cider"}]


def _text(value: Any, what: str) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"empty {what}", f"expected a non-empty string, got {value!r:.60}")
    return value.strip()


def rlaif_v(row: dict, ctx: Context) -> Records:
    """RLAIF-V preference row -> one record training on the CHOSEN response (the rejected one is
    dropped: Lavender is supervised fine-tuning). Reads openbmb's columns (question, chosen,
    rejected, image) and LLaMA-Factory's ranking layout (conversations, chosen, rejected, images)."""
    if "conversations" in row:
        images = row.get("images") or []
        turns = list(row["conversations"]) + [{"from": "gpt", "value": _text(row.get("chosen"), "chosen")}]
        stem = f"rlaif-v-{ctx.row_index}"
        paths = [ctx.image(im, f"{stem}-{k}") for k, im in enumerate(images)]
        if not paths:
            raise Skip("no image", "row has no images")
        return [{"id": stem, "images": paths, "messages": conversation(turns, len(paths))}]
    question = _text(row.get("question"), "question")
    chosen = _text(row.get("chosen"), "chosen")
    stem = f"rlaif-v-{row['idx']}" if row.get("idx") is not None else f"rlaif-v-{ctx.row_index}"
    image = ctx.image(row.get("image", row.get("image_path")), stem)
    if IMAGE_TAG not in question:
        question = IMAGE_TAG + question
    return [{"id": stem, "images": [image],
             "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}]}]


def ocrvqa(row: dict, ctx: Context) -> Records:
    """the_cauldron-style row ``{"images": [...], "texts": [{"user", "assistant"}, ...]}`` -> one
    multi-turn record (all images tagged in the first user turn)."""
    stem = f"ocrvqa-{ctx.row_index}"
    images = row.get("images") or []
    if not images:
        raise Skip("no image", "row has an empty 'images' list")
    texts = row.get("texts")
    if not isinstance(texts, list) or not texts:
        raise Skip("no conversation", "row has no 'texts' list of {user, assistant} turns")
    turns = []
    for t in texts:
        turns += [{"role": "user", "content": t.get("user")}, {"role": "assistant", "content": t.get("assistant")}]
    paths = [ctx.image(im, f"{stem}-{k}") for k, im in enumerate(images)]
    return [{"id": stem, "images": paths, "messages": conversation(turns, len(paths))}]


def llava(row: dict, ctx: Context) -> Records:
    """LLaVA-Instruct row ``{"id", "image", "conversations": [{"from", "value"}]}``: human -> user,
    gpt -> assistant. Text-only rows are skipped (Lavender aligns attention to an image)."""
    if not row.get("image"):
        raise Skip("text-only row", "no 'image' field")
    images = row["image"] if isinstance(row["image"], list) else [row["image"]]
    paths = [ctx.image_path(p) for p in images]
    rid = str(row.get("id", f"llava-{ctx.row_index}"))
    return [{"id": rid, "images": paths, "messages": conversation(row.get("conversations"), len(paths))}]


def sharegpt(row: dict, ctx: Context) -> Records:
    """LLaMA-Factory's multimodal sharegpt row ``{"messages": [{"role", "content"}], "images": [...],
    "system"?}`` (or ``conversations`` with ``from``/``value``)."""
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    rid = str(row.get("id", f"sharegpt-{ctx.row_index}"))
    if not images:
        raise Skip("text-only row", "no 'images'")
    paths = [ctx.image(im, f"{rid}-{k}") for k, im in enumerate(images)]
    turns = row.get("messages", row.get("conversations"))
    if row.get("system") and isinstance(turns, list):
        turns = [{"role": "system", "content": row["system"]}] + list(turns)
    return [{"id": rid, "images": paths, "messages": conversation(turns, len(paths))}]


# --- benchmarks --------------------------------------------------------------------------------------


def _eval_record(rid: str, image: str, prompt: str, answers: list[str], metric: str, **extra: Any) -> dict:
    rec = {"id": rid, "images": [image], "messages": [{"role": "user", "content": IMAGE_TAG + prompt}],
           "answers": answers, "metric": metric}
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def vqav2(row: dict, ctx: Context) -> Records:
    """A VQA question joined with its annotation (see :func:`read_vqa`) -> an eval record keeping all
    (usually 10) human answers for soft accuracy; ``type`` is the answer type (yes/no, number, other).
    Also reads TextVQA (``data`` rows with ``image_id`` and answer strings) and VizWiz rows."""
    answers = [a["answer"] if isinstance(a, dict) else a for a in row.get("answers") or []]
    answers = [str(a) for a in answers if str(a).strip()]
    if not answers:
        raise Skip("no answers", "question has no human answers (a test split?)")
    qid = row.get("question_id")
    if row.get("image"):
        name = row["image"]
    elif row.get("data_subtype"):
        name = f"COCO_{row['data_subtype']}_{int(row['image_id']):012d}.jpg"
    else:
        name = f"{row['image_id']}.jpg"
    rid = f"vqa-{qid}" if qid is not None else f"vqa-{Path(name).stem}"
    return [_eval_record(rid, ctx.image_path(name), ctx.fill(VQA_PROMPT, question=_text(row["question"], "question")),
                         answers, "vqa", type=row.get("answer_type"), question_id=qid)]


def docvqa(row: dict, ctx: Context) -> Records:
    """DocVQA / InfoVQA ``data`` row (question, image or image_local_name, answers) -> ANLS record."""
    answers = [str(a) for a in row.get("answers") or [] if str(a).strip()]
    if not answers:
        raise Skip("no answers", "question has no answers (a test split?)")
    name = row.get("image") or row.get("image_local_name")
    qid = row.get("questionId", row.get("question_id", ctx.row_index))
    types = row.get("question_types") or []
    return [_eval_record(f"docvqa-{qid}", ctx.image_path(name),
                         ctx.fill(VQA_PROMPT, question=_text(row["question"], "question")), answers, "anls",
                         type="/".join(types) if types else None)]


def chartqa(row: dict, ctx: Context) -> Records:
    """ChartQA row ``{"imgname", "query", "label"}`` -> relaxed-accuracy record."""
    name = row["imgname"]
    return [_eval_record(f"chartqa-{ctx.row_index}", ctx.image_path(name),
                         ctx.fill(VQA_PROMPT, question=_text(row["query"], "query")),
                         [_text(row["label"], "label")], "relaxed")]


def _cell(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    value = str(value).strip()
    return None if value in ("", "nan", "NaN", "None") else value


def mmbench(row: dict, ctx: Context) -> Records:
    """MMBench-style TSV row (index, question, hint, A..H, answer, category, base64 image) -> a
    multiple-choice record with ``choices`` and the answer letter. An image cell holding another
    row's index (VLMEvalKit's de-duplication) reuses that row's image."""
    index = _cell(row, "index") or str(ctx.row_index)
    choices = {k: v for k in "ABCDEFGH" if (v := _cell(row, k)) is not None}
    if len(choices) < 2:
        raise Skip("too few options", f"index {index}: options {sorted(choices)}")
    answer = (_cell(row, "answer") or "").upper()
    if answer not in choices:
        raise Skip("no answer", f"index {index}: answer {row.get('answer')!r} is not an option letter")
    cell = _cell(row, "image")
    if cell is None and _cell(row, "image_path"):
        image = ctx.image_path(_cell(row, "image_path") or "")
    elif cell is None:
        raise Skip("bad image field", f"index {index}: no image")
    elif len(cell) < 64 and cell in ctx.saved:
        image = ctx.saved[cell]
    else:
        try:
            data = base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Skip("bad image field", f"index {index}: image cell is not base64 ({e})") from e
        image = ctx.saved[index] = ctx.save_image(data, f"mmbench-{index}")
    question = _text(row.get("question"), "question")
    hint = _cell(row, "hint")
    if hint:
        question = f"Hint: {hint}\nQuestion: {question}"
    options = "\n".join(f"{k}. {v}" for k, v in choices.items())
    return [_eval_record(f"mmbench-{index}", image, ctx.fill(MC_PROMPT, question=question, options=options),
                         [answer], "mc", choices=choices, type=_cell(row, "category"))]


def pope(row: dict, ctx: Context) -> Records:
    """POPE-like yes/no row (question or text, answer or label, image path or bytes, category) ->
    a yes/no record."""
    label = str(row.get("answer", row.get("label", ""))).strip().lower()
    if label not in ("yes", "no"):
        raise Skip("label not yes/no", f"answer/label {label!r}")
    qid = row.get("question_id", row.get("id", ctx.row_index))
    rid = f"yesno-{qid}"
    image = ctx.image(row.get("image", row.get("image_source")), rid)
    question = _text(row.get("question", row.get("text")), "question")
    return [_eval_record(rid, image, ctx.fill(VQA_PROMPT, question=question), [label], "yesno",
                         type=row.get("category"))]


# --- the authors' released attention subsets -----------------------------------------------------------

_MAP_COLUMNS = ("attention_images", "saliency_maps", "attention_maps", "attention")


def _word_maps(value: Any) -> list[tuple[str, Any]]:
    """Per-word maps as (word, image cell) pairs, from a dict, parquet's list of (key, value) pairs, or
    a list of ``{"word", "image"|"map"}`` objects."""
    if isinstance(value, dict):
        return list(value.items())
    pairs = []
    for item in value or []:
        if isinstance(item, dict):
            pairs.append((item.get("word", item.get("key")), item.get("image", item.get("map", item.get("value")))))
        else:
            word, cell = item
            pairs.append((word, cell))
    return pairs


def _grey_map(cell: Any, ctx: Context) -> Any:
    """A per-word map cell (image path, bytes, HF Image dict or PIL image) as an 8-bit grey PIL image."""
    from PIL import Image

    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        im = Image.open(io.BytesIO(bytes(cell)))
    elif isinstance(cell, str):
        root = ctx.images_root or ctx.current_input.parent
        path = Path(cell) if os.path.isabs(cell) else root / cell
        if not path.is_file():
            raise Skip("missing map", f"{cell!r} not found under {str(root)!r}; pass --images-root")
        im = Image.open(path)
    elif hasattr(cell, "convert"):
        im = cell
    else:
        raise Skip("bad map field", f"cannot read a map from a {type(cell).__name__}")
    return im.convert("L")


def authors_attention(row: dict, ctx: Context) -> Records:
    """The authors' released subsets (image, question, answers, per-word maps) -> a record, with its
    image copied under ``--image-dir`` and its maps written beside it in the authors' layout
    (``lpm_attention/<stem>/attention_<word>.jpg``), which :func:`finish_authors_attention` then
    imports into an attention dataset. The first answer is the assistant turn; all are kept."""
    from lavender.attnstore import authors_folder, escape_word

    rid = str(row.get("id", f"authors-{ctx.row_index}"))
    question = _text(row.get("question"), "question")
    answers = row.get("answers")
    answers = [answers] if isinstance(answers, str) else [str(a) for a in answers or [] if str(a).strip()]
    if not answers:
        raise Skip("no answers", f"row {rid!r} has no answer to train on")
    column = next((c for c in _MAP_COLUMNS if row.get(c)), None)
    if column is None:
        raise Skip("no maps", f"none of the columns {_MAP_COLUMNS} holds per-word maps")
    maps = [(str(w), _grey_map(cell, ctx)) for w, cell in _word_maps(row[column]) if w]
    cell = row.get("image")
    if isinstance(cell, str):  # copy, so the maps can sit beside it without touching the source folder
        root = ctx.images_root or ctx.current_input.parent
        src = Path(cell) if os.path.isabs(cell) else root / cell
        if not src.is_file():
            raise Skip("missing image", f"{cell!r} not found under {str(root)!r}; pass --images-root")
        cell = src.read_bytes()
    image = ctx.image(cell, rid)
    folder = authors_folder(ctx.out.parent / image)
    folder.mkdir(parents=True, exist_ok=True)
    for word, im in maps:
        im.save(folder / f"attention_{escape_word(word)}.jpg", quality=95)
    if IMAGE_TAG not in question:
        question = IMAGE_TAG + question
    return [{"id": rid, "images": [image], "answers": answers,
             "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}]}]


def finish_authors_attention(out: Path, attention_out: Path) -> dict:
    """Import the maps written beside the converted images into the attention dataset
    ``attention_out`` (through :func:`lavender.attnstore.import_authors_layout`)."""
    from lavender.attnstore import import_authors_layout
    from lavender.records import read_records

    return import_authors_layout(read_records(out), attention_out,
                                 manifest={"dm": "CompVis/stable-diffusion-v1-4 (authors' release)",
                                           "recipe": "authors-release"})


# ---------------------------------------------------------------------------------------------------
# readers per format and the registry
# ---------------------------------------------------------------------------------------------------


def read_rows(inputs: Iterable[Path], ctx: Context) -> Iterator[Any]:
    for path in inputs:
        ctx.current_input = path
        yield from read_table(path)


def read_vqa(inputs: Iterable[Path], ctx: Context) -> Iterator[Any]:
    """VQAv2 questions + annotations files (any order, told apart by their top-level key), joined
    on question_id; or files of self-contained rows (TextVQA ``data``, VizWiz lists)."""
    questions: list[tuple[Path, dict, str | None]] = []
    annotations: dict[Any, dict] = {}
    for path in inputs:
        ctx.current_input = path
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if isinstance(obj, dict) and "questions" in obj:
            questions += [(path, q, obj.get("data_subtype")) for q in obj["questions"]]
        elif isinstance(obj, dict) and "annotations" in obj:
            annotations.update({a["question_id"]: a for a in obj["annotations"]})
        else:
            yield from (obj["data"] if isinstance(obj, dict) else obj)
    if questions and not annotations:
        raise UsageError("VQAv2 questions given without an annotations file; pass both with --in Q.json A.json")
    for path, q, subtype in questions:
        ctx.current_input = path
        ann = annotations.get(q.get("question_id"))
        if ann is None:
            yield Skip("no annotation", f"question_id {q.get('question_id')!r} is not in the annotations file")
            continue
        yield {**q, "answers": ann.get("answers"), "answer_type": ann.get("answer_type"), "data_subtype": subtype}


def read_karpathy(inputs: Iterable[Path], ctx: Context) -> Iterator[Any]:
    for path in inputs:
        ctx.current_input = path
        yield from _json_list(path, ("images",))


def read_tsvs(inputs: Iterable[Path], ctx: Context) -> Iterator[Any]:
    for path in inputs:
        ctx.current_input = path
        yield from read_tsv(path)


@dataclass(frozen=True)
class Format:
    """A registered converter: how its files are read, what one row becomes, whether it has a
    user prompt (``--prompt`` then overrides it; placeholders in braces)."""

    read: Callable[[Iterable[Path], Context], Iterator[Any]]
    row: Callable[[dict, Context], Records]
    default_prompt: str | None = None
    finish: Callable[[Path, Path], dict] | None = None  # post-step that needs --attention-out


CONVERTERS: dict[str, Format] = {
    "flickr30k": Format(read_karpathy, flickr30k, CAPTION_PROMPT),
    "captions": Format(read_karpathy, captions, CAPTION_PROMPT),
    "rlaif-v": Format(read_rows, rlaif_v),
    "ocrvqa": Format(read_rows, ocrvqa),
    "llava": Format(read_rows, llava),
    "sharegpt": Format(read_rows, sharegpt),
    "vqav2": Format(read_vqa, vqav2, VQA_PROMPT),
    "docvqa": Format(read_rows, docvqa, VQA_PROMPT),
    "chartqa": Format(read_rows, chartqa, VQA_PROMPT),
    "mmbench": Format(read_tsvs, mmbench, MC_PROMPT),
    "pope": Format(read_rows, pope, VQA_PROMPT),
    "authors-attention": Format(read_rows, authors_attention, finish=finish_authors_attention),
}

# a row with a missing key or a value of the wrong type is malformed input, reported and skipped
_MALFORMED = (KeyError, TypeError, AttributeError, IndexError, ValueError)


def convert(fmt: str, inputs: str | Path | list[str | Path], out: str | Path, *,
            images_root: str | Path | None = None, image_dir: str | Path | None = None,
            prompt: str | None = None, split: str | None = None, strict: bool = False,
            attention_out: str | Path | None = None) -> ConvertReport:
    """Convert ``inputs`` of format ``fmt`` into the records file ``out`` (written atomically).

    Args:
        fmt: a key of :data:`CONVERTERS`.
        inputs: one or more files (or folders of parquet/JSONL shards); ``vqav2`` takes the
            questions and the annotations file.
        out: the output ``.jsonl``.
        images_root: folder that image names in the source are relative to (default: each input
            file's folder).
        image_dir: where embedded images are written (default: ``<out stem>_images`` beside ``out``).
        prompt: the user prompt for formats that make one (captioning, benchmarks), with
            ``{question}`` / ``{options}`` placeholders.
        split: for Karpathy files, keep only this split (``train``, ``val``, ``test``, ``restval``).
        strict: raise at the first bad row instead of skipping it.
        attention_out: ``authors-attention`` only (and required there): the attention dataset built
            from the rows' per-word maps.
    """
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(CONVERTERS)}")
    spec = CONVERTERS[fmt]
    if prompt is not None and spec.default_prompt is None:
        raise UsageError(f"--prompt does not apply to {fmt!r}: its rows carry their own questions")
    if split is not None and spec.read is not read_karpathy:
        raise UsageError(f"--split applies to Karpathy-split files (flickr30k, captions), not {fmt!r}")
    if (attention_out is None) != (spec.finish is None):
        raise UsageError("--attention-out is required by, and only by, --from authors-attention")
    paths = [Path(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    out = Path(out)
    ctx = Context(out=out, images_root=Path(images_root) if images_root is not None else None,
                  image_dir=Path(image_dir) if image_dir is not None else out.parent / f"{out.stem}_images",
                  prompt=prompt, split=split)
    report = ConvertReport(format=fmt, out=str(out))
    seen: Counter = Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for n, row in enumerate(spec.read(paths, ctx)):
            report.read += 1
            ctx.row_index = n
            try:
                if isinstance(row, Skip):
                    raise row
                if not isinstance(row, dict):
                    raise Skip("malformed row", f"expected an object, got {type(row).__name__}")
                results = spec.row(row, ctx)
            except Skip as e:
                if strict:
                    raise ValueError(f"{fmt} row {n}: {e} (drop --strict to skip such rows)") from e
                report.skip(n, e)
                continue
            except _MALFORMED as e:
                if isinstance(e, ConvertError):
                    raise
                if strict:
                    raise ValueError(f"{fmt} row {n}: malformed ({type(e).__name__}: {e})") from e
                report.skip(n, Skip("malformed row", f"{type(e).__name__}: {e}"))
                continue
            for rec in results:
                if isinstance(rec, Skip):
                    report.skip(n, rec)
                    continue
                seen[rec["id"]] += 1
                if seen[rec["id"]] > 1:
                    rec["id"] = f"{rec['id']}#{seen[rec['id']]}"
                    report.renamed += 1
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                report.written += 1
    os.replace(tmp, out)
    report.images_written = ctx.images_written
    if spec.finish is not None and attention_out is not None and report.written:
        report.attention = spec.finish(out, Path(attention_out))
    return report
