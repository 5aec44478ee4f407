"""`lavender data mix` ratios and `lavender data split` leakage, on record files written here."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from lavender.cli import main as cli
from lavender.data.mix import mix, parse_source, split


def write_records(folder: Path, name: str, n: int, prefix: str, per_image: int = 1) -> Path:
    """n records over n // per_image image files (relative paths), which exist on disk."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = f"img/{prefix}{i // per_image}.jpg"
        (folder / img).write_bytes(b"x")
        lines.append(json.dumps({"id": f"{prefix}{i}", "images": [img],
                                 "messages": [{"role": "user", "content": "<image>q"},
                                              {"role": "assistant", "content": "a"}]}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def resolved_images(path: Path) -> list[Path]:
    return [(path.parent / p).resolve() for r in read(path) for p in r["images"]]


def test_mix_fraction_ratios_upsampling_and_paths(tmp_path):
    a = write_records(tmp_path / "A", "a.jsonl", 10, "a")
    b = write_records(tmp_path / "B", "b.jsonl", 4, "b")
    out = tmp_path / "mix" / "deep" / "mix.jsonl"
    rep = mix([(a, 0.5), (b, 2.0)], out, seed=1)
    got = read(out)
    assert rep["written"] == len(got) == 5 + 8
    assert Counter(r["source"] for r in got) == {"a": 5, "b": 8}
    assert rep["sources"][1]["upsampled"] is True
    # B up-sampled twice: every B record twice, the copies with "#2" and their original id kept
    assert sorted(r["id"] for r in got if r["source"] == "b") == ["b0", "b0#2", "b1", "b1#2", "b2", "b2#2",
                                                                    "b3", "b3#2"]
    assert all(r["source_id"] == r["id"][:-2] for r in got if r["id"].endswith("#2"))
    assert len({r["id"] for r in got}) == len(got)
    assert all(p.is_file() for p in resolved_images(out))  # paths rewritten for the new folder
    assert all(not os.path.isabs(p) for r in got for p in r["images"])
    # deterministic per seed; the sample changes with the seed
    mix([(a, 0.5), (b, 2.0)], tmp_path / "again.jsonl", seed=1)
    assert [r["id"] for r in read(tmp_path / "again.jsonl")] == [r["id"] for r in got]
    ids_by_seed = set()
    for seed in range(5):
        mix([(a, 0.5)], tmp_path / "s.jsonl", seed=seed)
        ids_by_seed.add(tuple(sorted(r["id"] for r in read(tmp_path / "s.jsonl"))))
    assert len(ids_by_seed) > 1


def test_mix_total_weights_and_id_collisions(tmp_path):
    a = write_records(tmp_path / "A", "a.jsonl", 10, "x")
    b = write_records(tmp_path / "B", "b.jsonl", 10, "x")  # same ids as A
    out = tmp_path / "m.jsonl"
    mix([(a, 3), (b, 1)], out, seed=0, total=8)
    got = read(out)
    assert Counter(r["source"] for r in got) == {"a": 6, "b": 2}
    shared = {r.get("source_id", r["id"]) for r in got if r["source"] == "a"} & \
        {r.get("source_id", r["id"]) for r in got if r["source"] == "b"}
    assert all(r["id"] == f"{r['source']}:{r['source_id']}" for r in got if r.get("source_id") in shared)
    assert len({r["id"] for r in got}) == 8
    # largest remainders: 7 records at 1:1 is 4 + 3, exactly 7
    mix([(a, 1), (b, 1)], out, seed=0, total=7)
    assert sorted(Counter(r["source"] for r in read(out)).values()) == [3, 4]
    # an id present in both sources is prefixed with its source, never silently duplicated
    mix([(a, 1), (b, 1)], out, seed=0)
    got = read(out)
    assert len(got) == 20 and len({r["id"] for r in got}) == 20
    assert {r["id"] for r in got if r["source"] == "a"} == {f"a:x{i}" for i in range(10)}


def test_parse_source():
    assert parse_source("d/a.jsonl:0.5") == (Path("d/a.jsonl"), 0.5)
    assert parse_source("d/a.jsonl") == (Path("d/a.jsonl"), 1.0)
    with pytest.raises(ValueError, match="ratio"):
        parse_source("a.jsonl:-1")


def test_split_by_image_no_leakage(tmp_path):
    data = write_records(tmp_path / "src", "all.jsonl", 50, "i", per_image=5)  # 10 images x 5 captions
    # a two-image record that ties image i0 to image i9: both must end up on one side
    rows = read(data)
    rows.append({"id": "bridge", "images": ["img/i0.jpg", "img/i9.jpg"], "messages": rows[0]["messages"]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "splits"
    rep = split(data, 0.3, out, seed=3)
    train, val = read(out / "train.jsonl"), read(out / "val.jsonl")
    assert rep["image_groups"] == 9 and rep["val_groups"] == 3  # round(0.3 * 9)
    assert len(train) + len(val) == 51
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in val})
    train_imgs, val_imgs = set(resolved_images(out / "train.jsonl")), set(resolved_images(out / "val.jsonl"))
    assert train_imgs.isdisjoint(val_imgs) and val_imgs
    assert all(p.is_file() for p in train_imgs | val_imgs)
    # same seed, same split; the CLI runs the same code
    assert cli(["data", "split", "--data", str(data), "--val", "0.3", "--seed", "3",
                "--out", str(tmp_path / "cli")]) == 0
    assert [r["id"] for r in read(tmp_path / "cli" / "val.jsonl")] == [r["id"] for r in val]
    with pytest.raises(ValueError, match="--val"):
        split(data, 1.5, out)


def test_cli_mix(tmp_path, capsys):
    a = write_records(tmp_path / "A", "a.jsonl", 4, "a")
    assert cli(["data", "mix", f"{a}:0.5", "--out", str(tmp_path / "m.jsonl"), "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert cli(["data", "mix", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_mix_refuses_to_overwrite_its_own_input(tmp_path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "caption": "x", "images": []}) + "\n" for i in range(9)))
    before = src.read_text()
    assert cli(["data", "mix", f"{src}:0.5", "--out", str(src)]) == 2
    assert src.read_text() == before
