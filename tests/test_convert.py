"""Converters on small fixtures written here: counts, skipped rows by reason, relative image paths.

Outputs are validated with lavender.records (an independent reader) where the records are training
records, and by reading the JSONL directly for benchmark fields.
"""

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lavender.cli import main as cli
from lavender.data.convert import CONVERTERS, convert
from lavender.records import read_records


def png_bytes(color=(255, 0, 0), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def jpg(path: Path, color=(0, 128, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_parquet(path: Path, data: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(data), path)
    return path


def test_flickr30k_karpathy_relative_paths_and_skips(tmp_path):
    jpg(tmp_path / "flickr" / "images" / "1.jpg")
    jpg(tmp_path / "flickr" / "images" / "2.jpg")
    src = tmp_path / "flickr" / "dataset_flickr30k.json"
    src.write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": "1.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "A dog runs."}, {"raw": "  "}, {"raw": "A brown dog."}]},
        {"filename": "missing.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "2.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "Two cats."}]},
        {"imgid": 3, "split": "train", "sentences": []},  # no filename: malformed
    ]}))
    out = tmp_path / "data" / "sub" / "flk.jsonl"
    rep = convert("flickr30k", src, out, images_root=tmp_path / "flickr" / "images")
    assert (rep.read, rep.written) == (4, 3)
    assert rep.skipped == {"empty caption": 1, "missing image": 1, "malformed row": 1}
    got = rows(out)
    assert got[0]["images"] == [os.path.join("..", "..", "flickr", "images", "1.jpg")]
    assert got[0]["align_text"] == "A dog runs." and got[0]["messages"][1]["content"] == "A dog runs."
    assert got[0]["messages"][0]["content"].startswith("<image>")
    assert [r["id"] for r in got] == ["flickr30k-1-0", "flickr30k-1-2", "flickr30k-2-0"]
    recs = read_records(out)  # the project's reader accepts them and finds the images
    assert Path(recs[0].images[0]).resolve() == (tmp_path / "flickr" / "images" / "1.jpg").resolve()
    # --split keeps one Karpathy split; the others are reported, not silently dropped
    rep = convert("flickr30k", src, out, images_root=tmp_path / "flickr" / "images", split="test")
    assert rep.written == 1 and rep.skipped["other split"] == 3
    # the eval form: one record per image, all captions as references
    rep = convert("captions", src, tmp_path / "cap.jsonl", images_root=tmp_path / "flickr" / "images")
    cap = rows(tmp_path / "cap.jsonl")
    assert cap[0]["answers"] == ["A dog runs.", "A brown dog."] and cap[0]["metric"] == "cider"
    assert len(cap[0]["messages"]) == 1


def test_rlaif_v_trains_on_chosen_and_writes_embedded_images(tmp_path):
    src = write_parquet(tmp_path / "rlaif.parquet", [
        {"idx": 7, "question": "What is shown?", "chosen": "A red square.", "rejected": "A cat.",
         "image": {"bytes": png_bytes(), "path": None}},
        {"idx": 8, "question": "Q?", "chosen": "", "rejected": "x", "image": {"bytes": png_bytes(), "path": None}},
        {"idx": 9, "question": "Q?", "chosen": "y", "rejected": "x", "image": {"bytes": b"not an image", "path": None}},
    ])
    out = tmp_path / "o" / "rv.jsonl"
    rep = convert("rlaif-v", src, out)
    assert (rep.read, rep.written, rep.images_written) == (3, 1, 1)
    assert rep.skipped == {"empty chosen": 1, "corrupt embedded image": 1}
    (rec,) = rows(out)
    assert rec["id"] == "rlaif-v-7" and rec["images"] == ["rv_images/rlaif-v-7.png"]
    assert rec["messages"] == [{"role": "user", "content": "<image>What is shown?"},
                               {"role": "assistant", "content": "A red square."}]
    with Image.open(out.parent / rec["images"][0]) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    assert read_records(out)[0].id == "rlaif-v-7"


