"""The miniature world's scene generator: determinism, exact masks, captions, questions, splits, files.

Checks compare against computations made here from the pixels (hues, connected components,
centroids, fill ratios of the analytic shapes), not against the generator's own helpers.
"""

from __future__ import annotations

import colorsys
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lavender.words import split_words
from lavender.world import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZE,
    downsample_masks,
    load_object_masks,
    load_word_masks,
    make_scene,
    sample_batch,
    union_mask,
    vocabulary,
    vqa_example,
    write_captions,
    write_split,
)

# Expected hue (degrees) of each colour name; a pixel's hue must be within 15° of its word's.
HUES = {"red": 0, "orange": 30, "yellow": 53, "green": 130, "blue": 226, "purple": 275}
# pixel count / side² of each shape, from geometry: π/4, 1, 1/2, (2·s·s/3 − (s/3)²)/s² = 5/9
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}


def _hue(rgb) -> float:
    h, _, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))
    return h * 360


def _hue_close(rgb, name: str) -> bool:
    d = abs(_hue(rgb) - HUES[name]) % 360
    return min(d, 360 - d) <= 15


def _components(fg: np.ndarray) -> int:
    """4-connected components of a bool image, by flood fill."""
    seen = np.zeros_like(fg)
    count = 0
    for y, x in zip(*np.nonzero(fg)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < fg.shape[0] and 0 <= nx < fg.shape[1] and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    return {split: write_split(root, split, n, seed=3)
            for split, n in (("train", 300), ("test", 60), ("ood", 150))}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- determinism --------------------------------------------------------------------------------

def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_split(tmp_path / "a", "train", 12, seed=7)
    b = write_split(tmp_path / "b", "train", 12, seed=7)
    c = write_split(tmp_path / "c", "train", 12, seed=8)
    assert a.read_bytes() == b.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
        ma, mb = np.load(tmp_path / "a/masks" / name.replace(".png", ".npz")), \
            np.load(tmp_path / "b/masks" / name.replace(".png", ".npz"))
        assert all(np.array_equal(ma[k], mb[k]) for k in ("words", "offsets", "masks", "object_masks"))
    assert a.read_text() != c.read_text()
    imgs_a = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a/images").iterdir())]
    imgs_c = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "c/images").iterdir())]
    assert sum(not np.array_equal(x, y) for x, y in zip(imgs_a, imgs_c)) >= 10


def test_records_do_not_depend_on_n_and_splits_differ(tmp_path):
    short = _rows(write_split(tmp_path / "s", "train", 5, seed=1))
    long = _rows(write_split(tmp_path / "l", "train", 20, seed=1))
    assert short == long[:5]
    test = _rows(write_split(tmp_path / "s", "test", 5, seed=1))
    assert [r["align_text"] for r in test] != [r["align_text"] for r in short]


