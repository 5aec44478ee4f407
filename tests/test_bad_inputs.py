"""The bad-input corpus: hostile or broken FILES given to extract, train, eval, data and inspect.

Each case names its expected outcome, and the test asserts exactly that:

- ``processed``: the command succeeds and the input is used (e.g. an odd but valid image);
- ``skipped``: the command succeeds, the bad record is skipped AND counted (summary or errors file);
- ``error``: a non-zero exit with a one-line message on stderr naming the problem — never a traceback.

(`tests/test_cli_errors.py` covers bad FLAGS; this file covers bad DATA.) `pytest -s` prints the
table by outcome that the closing note quotes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path
from PIL import Image

from lavender.cli import main

OUTCOMES: Counter = Counter()
GOOD = {"id": "good", "images": ["ok.png"], "messages": [{"role": "user", "content": "<image>What is it?"},
                                                         {"role": "assistant", "content": "a red circle"}]}


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "ok.png")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "garbage.png").write_bytes(b"not an image at all")
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(rng.integers(0, 255, (3, 200, 3), dtype=np.uint8)).save(root / "sliver.png")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(root / "gray16.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.new("CMYK", (40, 30), (10, 20, 30, 0)).save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 900, 3), dtype=np.uint8)).save(root / "wide.png")


def _row(image: str = "ok.png", **kw) -> dict:
    return {**GOOD, "id": kw.pop("id", image), "images": [image], **kw}


# (name, command, records file content (str or list of rows), expected outcome, fragment of the message)
CASES: list[tuple[str, str, object, str, str]] = [
    ("truncated png", "extract", [_row("truncated.png")], "skipped", "truncated.png"),
    ("not an image", "extract", [_row("garbage.png")], "skipped", "garbage.png"),
    ("empty file", "extract", [_row("empty.png")], "skipped", "empty.png"),
    ("missing image", "extract", [_row("nope.png")], "skipped", "nope.png"),
    ("3-px sliver", "extract", [_row("sliver.png")], "skipped", "sliver.png"),
    ("16-bit greyscale", "extract", [_row("gray16.png")], "processed", ""),
    ("RGBA", "extract", [_row("rgba.png")], "processed", ""),
    ("palette", "extract", [_row("palette.png")], "processed", ""),
    ("CMYK jpeg", "extract", [_row("cmyk.jpg")], "processed", ""),
    ("45:1 panorama", "extract", [_row("wide.png")], "processed", ""),
    ("torn last line", "extract", json.dumps(GOOD) + "\n" + json.dumps(_row(id="torn"))[:30] + "\n", "skipped",
     "not valid JSON"),
    ("non-UTF-8 byte", "extract", json.dumps(GOOD) + "\n{\"id\": \"x\xff\"}\n", "skipped", "UTF-8"),
    ("a JSON list row", "extract", json.dumps(GOOD) + "\n[1, 2]\n", "skipped", "JSON object"),
    ("duplicate id", "extract", [GOOD, GOOD], "skipped", "duplicate id"),
    ("empty caption", "extract", [{"id": "c", "image": "ok.png", "caption": ""}], "skipped", "caption"),
    ("id is a list", "extract", [{**GOOD, "id": [1]}], "skipped", "'id'"),
    ("images not a list", "extract", [{**GOOD, "images": 5}], "skipped", "images"),
    ("bad role", "extract", [{**GOOD, "messages": [{"role": "bot", "content": "x"}]}], "skipped", "role"),
    ("empty records file", "extract", "", "error", "no records"),
    ("records file is a folder", "extract", "DIR", "error", "records"),
    ("bad align_pairs", "extract", [{**GOOD, "align_pairs": "red", "align_text": "a red circle"}], "skipped",
     "align_pairs"),
    ("truncated png", "train", [GOOD, _row("truncated.png")], "skipped", ""),
    ("non-UTF-8 byte", "train", json.dumps(GOOD) + "\n{\"id\": \"x\xff\"}\n", "skipped", ""),
    ("no assistant turn", "train", [GOOD, {**GOOD, "id": "q", "messages": GOOD["messages"][:1]}], "skipped", ""),
    ("every record bad", "train", [_row("garbage.png")], "error", "unusable"),
    ("empty records file", "train", "", "error", "no usable record"),
    ("garbage image", "eval", [GOOD, _row("garbage.png")], "skipped", ""),
    ("torn line", "eval", json.dumps(GOOD) + "\n{\"id\"", "skipped", ""),
    ("missing records", "eval", "MISSING", "error", "no such file"),
    ("torn JSONL to mix", "data-mix", json.dumps(GOOD) + "\n{\"id\"", "error", "not valid JSON"),
    ("corrupt shard", "inspect", "CORRUPT_SHARD", "error", "corrupt shard"),
    ("YAML syntax error", "train-yaml", "lambda: [1,\n", "error", "YAML"),
    ("YAML wrong type", "train-yaml", "learning_rate: fast\n", "error", "learning_rate"),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("bad_inputs")
    _write_images(r)
    return r


def _records(root: Path, name: str, content: object) -> str:
    path = root / f"{name.replace(' ', '_').replace(':', '')}.jsonl"
    if content == "DIR":
        path.mkdir(exist_ok=True)
        return str(path)
    if content == "MISSING":
        return str(root / "missing.jsonl")
    text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
    path.write_bytes(text.encode("latin-1"))  # JSON is ASCII; a "\xff" in a case becomes the raw byte 0xFF
    return str(path)


def _run(cmd: str, root: Path, records: str, tiny_vlm, name: str) -> list[str]:
    out = str(root / f"out_{cmd}_{name.replace(' ', '_')}")
    fast_train = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
                  "--disable_tqdm", "true", "--save_strategy", "no"]
    if cmd == "extract":
        return ["extract", "--dm", tiny_dm_path(), "--data", records, "--out", out, "--steps", "1",
                "--inversion-steps", "1", "--map-size", "8", "--no-progress", *TEST_RESOLUTIONS]
    if cmd == "train":
        return ["train", "--model", tiny_vlm("llava"), "--data", records, "--output_dir", out, *fast_train]
    if cmd == "train-yaml":
        (root / f"{name}.yaml").write_text(Path(records).read_text())
        good = _records(root, "good_for_yaml", [GOOD])
        return ["train", "--model", tiny_vlm("llava"), "--data", good, "--output_dir", out,
                "--config", str(root / f"{name}.yaml"), *fast_train]
    if cmd == "eval":
        return ["eval", "--model", tiny_vlm("llava"), "--data", records, "--out", out, "--max-new-tokens", "2"]
    if cmd == "data-mix":
        return ["data", "mix", records, "--out", out + ".jsonl"]
    if cmd == "inspect":
        from lavender.attnstore import AttentionWriter

        with AttentionWriter(out, {"map_size": 8}) as w:
            w.add("a", ["x"], [(0, 1)], np.zeros((1, 8, 8), np.float32))
        shard = next(Path(out, "shards").glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:40])
        return ["inspect", out]
    raise AssertionError(cmd)


@pytest.mark.parametrize("name,cmd,content,outcome,needle", CASES, ids=[f"{c[1]}: {c[0]}" for c in CASES])
def test_bad_input(name, cmd, content, outcome, needle, root, tiny_vlm, capsys) -> None:
    records = _records(root, f"{cmd}_{name}", content)
    argv = _run(cmd, root, records, tiny_vlm, name)
    code = main(argv)
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "Traceback" not in both, both[-2000:]
    if outcome == "error":
        assert code != 0
        lines = [ln for ln in captured.err.strip().splitlines() if ln.startswith("lavender")]
        assert lines and needle.lower() in lines[-1].lower(), captured.err[-1000:]
    else:
        assert code == 0, both[-2000:]
        if outcome == "skipped" and cmd == "extract":
            errors = "".join(p.read_text() for p in Path(argv[argv.index("--out") + 1]).glob("errors-r*.jsonl"))
            assert needle.lower() in errors.lower(), errors
        elif outcome == "skipped":
            assert "skip" in both.lower() or "bad" in both.lower(), both[-1500:]
    OUTCOMES[(cmd, outcome)] += 1


def test_zz_print_the_table() -> None:
    """(Runs last in this file.) The corpus by command and outcome, for the closing note."""
    print("\nbad-input corpus:", dict(sorted(OUTCOMES.items())), "total", sum(OUTCOMES.values()))
    assert sum(OUTCOMES.values()) in (0, len(CASES))  # 0 when run alone with -k
