"""Every document the code or the docs cite is in the repository, and every pitfall number exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("src", "tests", "benchmarks", "experiments", "docs")
OUTSIDE = re.compile(r"\b(PITFALLS|METHOD|HF_NOTES|DESIGN|STYLE)(\.md| #\d)")


def _texts() -> list[tuple[Path, str]]:
    files = [ROOT / "README.md"] + [p for t in TREES for p in (ROOT / t).rglob("*")
                                    if p.suffix in (".py", ".md", ".yaml") and p.is_file()]
    return [(p, p.read_text(errors="replace")) for p in files if p.name != "test_docs.py"]


def cited(text: str) -> tuple[set[str], set[int]]:
    docs = set(re.findall(r"docs/([\w./-]+?\.md)", text))
    pitfalls = {int(n) for n in re.findall(r"docs/pitfalls\.md #(\d+)", text)}
    pitfalls |= {int(n) for group in re.findall(r"docs/pitfalls\.md #\d+((?:, #\d+)+)", text)
                 for n in re.findall(r"#(\d+)", group)}
    return docs, pitfalls


def test_citations_resolve() -> None:
    headings = {int(n) for n in re.findall(r"^## (\d+)\. ", (ROOT / "docs/pitfalls.md").read_text(), re.M)}
    missing = []
    for path, text in _texts():
        docs, pitfalls = cited(text)
        missing += [f"{path.relative_to(ROOT)}: docs/{d}" for d in docs if not (ROOT / "docs" / d).exists()]
        missing += [f"{path.relative_to(ROOT)}: pitfall #{n}" for n in pitfalls - headings]
        missing += [f"{path.relative_to(ROOT)}: {m.group(0)} (outside the repository)" for m in OUTSIDE.finditer(text)]
    assert not missing, "\n".join(missing)


def test_the_checker_catches_a_bad_citation() -> None:
    docs, pitfalls = cited("see docs/nothing.md and docs/pitfalls.md #3, #99")
    assert docs == {"nothing.md", "pitfalls.md"} and pitfalls == {3, 99}
    assert OUTSIDE.search("as PITFALLS #4 says") and OUTSIDE.search("METHOD.md")