def test_rlaif_v_llamafactory_ranking_layout(tmp_path):
    jpg(tmp_path / "a.jpg")
    src = tmp_path / "rv.json"
    src.write_text(json.dumps([{"conversations": [{"from": "human", "value": "<image>Describe."}],
                                "chosen": {"from": "gpt", "value": "Good."},
                                "rejected": {"from": "gpt", "value": "Bad."}, "images": ["a.jpg"]}]))
    rep = convert("rlaif-v", src, tmp_path / "rv.jsonl")
    assert rep.written == 1
    assert rows(tmp_path / "rv.jsonl")[0]["messages"][-1] == {"role": "assistant", "content": "Good."}


def test_ocrvqa_cauldron_multiturn(tmp_path):
    src = write_parquet(tmp_path / "ocr.parquet", [
        {"images": [{"bytes": png_bytes((0, 255, 0)), "path": "x.png"}],
         "texts": [{"user": "Who wrote this book?", "assistant": "Jane Doe.", "source": "ocrvqa"},
                   {"user": "What is the title?", "assistant": "Shapes.", "source": "ocrvqa"}]},
        {"images": [{"bytes": png_bytes(), "path": None}], "texts": []},
        {"images": [], "texts": [{"user": "q", "assistant": "a", "source": "s"}]},
    ])
    rep = convert("ocrvqa", src, tmp_path / "ov.jsonl")
    assert (rep.read, rep.written) == (3, 1) and rep.skipped == {"no conversation": 1, "no image": 1}
    (rec,) = rows(tmp_path / "ov.jsonl")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rec["messages"][0]["content"] == "<image>Who wrote this book?"
    assert rec["messages"][2]["content"] == "What is the title?"
    assert read_records(tmp_path / "ov.jsonl")[0].messages[3]["content"] == "Shapes."


def test_llava_conversations_and_image_tags(tmp_path):
    jpg(tmp_path / "coco" / "1.jpg")
    good = {"id": "1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    untagged = {"id": "2", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue."}]}
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        good, untagged,
        {"id": "3", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "4", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image><image>Two?"}, {"from": "gpt", "value": "No."}]},
        {"id": "5", "image": "coco/1.jpg", "conversations": [
            {"from": "robot", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": "6", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>x"}, {"from": "human", "value": "y"}]},
        {"id": "1", "image": "coco/1.jpg", "conversations": good["conversations"]},  # repeated id
    ]))
    out = tmp_path / "llava.jsonl"
    rep = convert("llava", src, out)
    assert (rep.read, rep.written, rep.renamed) == (7, 3, 1)
    assert rep.skipped == {"text-only row": 1, "image tag count": 1, "unknown role": 1,
                           "roles do not alternate": 1}
    got = rows(out)
    assert got[0]["messages"][0] == {"role": "user", "content": "<image>What colour?"}
    assert got[1]["messages"][0]["content"] == "<image>What colour?"  # tag added when absent
    assert [r["id"] for r in got] == ["1", "2", "1#2"]
    assert len(read_records(out)) == 3


