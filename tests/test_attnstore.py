"""The attention dataset: writer/reader round trip, atomicity, ranks, resume, errors, HF, authors' layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lavender.attnstore import (
    AttentionStore,
    AttentionWriter,
    escape_word,
    export_authors_layout,
    import_authors_layout,
    unescape_word,
    update_counts,
)
from lavender.records import read_records

MAN = {"recipe": {"name": "ddim"}, "map_size": 8, "normalization": "minmax"}


def _maps(rng, n, s=8):
    return rng.random((n, s, s)).astype(np.float32)


def test_round_trip_random_access_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    with AttentionWriter(tmp_path, MAN, shard_size=2) as w:
        for i in range(5):
            words = [f"w{i}", "dog", "dog"][: 1 + i % 3]
            maps = _maps(rng, len(words))
            truth[f"id{i}"] = (words, maps)
            w.add(f"id{i}", words, [(k, k + 1) for k in range(len(words))], maps, extra={"image_size": [3, 4]})
    store = AttentionStore(tmp_path)
    assert len(store) == 5 and "id3" in store and "nope" not in store
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 3  # 2 + 2 + 1
    for id in ["id4", "id0", "id2"]:  # any order
        ex = store.get(id)
        words, maps = truth[id]
        assert ex["words"] == words and ex["offsets"] == [(k, k + 1) for k in range(len(words))]
        assert ex["maps"].dtype == np.float16
        np.testing.assert_allclose(ex["maps"], maps, atol=1e-3)  # float16
        assert ex["extra"] == {"image_size": [3, 4]}
    assert store.map_shape() == [8, 8] and store.n_words() == sum(len(w) for w, _ in truth.values())
    with pytest.raises(KeyError, match="no maps for example 'zzz'"):
        store.get("zzz")


def test_ranks_never_collide_and_read_as_one(tmp_path):
    rng = np.random.default_rng(1)
    w0, w1 = AttentionWriter(tmp_path, MAN, rank=0, shard_size=1), AttentionWriter(tmp_path, MAN, rank=1, shard_size=1)
    for i in range(3):
        w0.add(f"a{i}", ["x"], [(0, 1)], _maps(rng, 1))
        w1.add(f"b{i}", ["y"], [(0, 1)], _maps(rng, 1))
    w0.close()
    w1.close()
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == [f"r000-{i:05d}.safetensors" for i in range(3)] + [f"r001-{i:05d}.safetensors" for i in range(3)]
    store = AttentionStore(tmp_path)
    assert sorted(store.ids()) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    # a resumed writer of rank 0 continues the numbering and sees everyone's ids as done
    w = AttentionWriter(tmp_path, MAN, rank=0)
    assert w.done_ids() == set(store.ids())
    w.add("a3", ["x"], [(0, 1)], _maps(rng, 1))
    w.close()
    assert (tmp_path / "shards" / "r000-00003.safetensors").exists()


def test_torn_write_is_invisible_and_cleaned(tmp_path):
    rng = np.random.default_rng(2)
    with AttentionWriter(tmp_path, MAN, shard_size=1) as w:
        w.add("a", ["x"], [(0, 1)], _maps(rng, 1))
    # what a SIGKILL in the middle of writing the next shard leaves behind
    torn = tmp_path / "shards" / ".r000-00001.safetensors.tmp-12345"
    torn.write_bytes(b"\x00\x01garbage")
    assert AttentionStore(tmp_path).ids() == ["a"]
    AttentionWriter(tmp_path, MAN).close()
    assert not torn.exists()


def test_manifest_mismatch_refuses_to_mix(tmp_path):
    AttentionWriter(tmp_path, MAN).close()
    AttentionWriter(tmp_path, {**MAN, "counts": {"examples": 3}}).close()  # volatile keys may differ
    with pytest.raises(ValueError, match=r"different settings \(recipe\)"):
        AttentionWriter(tmp_path, {**MAN, "recipe": {"name": "nulltext"}})


def test_errors_deduplicated_and_dropped_once_fixed(tmp_path):
    with AttentionWriter(tmp_path, MAN) as w:
        w.add_error(3, "bad", "image missing")
        w.add_error(4, "later_ok", "image missing")
        w.add_error(5, None, "not valid JSON")
    with AttentionWriter(tmp_path, MAN) as w:
        w.add_error(3, "bad", "image corrupt")
        w.add("later_ok", ["x"], [(0, 1)], np.zeros((1, 8, 8)))
    (tmp_path / "errors-r000.jsonl").open("a").write('{"index": 9, "id": "tor')  # torn line
    errs = AttentionStore(tmp_path).errors()
    assert sorted((e["index"], e["reason"]) for e in errs) == [(3, "image corrupt"), (5, "not valid JSON")]
    counts = update_counts(tmp_path)
    assert counts["examples"] == 1 and counts["errors"] == 2
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["examples"] == 1


def test_to_hf_dataset(tmp_path):
    rng = np.random.default_rng(3)
    m = _maps(rng, 2)
    with AttentionWriter(tmp_path, MAN) as w:
        w.add("a", ["red", "dog"], [(0, 3), (4, 7)], m)
        w.add("b", ["x"], [(0, 1)], m[:1])
    ds = AttentionStore(tmp_path).to_hf_dataset()
    assert ds.column_names == ["id", "words", "offsets", "maps"] and len(ds) == 2
    row = ds[0]
    assert row["id"] == "a" and row["words"] == ["red", "dog"] and row["offsets"] == [[0, 3], [4, 7]]
    np.testing.assert_allclose(np.asarray(row["maps"], dtype=np.float32), m, atol=1e-3)


@pytest.mark.parametrize("word", ["e.g", "file_name", "a%b", "x-ray", "naïve", "attention_x", "a/b"])
def test_escape_round_trip(word):
    name = escape_word(word)
    assert "_" not in name and "." not in name and "/" not in name
    assert unescape_word(name) == word


def test_authors_layout_round_trip(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (32, 32)).save(img_dir / "pic.jpg")
    text = "the dog_house e.g. a dog"
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "p", "image": "imgs/pic.jpg", "caption": text}) + "\n")
    recs = read_records(tmp_path / "r.jsonl")
    # smooth maps (JPEG keeps low frequencies), one per occurrence; the two "dog"s differ on purpose
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    words = ["the", "dog_house", "e.g", "a", "dog"]
    maps = np.stack([np.clip(np.sin(2 * xx + k) * 0.5 + 0.5 * yy, 0, 1) for k in range(len(words))])
    maps = (maps - maps.min(axis=(1, 2), keepdims=True)) / np.ptp(maps, axis=(1, 2), keepdims=True)
    src = tmp_path / "src"
    with AttentionWriter(src, {"map_size": 32}) as w:
        w.add("p", words + ["dog"], [(0, 3), (4, 13), (14, 17), (19, 20), (21, 24), (21, 24)],
              np.concatenate([maps, maps[1:2]]))
    n = export_authors_layout(src, {r.id: r.images[0] for r in recs})
    folder = img_dir / "lpm_attention" / "pic"
    names = sorted(p.name for p in folder.iterdir())
    assert n == 5 and names == sorted(f"attention_{escape_word(w)}.jpg" for w in words)
    assert "attention_dog%5Fhouse.jpg" in names and "attention_e%2Eg.jpg" in names
    counts = import_authors_layout(recs, tmp_path / "back")
    assert counts == {"examples": 1, "words": 5, "missing": 0}
    back = AttentionStore(tmp_path / "back").get("p")
    assert back["words"] == words and back["offsets"] == [(0, 3), (4, 13), (14, 17), (19, 20), (21, 24)]
    # every distinct word's map survives within 8-bit + JPEG tolerance
    err = np.abs(back["maps"].astype(np.float32) - maps)
    assert err.max() < 0.06 and err.mean() < 0.01


def test_import_authors_raw_names_and_missing(tmp_path):
    """The authors' raw names: `attention_a_b.jpg` is the word 'a_b'; unknown words kept at (-1, -1)."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "q.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "none.png")
    folder = tmp_path / "imgs" / "lpm_attention" / "q"
    folder.mkdir(parents=True)
    for w, v in [("Red", 255), ("a_b", 128), ("zebra", 10)]:
        Image.new("L", (16, 16), v).save(folder / f"attention_{w}.jpg")
    rows = [{"id": "q", "image": "imgs/q.png", "caption": "red a_b red"},
            {"id": "none", "image": "imgs/none.png", "caption": "x"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = import_authors_layout(read_records(tmp_path / "r.jsonl"), tmp_path / "out")
    assert counts == {"examples": 1, "words": 4, "missing": 1}
    store = AttentionStore(tmp_path / "out")
    ex = store.get("q")
    assert ex["words"] == ["red", "a_b", "red", "zebra"]
    assert ex["offsets"] == [(0, 3), (4, 7), (8, 11), (-1, -1)]
    assert ex["maps"].shape == (4, 32, 32)  # resized from 16
    assert abs(float(ex["maps"][0].mean()) - 1.0) < 0.02 and abs(float(ex["maps"][1].mean()) - 128 / 255) < 0.02
    assert [e["id"] for e in store.errors()] == ["none"]


def test_parquet_export_round_trips_typed_columns(tmp_path) -> None:
    """export_parquet → typed columns (Array3D float16 maps) → import_parquet gives the same store."""
    from datasets import load_dataset

    from lavender.attnstore import AttentionStore, AttentionWriter, export_parquet, import_parquet

    rng = np.random.default_rng(0)
    with AttentionWriter(tmp_path / "a", {"map_size": 8, "frame": "squash", "recipe": {"name": "ddim"}}) as w:
        for i, words in enumerate([["a", "red", "circle"], ["blue"], ["x", "y"]]):
            w.add(f"e{i}", words, [(2 * k, 2 * k + 1) for k in range(len(words))],
                  rng.random((len(words), 8, 8)).astype(np.float32), extra={"image_size": [40, 30 + i]})
    export_parquet(tmp_path / "a", tmp_path / "pq")
    ds = load_dataset("parquet", data_files=str(tmp_path / "pq" / "attention.parquet"), split="train")
    assert ds.features["maps"].dtype == "float16" and ds.features["maps"].shape[1:] == (8, 8)
    assert ds[0]["words"] == ["a", "red", "circle"] and ds[0]["offsets"][1] == [2, 3]
    assert import_parquet(tmp_path / "pq", tmp_path / "b") == 3
    a, b = AttentionStore(tmp_path / "a"), AttentionStore(tmp_path / "b")
    assert sorted(a.ids()) == sorted(b.ids()) and b.manifest["recipe"] == {"name": "ddim"}
    for i in a.ids():
        assert a.get(i)["words"] == b.get(i)["words"] and a.entry(i)["extra"] == b.entry(i)["extra"]
        np.testing.assert_array_equal(a.get(i)["maps"], b.get(i)["maps"])