def test_sample_batch_is_deterministic_and_fast():
    a = sample_batch(np.random.default_rng(5), 64)
    b = sample_batch(np.random.default_rng(5), 64)
    assert a.images.shape == (64, SIZE, SIZE, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert all(np.array_equal(x.masks, y.masks) for x, y in zip(a.word_masks, b.word_masks))
    c = sample_batch(np.random.default_rng(6), 64)
    assert not np.array_equal(a.images, c.images)
    t = time.perf_counter()
    sample_batch(np.random.default_rng(0), 1000)
    assert time.perf_counter() - t < 5.0  # ~0.4 s measured; generous for a shared 2-core machine


# --- masks match the pixels ---------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "ood"])
def test_object_masks_are_the_drawn_objects(split):
    rng = np.random.default_rng(11)
    fills: dict[str, list[float]] = {s: [] for s in SHAPES}
    for _ in range(150):
        s = make_scene(rng, split)
        img = s.image.astype(int)
        union = s.object_masks.any(0)
        assert (s.object_masks.sum(0) <= 1).all(), "objects overlap"
        assert (img[~union] == 255).all(), "a pixel outside every mask is not background"
        assert _components(union) == len(s.objects) == len(s.object_masks)
        for o, m in zip(s.objects, s.object_masks):
            colours = np.unique(img[m], axis=0)
            assert len(colours) == 1 and _hue_close(colours[0], o.colour), (o, colours)
            ys, xs = np.nonzero(m)
            # the mask lies in the object's box and spans it (within a pixel)
            assert xs.min() >= o.x0 and xs.max() < o.x0 + o.side and ys.min() >= o.y0
            assert ys.max() < o.y0 + o.side
            assert xs.max() - xs.min() >= o.side - 2 and ys.max() - ys.min() >= o.side - 2
            assert 14 <= o.side <= 28
            fills[o.shape].append(m.sum() / o.side**2)
    for shape, ratios in fills.items():
        assert ratios, f"no {shape} drawn"
        # pixel count ≈ analytic area: discretisation error is O(side), i.e. a few % at 14–28 px
        assert abs(np.mean(ratios) - FILL[shape]) < 0.03, (shape, np.mean(ratios))
        assert np.max(np.abs(np.array(ratios) - FILL[shape])) < 0.12, shape


def test_colours_have_distinct_hues():
    hues = sorted(_hue(rgb) for rgb in COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 20, hues
    for name, rgb in COLOURS.items():
        assert _hue_close(rgb, name)


def test_caption_words_align_with_masks_by_offsets():
    rng = np.random.default_rng(2)
    for _ in range(100):
        s = make_scene(rng, "train")
        words, offsets, masks = s.word_masks
        assert len(words) == len(offsets) == len(masks) == 2 * len(s.objects)
        split = {(w.start, w.end): w.text for w in split_words(s.caption)}
        for w, (a, b), m in zip(words, offsets, masks):
            assert s.caption[a:b] == w and split[(a, b)] == w  # the same words Stage 1 reads
            assert m.any()
            if w in COLOURS:
                assert all(_hue_close(px, w) for px in np.unique(s.image[m], axis=0))
        # a colour word and the shape word after it name the same object
        for k in range(0, len(words), 2):
            assert words[k] in COLOURS and words[k + 1] in SHAPES
            assert np.array_equal(masks[k], masks[k + 1])
        # objects are named left to right
        cx = [np.nonzero(m)[1].mean() for m in masks[::2]]
        assert cx == sorted(cx) or np.allclose(np.diff(cx)[np.diff(cx) < 0], 0, atol=1)
        # function words carry no mask
        grounded = set(offsets)
        assert all((w.start, w.end) not in grounded for w in split_words(s.caption)
                   if w.text in ("a", "an", "and"))


def test_union_mask_of_a_word_is_every_object_it_names():
    rng = np.random.default_rng(4)
    for _ in range(60):
        s = make_scene(rng, "train", objects=(3, 4))
        for colour, rgb in COLOURS.items():
            by_pixels = (s.image == np.array(rgb, np.uint8)).all(-1)
            assert np.array_equal(union_mask(s.objects, s.object_masks, colour), by_pixels)
        for shape in SHAPES:
            want = np.zeros((SIZE, SIZE), bool)
            for o, m in zip(s.objects, s.object_masks):
                want |= m if o.shape == shape else False
            assert np.array_equal(union_mask(s.objects, s.object_masks, shape.upper()), want)
        assert not union_mask(s.objects, s.object_masks, "left").any()


def test_downsample_masks_is_block_coverage():
    m = np.random.default_rng(0).random((3, SIZE, SIZE)) < 0.3
    d = downsample_masks(m, 16)
    assert d.shape == (3, 16, 16)
    assert d[1, 2, 5] == pytest.approx(m[1, 8:12, 20:24].mean())
    assert downsample_masks(m, 32).sum(axis=(1, 2)) * 4 == pytest.approx(m.sum(axis=(1, 2)))
    with pytest.raises(ValueError, match="divide"):
        downsample_masks(m, 24)


# --- questions and splits -----------------------------------------------------------------------

def _skeleton(question: str) -> str:
    """A question with its colour/shape words and articles replaced: what a template looks like."""
    words = "|".join([*COLOURS, *SHAPES])
    return re.sub(rf"\b({words})\b", "X", question).replace("an X", "a X")


def test_ood_holds_out_pairs_and_templates(written):
    train, test, ood = (_rows(written[s]) for s in ("train", "test", "ood"))
    bigrams = {f"{c} {s}" for c, s in HELD_OUT_PAIRS}
    for row in train + test:
        assert not {(o["colour"], o["shape"]) for o in row["objects"]} & HELD_OUT_PAIRS, row["id"]
        text = row["align_text"] + " " + row["messages"][0]["content"]
        assert not any(b in text for b in bigrams), row["id"]
    for row in ood:
        assert {(o["colour"], o["shape"]) for o in row["objects"]} & HELD_OUT_PAIRS, row["id"]
    seen = {_skeleton(r["messages"][0]["content"]) for r in train + test}
    unseen = {_skeleton(r["messages"][0]["content"]) for r in ood}
    assert not seen & unseen
    assert len(unseen) >= 6 and len(seen) >= 12  # every form's paraphrases actually occur


def test_answers_are_balanced_and_correct(written):
    for split in ("train", "ood"):
        rows = _rows(written[split])
        kinds = Counter(r["type"] for r in rows)
        assert set(kinds) == {"colour", "shape", "count", "position", "existence"}
        assert max(kinds.values()) - min(kinds.values()) <= 1
        answers = Counter(r["answers"][0] for r in rows)
        yn = answers["yes"] + answers["no"]
        assert 0.38 <= answers["yes"] / yn <= 0.62, (split, answers)
        for kind in ("existence", "position"):
            a = Counter(r["answers"][0] for r in rows if r["type"] == kind)
            if a["yes"] + a["no"] >= 20:
                assert 0.3 <= a["yes"] / (a["yes"] + a["no"]) <= 0.7, (split, kind, a)
        assert answers.most_common(1)[0][1] / len(rows) < 0.25  # majority baseline stays low
        assert all(len(r["answers"][0].split()) == 1 for r in rows)
    root = written["train"].parent
    for row in _rows(written["train"]) + _rows(written["ood"]):
        _check_answer(row, root)


def _check_answer(row: dict, root: Path) -> None:
    """Recompute the answer from the image's pixels and the object masks."""
    img = np.asarray(Image.open(root / row["images"][0]))
    masks = load_object_masks(row, root)
    objs = row["objects"]
    q, ans = row["messages"][0]["content"], row["answers"][0]
    named = lambda colour, shape: [m for o, m in zip(objs, masks)  # noqa: E731
                                   if o["colour"] == colour and o["shape"] == shape]
    centre = lambda m: np.nonzero(m)[1].mean()  # noqa: E731
    obj = rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
    if row["type"] == "count":
        assert ans == str(_components((img != 255).any(-1)))
    elif row["type"] == "colour":
        shape = next(s for s in SHAPES if s in q)
        (m,) = [m for o, m in zip(objs, masks) if o["shape"] == shape]
        assert _hue_close(img[m][0], ans)
    elif row["type"] == "shape":
        colour = next(c for c in COLOURS if c in q)
        (o,) = [o for o in objs if o["colour"] == colour]
        assert o["shape"] == ans
    elif row["type"] == "existence":
        c, s = re.search(r"(\w+) (\w+)(?: in the image)?\?$", q).groups()
        assert ans == ("yes" if named(c, s) else "no")
    elif "left or the right" in q or "which side" in q.lower():
        ((c, s),) = re.findall(obj, q)
        assert ans == ("left" if centre(named(c, s)[0]) < SIZE / 2 else "right")
    else:
        (ca, sa), (cb, sb) = re.findall(obj, q)
        side = "left" if " left " in q else "right"
        a_left = centre(named(ca, sa)[0]) < centre(named(cb, sb)[0])
        assert ans == ("yes" if a_left == (side == "left") else "no"), q


def test_vocabulary_covers_every_text_and_tiny_tokenizer_words():
    vocab = set(vocabulary())
    for split in ("train", "ood"):
        for i in range(40):
            scene, q = vqa_example(0, split, i)
            words = split_words(scene.caption + " " + q.text + " " + q.answer)
            assert {w.text.lower() for w in words} <= vocab, q.text
    tiny = pytest.importorskip("lavender.vlm.tiny")
    assert vocab <= set(tiny.BASIC_WORDS) | set("0123456789"), vocab - set(tiny.BASIC_WORDS)


# --- files and the command ----------------------------------------------------------------------

def test_jsonl_records_are_readable(written):
    root = written["test"].parent
    for row in _rows(written["test"]):
        assert set(row) >= {"id", "images", "messages", "align_text", "type", "answers"}
        assert not Path(row["images"][0]).is_absolute()
        img = Image.open(root / row["images"][0])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        assert assistant == {"role": "assistant", "content": row["answers"][0]}
        words, offsets, masks = load_word_masks(row, root)
        assert masks.shape == (len(words), SIZE, SIZE) and masks.dtype == bool
        assert [row["align_text"][a:b] for a, b in offsets] == words
    with pytest.raises(FileNotFoundError, match="root="):
        load_word_masks({"id": "x", "masks": "masks/nowhere.npz"})


def test_command_writes_vqa_and_caption_rows(tmp_path, capsys):
    from lavender.cli import main

    assert main(["world", "scenes", "--out", str(tmp_path), "--split", "validation", "--n", "7",
                 "--seed", "2"]) == 0
    assert main(["world", "scenes", "--out", str(tmp_path), "--n", "6", "--captions"]) == 0
    assert "validation.jsonl" in capsys.readouterr().out
    vqa = _rows(tmp_path / "validation.jsonl")
    assert len(vqa) == 7 and vqa == _rows(write_split(tmp_path / "again", "validation", 7, seed=2))
    caps = _rows(tmp_path / "train_captions.jsonl")
    assert len(caps) == 6 and all(set(r) >= {"id", "image", "caption"} for r in caps)
    for r in caps:
        assert (tmp_path / r["image"]).exists()
        words, offsets, _ = load_word_masks(tmp_path / r["masks"])
        assert [r["caption"][a:b] for a, b in offsets] == words
    assert _rows(write_captions(tmp_path / "c2", "train", 6, seed=0)) == caps
    assert main(["world", "scenes", "--out", str(tmp_path), "--split", "nope", "--n", "1"]) == 2