def test_sharegpt_messages_bad_json_line_and_system(tmp_path):
    jpg(tmp_path / "imgs" / "a.jpg")
    src = tmp_path / "sg.jsonl"
    src.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
                    "images": ["imgs/a.jpg"], "system": "Be brief."}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "<image>Hi"}], "images": ["imgs/a.jpg"]}),
    ]) + "\n")
    rep = convert("sharegpt", src, tmp_path / "out" / "sg.jsonl")
    assert (rep.read, rep.written) == (3, 1)
    assert rep.skipped == {"invalid JSON": 1, "no assistant answer": 1}
    assert any("line 2" in e for e in rep.examples)
    (rec,) = rows(tmp_path / "out" / "sg.jsonl")
    assert rec["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rec["images"] == [os.path.join("..", "imgs", "a.jpg")]


def test_vqav2_pair_keeps_all_answers(tmp_path):
    jpg(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many?", "question_id": 420},
        {"image_id": 42, "question": "Orphan?", "question_id": 421}]}))
    answers = [{"answer": "2", "answer_id": i} for i in range(7)] + [{"answer": "two", "answer_id": 7 + i}
                                                                    for i in range(3)]
    a.write_text(json.dumps({"annotations": [{"question_id": 420, "image_id": 42, "answer_type": "number",
                                               "answers": answers}]}))
    out = tmp_path / "vqa.jsonl"
    rep = convert("vqav2", [a, q], out, images_root=tmp_path / "val2014")  # any order
    assert (rep.read, rep.written) == (2, 1) and rep.skipped == {"no annotation": 1}
    (rec,) = rows(out)
    assert len(rec["answers"]) == 10 and rec["metric"] == "vqa" and rec["type"] == "number"
    assert rec["images"] == [os.path.join("val2014", "COCO_val2014_000000000042.jpg")]
    assert rec["messages"][0]["content"].startswith("<image>How many?\n")
    # a custom prompt; a placeholder the format does not fill is a clear error
    convert("vqav2", [q, a], out, images_root=tmp_path / "val2014", prompt="Q: {question} A:")
    assert rows(out)[0]["messages"][0]["content"] == "<image>Q: How many? A:"
    with pytest.raises(ValueError, match="placeholder"):
        convert("vqav2", [q, a], out, images_root=tmp_path / "val2014", prompt="{nope}")
    with pytest.raises(ValueError, match="annotations"):
        convert("vqav2", [q], out)
    # a row whose value has the wrong type is skipped, not fatal
    q.write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": "forty-two", "question": "How many?", "question_id": 420}]}))
    rep = convert("vqav2", [q, a], out, images_root=tmp_path / "val2014")
    assert rep.written == 0 and rep.skipped == {"malformed row": 1}


def test_docvqa_and_pope(tmp_path):
    jpg(tmp_path / "documents" / "d1.png")
    src = tmp_path / "val_v1.0.json"
    src.write_text(json.dumps({"dataset_name": "docvqa", "data": [
        {"questionId": 1, "question": "Date?", "image": "documents/d1.png", "answers": ["1 May", "May 1"],
         "question_types": ["form"]},
        {"questionId": 2, "question": "Total?", "image": "documents/d1.png"}]}))
    rep = convert("docvqa", src, tmp_path / "doc.jsonl")
    assert rep.written == 1 and rep.skipped == {"no answers": 1}
    rec = rows(tmp_path / "doc.jsonl")[0]
    assert rec["answers"] == ["1 May", "May 1"] and rec["metric"] == "anls" and rec["type"] == "form"
    assert read_records(tmp_path / "doc.jsonl")[0].messages[0]["content"].startswith("<image>Date?")

    pope = tmp_path / "pope.jsonl"
    pope.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "image": "documents/d1.png", "text": "Is there a dog?", "label": "yes",
         "category": "adversarial"},
        {"question_id": 2, "image": "documents/d1.png", "text": "Is there a cat?", "label": "maybe"}]))
    rep = convert("pope", pope, tmp_path / "pope_out.jsonl")
    assert rep.written == 1 and rep.skipped == {"label not yes/no": 1}
    rec = rows(tmp_path / "pope_out.jsonl")[0]
    assert rec["answers"] == ["yes"] and rec["metric"] == "yesno" and rec["type"] == "adversarial"


def test_mmbench_tsv_base64_and_reused_images(tmp_path):
    b64 = base64.b64encode(png_bytes((9, 9, 9))).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(header),
             "\t".join(["10", "Which shape?", "nan", "square", "circle", "nan", "nan", "A", "shapes", b64]),
             "\t".join(["11", "Colour?", "Look closely.", "grey", "red", "blue", "", "C", "colour", "10"]),
             "\t".join(["12", "No answer", "", "x", "y", "", "", "", "misc", b64]),
             "\t".join(["13", "Bad image", "", "x", "y", "", "", "B", "misc", "!!notbase64!!"])]
    src = tmp_path / "mmbench.tsv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "mmb.jsonl"
    rep = convert("mmbench", src, out)
    assert (rep.read, rep.written, rep.images_written) == (4, 2, 1)
    assert rep.skipped == {"no answer": 1, "bad image field": 1}
    a, b = rows(out)
    assert a["choices"] == {"A": "square", "B": "circle"} and a["answers"] == ["A"] and a["metric"] == "mc"
    assert b["images"] == a["images"]  # row 11's image cell refers to row 10
    assert "Hint: Look closely." in b["messages"][0]["content"] and "C. blue" in b["messages"][0]["content"]
    assert b["type"] == "colour"


