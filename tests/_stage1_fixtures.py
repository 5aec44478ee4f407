"""Shared helpers of the Stage 1 tests (imported, not a conftest): one tiny DM per test process."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# The tests' DM: 32 px images, so cross-attention maps have sides 16 and 8 (4× cheaper than the 64 px
# default of `lavender tiny-dm`, whose sides 32 and 16 match --resolutions' default).
TEST_IMAGE_SIZE = 32
TEST_RESOLUTIONS = ["--resolutions", "8", "16"]


@lru_cache(maxsize=2)
def tiny_dm_path(image_size: int = TEST_IMAGE_SIZE) -> str:
    """The tiny SD pipeline, built once per process in a temp folder (about 1 s)."""
    from lavender.diffusion.tiny import make_tiny_dm

    out = Path(tempfile.mkdtemp(prefix="lavender-tiny-dm-")) / "dm"
    return str(make_tiny_dm(out, seed=0, image_size=image_size))


def write_images_and_records(folder: Path, n: int, caption: str = "a red circle left of a blue square",
                             seed: int = 0) -> Path:
    """``n`` random RGB images of varied sizes plus a records.jsonl of captioning rows; returns its path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = 48 + 8 * (i % 3), 64 + 4 * (i % 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")
        rows.append({"id": f"img_{i:03d}", "image": f"img_{i:03d}.png", "caption": f"{caption} {i}"})
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
