"""Write the world to disk as the project's records: PNG images, JSONL rows, per-example mask files.

Layout under ``out_dir`` (paths in the JSONL are relative to its folder, as the records contract says)::

    <split>.jsonl            VQA rows   {"id", "images", "messages", "align_text", "type", "answers",
                                         "masks", "objects", "template"}
    <split>_captions.jsonl   caption rows {"id", "image", "caption", "masks", "objects"}
    images/<id>.png          64×64 RGB
    masks/<id>.npz           words, offsets (n_words, 2), masks (n_words, 64, 64) bool,
                             object_masks (n_objects, 64, 64) bool — see :func:`load_word_masks`

Record ``i`` of a split is drawn from its own generator seeded by ``(seed, split, stream, i)``, so
the first k records are the same whatever ``n`` is, and splits never share a random stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.world.questions import KINDS, Question, make_question
from lavender.world.scenes import SPLITS, Scene, WordMasks, make_scene

_STREAMS = {"vqa": 0, "captions": 1}
_MAX_REDRAWS = 1000  # scenes drawn for one question before giving up (never reached in practice)


def record_rng(seed: int, split: str, stream: str, index: int) -> np.random.Generator:
    """The generator of one record: independent of ``n`` and of every other split and stream."""
    split_code = list(SPLITS).index(split)
    return np.random.default_rng([int(seed), split_code, _STREAMS[stream], int(index)])


def vqa_example(seed: int, split: str, index: int) -> tuple[Scene, Question]:
    """Scene and question of VQA record ``index``; kinds cycle so each split is balanced by kind."""
    _check_split(split)
    held_out, unseen = SPLITS[split]
    kind = KINDS[index % len(KINDS)]
    rng = record_rng(seed, split, "vqa", index)
    for _ in range(_MAX_REDRAWS):
        scene = make_scene(rng, split)
        q = make_question(rng, kind, scene.objects, held_out, unseen)
        if q is not None:
            return scene, q
    raise RuntimeError(f"no scene supported a {kind!r} question in {_MAX_REDRAWS} draws (split {split!r})")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")


def save_example(root: Path, ex_id: str, scene: Scene) -> tuple[str, str]:
    img_rel, mask_rel = f"images/{ex_id}.png", f"masks/{ex_id}.npz"
    Image.fromarray(scene.image, mode="RGB").save(root / img_rel, compress_level=1)
    wm = scene.word_masks
    np.savez_compressed(root / mask_rel, words=np.array(wm.words, dtype=str),
                        offsets=np.array(wm.offsets, dtype=np.int32).reshape(-1, 2),
                        masks=wm.masks, object_masks=scene.object_masks)
    return img_rel, mask_rel


def write_scene_jsonl(path: Path, rows) -> Path:
    """Write rows atomically: a crash never leaves a half-written records file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def scene_progress(it, n: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(it, total=n, desc=desc, disable=None, mininterval=1.0)  # None: silent off a TTY


def write_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0) -> Path:
    """Write ``n`` VQA records of ``split`` (one question per scene) and return the JSONL path."""
    _check_split(split)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)

    def rows():
        for i in scene_progress(range(n), n, f"world {split}"):
            scene, q = vqa_example(seed, split, i)
            ex_id = f"{split}_{i:06d}"
            img, masks = save_example(root, ex_id, scene)
            yield {"id": ex_id, "images": [img],
                   "messages": [{"role": "user", "content": "<image>" + q.text},
                                {"role": "assistant", "content": q.answer}],
                   "align_text": scene.caption, "type": q.kind, "answers": [q.answer],
                   "masks": masks, "objects": [o.to_dict() for o in scene.objects],
                   "template": q.template}

    return write_scene_jsonl(root / f"{split}.jsonl", rows())


def write_captions(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0) -> Path:
    """Write ``n`` caption rows ``{"id", "image", "caption", ...}`` (VLM/DM pre-training)."""
    _check_split(split)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)

    def rows():
        for i in scene_progress(range(n), n, f"world {split} captions"):
            scene = make_scene(record_rng(seed, split, "captions", i), split)
            ex_id = f"{split}_cap_{i:06d}"
            img, masks = save_example(root, ex_id, scene)
            yield {"id": ex_id, "image": img, "caption": scene.caption, "masks": masks,
                   "objects": [o.to_dict() for o in scene.objects]}

    return write_scene_jsonl(root / f"{split}_captions.jsonl", rows())


def _mask_path(record_or_path: Mapping | str | os.PathLike, root: str | os.PathLike | None) -> Path:
    if isinstance(record_or_path, Mapping):
        rel = record_or_path.get("masks")
        if not rel:
            raise KeyError(f"record {record_or_path.get('id')!r} has no 'masks' field; only records "
                           "written by `lavender world scenes` carry ground-truth masks")
    else:
        rel = record_or_path
    path = Path(rel)
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    if not path.exists():
        raise FileNotFoundError(f"mask file {str(path)!r} not found; pass root= the JSONL file's folder")
    return path


def load_word_masks(record_or_path: Mapping | str | os.PathLike,
                    root: str | os.PathLike | None = None) -> WordMasks:
    """The ground truth of one example: ``(words, offsets, masks)``.

    Args:
        record_or_path: a record written by this module (its ``"masks"`` field is used) or the
            path of a ``masks/*.npz`` file.
        root: folder that relative paths are relative to — the JSONL file's folder for a record.
            Without it, a relative path is taken from the current directory.
    """
    with np.load(_mask_path(record_or_path, root)) as z:
        words = [str(w) for w in z["words"]]
        offsets = [(int(s), int(e)) for s, e in z["offsets"]]
        return WordMasks(words, offsets, z["masks"].astype(bool))


def load_object_masks(record_or_path: Mapping | str | os.PathLike,
                      root: str | os.PathLike | None = None) -> np.ndarray:
    """(n_objects, 64, 64) bool masks in the record's ``objects`` order (for question-word masks)."""
    with np.load(_mask_path(record_or_path, root)) as z:
        return z["object_masks"].astype(bool)


def load_state(path: str | os.PathLike) -> dict:
    """A world training state file, read with ``weights_only=True``: tensors, numbers, strings and
    containers only. A file that needs more (a planted pickle that would run code) is refused."""
    import pickle

    import torch

    from lavender.config import LavenderError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise LavenderError(f"{path}: not a state file this run wrote (refusing to unpickle it: "
                            f"{str(e).splitlines()[0][:200]}); remove it or choose another --out") from None