def test_authors_attention_builds_records_and_attention_dataset(tmp_path):
    from lavender.attnstore import AttentionStore

    def grey(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (32, 32), value).save(buf, format="PNG")
        return buf.getvalue()

    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_t), ("question", pa.string()), ("answers", pa.list_(pa.string())),
                        ("attention_images", pa.map_(pa.string(), image_t))])  # word -> map image
    src = tmp_path / "flickr1k.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"image": {"bytes": png_bytes(), "path": "1.jpg"}, "question": "What runs?", "answers": ["a dog"],
         "attention_images": [("dog", {"bytes": grey(255), "path": None}),
                              ("runs", {"bytes": grey(0), "path": None})]},
        {"image": {"bytes": png_bytes(), "path": "2.jpg"}, "question": "Q?", "answers": ["x"],
         "attention_images": []},
    ], schema=schema), src)
    out = tmp_path / "rec" / "f1k.jsonl"
    with pytest.raises(ValueError, match="attention-out"):
        convert("authors-attention", src, out)
    rep = convert("authors-attention", src, out, attention_out=tmp_path / "attn")
    assert (rep.read, rep.written) == (2, 1) and rep.skipped == {"no maps": 1}
    assert rep.attention["examples"] == 1
    (rec,) = rows(out)
    store = AttentionStore(tmp_path / "attn")
    ex = store.get(rec["id"])
    words = list(ex["words"])
    assert "dog" in words and "runs" in words
    maps = np.asarray(ex["maps"], dtype=np.float32)
    assert maps[words.index("dog")].mean() == pytest.approx(1.0, abs=0.02)
    assert maps[words.index("runs")].mean() == pytest.approx(0.0, abs=0.02)


def test_cli_convert_in_process(tmp_path, capsys):
    jpg(tmp_path / "a.jpg")
    src = tmp_path / "sg.json"
    src.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>Hi"},
                                             {"role": "assistant", "content": "Yo"}], "images": ["a.jpg"]}]))
    assert cli(["data", "convert", "--from", "sharegpt", "--in", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "read 1 rows, wrote 1 records" in capsys.readouterr().out
    assert cli(["data", "convert", "--from", "llava", "--in", str(src), "--out", str(tmp_path / "o.jsonl"),
                "--prompt", "x"]) == 2
    assert "--prompt does not apply" in capsys.readouterr().err
    assert set(CONVERTERS) >= {"flickr30k", "rlaif-v", "ocrvqa", "llava", "sharegpt", "authors-attention",
                               "vqav2", "docvqa", "mmbench", "pope"}


def test_hf_save_to_disk_with_decoded_images_and_strict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"images": [[Image.new("RGB", (16, 16), (1, 2, 3))], [Image.new("RGB", (16, 16))]],
         "texts": [[{"user": "Title?", "assistant": "Shapes.", "source": "ocrvqa"}], []]},
        features=datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                    "texts": [{"user": datasets.Value("string"),
                                               "assistant": datasets.Value("string"),
                                               "source": datasets.Value("string")}]}))
    ds.save_to_disk(str(tmp_path / "cauldron"))
    rep = convert("ocrvqa", tmp_path / "cauldron", tmp_path / "ov.jsonl")
    assert (rep.read, rep.written, rep.images_written) == (2, 1, 1) and rep.skipped == {"no conversation": 1}
    with Image.open(tmp_path / rows(tmp_path / "ov.jsonl")[0]["images"][0]) as im:
        assert im.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="row 1: no conversation"):
        convert("ocrvqa", tmp_path / "cauldron", tmp_path / "ov.jsonl", strict=True)
