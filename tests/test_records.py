"""Records: both row shapes, every validation message, image modes, the DM's text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lavender.records import (
    CAPTION_PROMPT,
    Record,
    RecordError,
    dm_text,
    iter_records,
    load_image,
    read_records,
)


def _write(tmp_path, rows, name="records.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.fixture
def img(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (20, 10), (10, 20, 30)).save(tmp_path / "photos" / "a.jpg")
    return "photos/a.jpg"


def test_both_shapes_resolve_paths_and_build_messages(tmp_path, img):
    p = _write(tmp_path, [
        {"id": "c1", "image": img, "caption": "a dog"},
        {"id": "m1", "images": [img], "messages": [{"role": "user", "content": "<image>What is it?"},
                                                   {"role": "assistant", "content": "A dog."}]},
        {"id": "m2", "images": [str(tmp_path / img)], "align_text": "the dog",
         "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                      {"role": "assistant", "content": "A."}]},
    ])
    c1, m1, m2 = read_records(p)
    assert c1.images == [str(tmp_path / img)] and c1.source == "records.jsonl"
    assert c1.messages == [{"role": "user", "content": "<image>" + CAPTION_PROMPT},
                           {"role": "assistant", "content": "a dog"}]
    assert dm_text(c1) == "a dog"
    assert dm_text(m1) == "What is it? A dog."
    assert dm_text(m1, "answer") == "A dog." and dm_text(m1, "question") == "What is it?"
    assert dm_text(m2) == "the dog"  # align_text wins
    assert m2.messages[0]["content"] == "<image>Q?"
    assert (c1.index, m1.index, m2.index) == (0, 1, 2)


@pytest.mark.parametrize("row, fragment", [
    ({"id": "r", "image": "photos/missing.jpg", "caption": "x"},
     "image 'photos/missing.jpg' not found next to records.jsonl; fix the path or pass --images-root"),
    ({"id": "r", "caption": "x"}, "no 'images' (list of paths) or 'image' (path) field"),
    ({"id": "r", "image": 3, "caption": "x"}, "field 'image' must be a path string, got int"),
    ({"id": "r", "images": [], "caption": "x"}, "field 'images' is empty"),
    ({"id": "r", "image": "photos/a.jpg", "caption": "   "}, "empty text"),
    ({"id": "r", "image": "photos/a.jpg"}, "no 'messages' or 'caption' field"),
    ({"id": "r", "image": "photos/a.jpg", "caption": 5}, "field 'caption' must be a string, got int"),
    ({"id": "r", "image": "photos/a.jpg", "messages": [{"role": "bot", "content": "x"}]},
     "messages[0] must be an object with role"),
    ({"id": "r", "images": ["photos/a.jpg"], "messages": [{"role": "user", "content": "<image><image>x"}]},
     "2 '<image>' tags in messages but 1 images"),
    ({"id": [1], "image": "photos/a.jpg", "caption": "x"}, "field 'id' must be a string"),
])
def test_schema_errors_are_specific(tmp_path, img, row, fragment):
    p = _write(tmp_path, [{"id": "ok", "image": img, "caption": "fine"}, row])
    out = list(iter_records(p))
    assert isinstance(out[0], Record)
    err = out[1]
    assert isinstance(err, RecordError) and err.index == 1
    assert fragment in str(err), str(err)
    assert str(err).startswith("record 1")
    with pytest.raises(RecordError):
        read_records(p)


def test_error_message_format_and_images_root(tmp_path, img):
    p = _write(tmp_path, [{"id": "img_0042", "image": "photos/a.jpg", "caption": "x"}])
    other = tmp_path / "elsewhere"
    other.mkdir()
    (err,) = list(iter_records(p, images_root=other))
    assert str(err) == (f"record 0 (id 'img_0042'): image 'photos/a.jpg' not found under --images-root "
                        f"{str(other)!r}; fix the path or pass --images-root")
    assert err.record_id == "img_0042" and err.reason.startswith("image 'photos/a.jpg'")
    (rec,) = read_records(p, images_root=tmp_path)
    assert rec.images == [str(tmp_path / "photos/a.jpg")]


def test_bad_json_line_is_yielded_not_raised(tmp_path, img):
    p = _write(tmp_path, ['{"id": "a", "image": "photos/a.jpg", "caption": "x"}', "{not json", "[1, 2]"])
    out = list(iter_records(p))
    assert isinstance(out[0], Record)
    assert isinstance(out[1], RecordError) and "not valid JSON" in str(out[1]) and out[1].record_id is None
    assert isinstance(out[2], RecordError) and "expected a JSON object, got list" in str(out[2])


def test_hf_dataset_source(tmp_path, img):
    import datasets

    ds = datasets.Dataset.from_list([{"id": "a", "image": img, "caption": "a cat"}])
    (rec,) = read_records(ds, images_root=tmp_path)
    assert rec.id == "a" and rec.images == [str(tmp_path / img)] and dm_text(rec) == "a cat"


def _px(im):
    return np.asarray(im, dtype=np.int32)


def test_image_modes_convert_to_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (16, 12), 77).save(grey)
    assert _px(load_image(grey))[0, 0].tolist() == [77, 77, 77]

    rgba = tmp_path / "rgba.png"
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black -> white
    im.putpixel((0, 0), (200, 0, 0, 255))
    im.save(rgba)
    out = _px(load_image(rgba))
    assert out[0, 0].tolist() == [200, 0, 0] and out[5, 5].tolist() == [255, 255, 255]

    pal = tmp_path / "pal.png"
    Image.new("RGB", (16, 16), (0, 128, 255)).convert("P", palette=Image.ADAPTIVE).save(pal)
    assert load_image(pal).mode == "RGB"

    deep = tmp_path / "deep.png"
    a = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(a).save(deep)  # 16-bit greyscale: the full range maps to 0..255, not clipped to white
    out = _px(load_image(deep))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 100 < out[8, 0, 0] < 160

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)
    r, g, b = _px(load_image(cmyk))[4, 4]
    assert r > 200 and g < 60 and b < 60

    huge = tmp_path / "huge.png"
    Image.new("RGB", (4000, 9), (1, 2, 3)).save(huge)  # odd aspect and size still succeed
    assert load_image(huge).size == (4000, 9)


def test_unusable_images_raise_value_error(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (7, 100)).save(tiny)
    with pytest.raises(ValueError, match="7×100 px; images need at least 8 px"):
        load_image(tiny)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_image(corrupt)
    good = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_image(good)
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.png")
