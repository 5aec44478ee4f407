"""`lavender demo --quick` end to end on the committed world checkpoints (slow: the whole method)."""

from __future__ import annotations

import json
import re

import pytest

from lavender.cli import main as cli


@pytest.mark.slow
def test_demo_quick_writes_report_with_filled_table_and_figures(tmp_path) -> None:
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--quick"]) == 0
    results = json.loads((out / "results.json").read_text())
    for split in ("test", "ood"):
        for key in ("majority", "base", "ar", "lavender", "oracle"):
            assert 0.0 <= results[split][key] <= 1.0, (split, key)
    report = (out / "report.md").read_text()
    accuracy_table = report.split("## Attention")[0]
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|$", accuracy_table, flags=re.M)
    assert len(rows) == 5, report
    for _, test_acc, ood_acc in rows:
        assert 0.0 <= float(test_acc) <= 100.0 and 0.0 <= float(ood_acc) <= 100.0
    for fig in ("word_maps.png", "entropy.png", "curves.png"):
        path = out / "figures" / fig
        assert path.exists() and path.stat().st_size > 5000, fig
        assert f"figures/{fig}" in report
    assert results["localisation"]["dm"]["words"] > 0
    assert 0.0 <= results["entropy"]["dm"] <= 1.0
