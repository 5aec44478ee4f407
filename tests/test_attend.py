"""``lavender attend`` end to end on each family's tiny model (in-process)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lavender.cli import main
from lavender.vlm.families import families

ARCHS = sorted(families())  # every registered family, with no list to keep in sync


@pytest.mark.parametrize("arch", ARCHS)
def test_attend_writes_word_maps(arch: str, tiny_vlm, tmp_path) -> None:
    image = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 70, 3)) * 255).astype("uint8")).save(image)
    out, png = tmp_path / "maps.npz", tmp_path / "maps.png"
    argv = ["attend", "--model", tiny_vlm(arch), "--image", str(image), "--text", "a red circle, a red star",
            "--out", str(out)]
    if arch == "llava":
        argv += ["--png", str(png), "--aggregation", "flow-mult"]
    assert main(argv) == 0
    data = np.load(out)
    assert data["words"].tolist() == ["a", "red", "circle", "a", "red", "star"]
    assert data["maps"].shape == (6, 32, 32) and np.isfinite(data["maps"]).all()
    assert data["maps"].max() == pytest.approx(1.0, abs=1e-3)  # min–max normalised
    text = str(data["chat_text"])
    assert [text[s:e] for s, e in zip(data["starts"], data["ends"])] == data["words"].tolist()
    if arch == "llava":
        assert png.stat().st_size > 1000
