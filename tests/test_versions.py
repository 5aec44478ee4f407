"""The software versions recorded beside results, and the pinned environment they are checked against."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers

from lavender import versions
from lavender.versions import PACKAGES, software_versions

ROOT = Path(__file__).resolve().parents[1]


def test_software_versions_are_the_imported_libraries() -> None:
    v = software_versions()
    assert v["torch"] == torch.__version__
    assert v["transformers"] == transformers.__version__
    assert set(v) == set(PACKAGES)


def test_a_missing_distribution_is_none_not_an_error(monkeypatch) -> None:
    monkeypatch.setattr(versions, "PACKAGES", ("torch", "no-such-distribution-xyz"))
    v = versions.software_versions()
    assert v["no-such-distribution-xyz"] is None and v["torch"] == torch.__version__


def test_constraints_pin_every_library_that_changes_numbers() -> None:
    """`make install` installs with ``-c constraints.txt``: each library recorded beside a result is pinned
    to one version there, so a clean clone reproduces README's numbers."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    missing = [p for p in PACKAGES if p != "lavender-vlm" and p not in pins]
    assert not missing, f"constraints.txt does not pin {missing}"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
