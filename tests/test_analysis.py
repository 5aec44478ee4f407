"""Entropy, mass ratio, IoU and `lavender analyze`, against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lavender.analysis import iou, mass_ratio, normalized_entropy


def test_entropy_of_uniform_one_hot_and_two_pixels() -> None:
    maps = np.zeros((3, 32, 32))
    maps[0] = 1.0
    maps[1, 3, 4] = 5.0
    maps[2, 0, 0] = maps[2, 31, 31] = 2.0
    h = normalized_entropy(maps)
    assert h[0] == pytest.approx(1.0)
    assert h[1] == pytest.approx(0.0, abs=1e-9)
    assert h[2] == pytest.approx(math.log(2) / math.log(1024))


def test_mass_ratio_and_iou_against_hand_values() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[:16, :32] = True  # 1/8 of the image
    attn = np.zeros((32, 32))
    attn[:8, :16] = 1.0  # all mass inside the mask, exactly on it
    assert mass_ratio(attn, mask) == pytest.approx(8.0)
    assert mass_ratio(np.ones((32, 32)), mask) == pytest.approx(1.0)
    assert iou(attn, mask) == pytest.approx(1.0)
    half = np.zeros((32, 32))
    half[:8, :8] = 1.0  # half of the mask's cells
    assert iou(half, mask) == pytest.approx(0.5)
    assert mass_ratio(half, mask) == pytest.approx(8.0)


def test_analyze_command_on_a_tiny_model(tiny_vlm, tmp_path) -> None:
    from PIL import Image

    from lavender.attnstore import AttentionWriter
    from lavender.cli import main as cli
    from lavender.words import split_words

    rng = np.random.default_rng(0)
    w = AttentionWriter(tmp_path / "attn", {"map_size": 32, "frame": "squash"})
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        ans = "a red circle"
        rows.append({"id": f"a{i}", "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": ans}]})
        ws = split_words(ans)
        maps = np.zeros((len(ws), 32, 32), dtype=np.float32)
        maps[:, i, i] = 1.0  # one-hot DM maps: entropy 0
        w.add(f"a{i}", [x.text for x in ws], [(x.start, x.end) for x in ws], maps)
    w.close()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["analyze", "--attention", str(tmp_path / "attn"), "--data", str(tmp_path / "d.jsonl"),
                "--model", tiny_vlm("llava"), "--out", str(tmp_path / "an")]) == 0
    res = json.loads((tmp_path / "an/analysis.json").read_text())
    assert res["alignment"]["words"] == 9
    assert res["words"] == {"words": 9, "matched": 9, "dropped": 0, "skipped_records": 0, "match_rate": 1.0}
    assert res["alignment"]["entropy_dm"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0.5 < res["alignment"]["entropy_vlm"]["mean"] <= 1.0  # a random VLM attends diffusely
    assert (tmp_path / "an/word_maps.png").exists() and (tmp_path / "an/entropy.png").exists()


def test_html_report_embeds_its_images_and_tables(tmp_path) -> None:
    from html.parser import HTMLParser

    from lavender.analysis import html_report, plot_paired_differences

    paired = {"shift": {"oracle": {"mean": 0.12, "ci95": [0.05, 0.19], "per_seed": [0.1, 0.15, 0.11]},
                        "shuffled": {"mean": -0.01, "ci95": [-0.04, 0.02], "per_seed": [0.0, -0.02, -0.01]}}}
    plot_paired_differences(str(tmp_path / "paired.png"), paired)
    md = "# Title\n\n| arm | shift |\n| --- | ---: |\n| **oracle** | 61.0 |\n\n![paired](paired.png)\n"
    html_report(str(tmp_path / "report.html"), md)
    page = (tmp_path / "report.html").read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.srcs = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.srcs += [v for k, v in attrs if k == "src"]

    p = Collect()
    p.feed(page)
    assert {"h1", "table", "th", "td", "img", "b"} <= set(p.tags)
    assert p.srcs and all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in p.srcs)
