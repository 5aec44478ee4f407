"""Six captioned records with random DM maps for their answer words: the data of the training tests
(`test_train.py`, `test_fsdp2.py`), written in one place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a red circle and a blue square", "a green triangle", "the yellow ring is left of a red cross",
            "two blue circles", "a purple square above a green circle", "one orange triangle"]


def write_train_world(root: Path, broken: bool = False) -> dict:
    """``root/train.jsonl`` + ``root/attn``; ``broken`` appends a record whose image is missing."""
    from lavender.attnstore import AttentionWriter
    from lavender.words import split_words

    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    writer = AttentionWriter(root / "attn", {"map_size": 32, "frame": "squash"})
    rows = []
    for i, cap in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (48 + 4 * i, 64, 3), dtype=np.uint8)).save(root / f"img/{i}.png")
        rows.append({"id": f"r{i}", "images": [f"img/{i}.png"],
                     "messages": [{"role": "user", "content": "<image>Describe the image."},
                                  {"role": "assistant", "content": cap}]})
        ws = split_words(cap)
        writer.add(f"r{i}", [w.text for w in ws], [(w.start, w.end) for w in ws],
                   rng.random((len(ws), 32, 32)).astype("float32"))
    writer.close()
    if broken:
        rows.append({"id": "missing", "images": ["img/nope.png"],
                     "messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data": str(root / "train.jsonl"), "attention": str(root / "attn")}
