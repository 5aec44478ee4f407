"""`lavender demo --quick` end to end on the committed world checkpoints (slow: the whole method).

Checks the ``results.json`` contract of world v2 (four arms over paired seeds, paired differences
with intervals, decoy-follow rates), that per-seed numbers are per-seed (not one run copied), and
that ``report.html`` is self-contained: it parses and every figure is embedded as a data URI.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
import torch

from lavender.cli import main as cli

ARMS = ("ar", "lavender", "oracle", "shuffled")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self.tables += tag == "table"


@pytest.mark.slow
def test_demo_quick_results_contract_and_self_contained_report(tmp_path) -> None:
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--quick"]) == 0
    r = json.loads((out / "results.json").read_text())
    n = len(r["seeds"])
    assert r["seeds"] == [0, 1, 2]
    assert r["software"]["torch"] == torch.__version__  # the environment the numbers came from
    for split in ("iid", "shift"):
        assert 0.0 <= r[split]["majority"] <= 1.0
        for arm in ARMS:
            per_seed = r[split][arm]["per_seed"]
            assert len(per_seed) == n and all(0.0 <= a <= 1.0 for a in per_seed), (split, arm)
            assert r[split][arm]["mean"] == pytest.approx(sum(per_seed) / n)
        for arm in ARMS[1:]:
            d = r["paired"][split][arm]
            lo, hi = d["ci95"]
            diffs = [a - b for a, b in zip(r[split][arm]["per_seed"], r[split]["ar"]["per_seed"])]
            assert d["mean"] == pytest.approx(sum(diffs) / n)
            assert lo <= d["mean"] <= hi
    for arm in ARMS:
        rate = r["decoy_follow"]["shift"][arm]
        assert rate is None or 0.0 <= rate <= 1.0
    # seeds differ: the paired design is not one run repeated (weights and data order follow the seed)
    per_seed = [tuple(r[s][a]["per_seed"][k] for s in ("iid", "shift") for a in ARMS) for k in range(n)]
    assert len(set(per_seed)) > 1, per_seed
    # the premise (teacher vs pre-trained student) is measured on held-out records
    assert r["premise_shift_val"]["words"] > 0
    assert r["premise_shift_val"]["dm_referent_mass_ratio"] > 0

    report = (out / "report.md").read_text()
    assert "Paired difference vs AR" in report and "shuffled" in report
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.tables >= 3
    assert len(page.images) == 4  # paired differences, word maps, entropy, curves
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
