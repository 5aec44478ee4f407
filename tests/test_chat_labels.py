"""Chat rendering, assistant-only labels and the collator's word rows, on every family's real processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.attnstore import AttentionWriter
from lavender.chat import IGNORE_INDEX, layout, to_conversation
from lavender.config import AlignmentConfig
from lavender.data_collator import LavenderCollator
from lavender.records import read_records
from lavender.vlm.families import families
from lavender.words import split_words

ARCHS = sorted(families())  # every registered family, with no list to keep in sync


def test_to_conversation_places_images_where_the_tags_are() -> None:
    conv = to_conversation([{"role": "user", "content": "<image>What is it?"},
                            {"role": "assistant", "content": "a cat"}])
    assert conv[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert conv[1]["content"] == [{"type": "text", "text": "a cat"}]


def _write_records(tmp_path, answers: list[str], with_maps: bool = True):
    (tmp_path / "img").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    writer = AttentionWriter(tmp_path / "attn", {"map_size": 32, "frame": "squash"})
    for i, ans in enumerate(answers):
        Image.fromarray(rng.integers(0, 255, (48, 64 + 8 * i, 3), dtype=np.uint8)).save(tmp_path / f"img/{i}.png")
        rows.append({"id": f"s{i}", "images": [f"img/{i}.png"],
                     "messages": [{"role": "user", "content": "<image>What is in the picture?"},
                                  {"role": "assistant", "content": ans}]})
        if with_maps:
            ws = split_words(ans)
            writer.add(f"s{i}", [w.text for w in ws], [(w.start, w.end) for w in ws],
                       rng.random((len(ws), 32, 32)).astype("float32"))
    writer.close()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(path), tmp_path / "attn"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_are_the_assistant_turn_only(tiny_vlm, tmp_path, arch: str, padding_side: str) -> None:
    from lavender.attnstore import AttentionStore
    from lavender.vlm.load import load_vlm

    model, proc, fam = load_vlm(tiny_vlm(arch))
    proc.tokenizer.padding_side = padding_side
    answers = ["a red circle", "the blue square is left of a green ring"]
    recs, attn = _write_records(tmp_path, answers)
    col = LavenderCollator(proc, fam, model.config, AttentionStore(attn), fam.default_layers(model))
    batch = col(recs)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = proc.tokenizer
    for b, ans in enumerate(answers):
        lab = labels[b][labels[b] != IGNORE_INDEX]
        # the labelled tokens are exactly the answer followed by the template's end-of-turn marker
        text = tok.decode(lab, skip_special_tokens=True)
        assert " ".join(split_words(text.lower())[i].text for i in range(len(split_words(text)))) == \
            " ".join(w.text for w in split_words(ans.lower()))
        assert tok.decode(lab[-1:]).strip() != "", "the end-of-turn marker is trained so the model stops"
        # padding and prompt are -100
        assert (labels[b][mask[b] == 0] == IGNORE_INDEX).all()
        first_label = int((labels[b] != IGNORE_INDEX).nonzero()[0])
        prompt = tok.decode(ids[b][:first_label], skip_special_tokens=True).lower()
        assert "picture" in prompt and "picture" not in text.lower()
    # each aligned word's row predicts that word's first token (row-owner next)
    align = batch["lavender"]
    assert align.n_matched == sum(len(split_words(a)) for a in answers)
    for b in range(len(answers)):
        for w in align.rows.words[b]:
            nxt = tok.decode(ids[b][w.rows[0] + 1]).strip().lower()
            assert w.text.lower().startswith(nxt), (w.text, nxt)


def test_query_rows_are_the_words_own_tokens(tiny_vlm, tmp_path) -> None:
    from lavender.attnstore import AttentionStore
    from lavender.vlm.load import load_vlm

    model, proc, fam = load_vlm(tiny_vlm("llava"))
    recs, attn = _write_records(tmp_path, ["a red circle"])
    nxt = LavenderCollator(proc, fam, model.config, AttentionStore(attn), [0], AlignmentConfig(row_owner="next"))(recs)
    qry = LavenderCollator(proc, fam, model.config, AttentionStore(attn), [0], AlignmentConfig(row_owner="query"))(recs)
    rows_next = [w.rows for w in nxt["lavender"].rows.words[0]]
    rows_query = [w.rows for w in qry["lavender"].rows.words[0]]
    assert rows_query == [[r + 1 for r in rs] for rs in rows_next]
    ids = qry["input_ids"][0]
    assert [proc.tokenizer.decode(ids[rs[0]]).strip() for rs in rows_query] == ["a", "red", "circle"]


def test_record_without_maps_still_trains_lvlm(tiny_vlm, tmp_path) -> None:
    from lavender.attnstore import AttentionStore
    from lavender.vlm.load import load_vlm

    model, proc, fam = load_vlm(tiny_vlm("mllama"))
    recs, attn = _write_records(tmp_path, ["a red circle"], with_maps=False)
    batch = LavenderCollator(proc, fam, model.config, AttentionStore(attn), [1])(recs)
    assert batch["lavender"].n_matched == 0 and batch["lavender"].n_words == 3
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_layout_rejects_nothing_and_finds_regions(tiny_vlm) -> None:
    from lavender.vlm.load import load_vlm

    _, proc, _ = load_vlm(tiny_vlm("qwen2_vl"))
    lay = layout(proc, [{"role": "user", "content": "<image>What colour?"},
                        {"role": "assistant", "content": "red"}])
    texts = [lay.text[r.start:r.end] for r in lay.regions]
    assert texts == ["What colour?", "red"]
    assert len(lay.label_spans) == 1 and lay.text[lay.label_spans[0][0]:].startswith("red")


def test_unreadable_image_is_skipped_and_counted(tiny_vlm, tmp_path) -> None:
    from lavender.attnstore import AttentionStore
    from lavender.vlm.load import load_vlm

    model, proc, fam = load_vlm(tiny_vlm("llava"))
    recs, attn = _write_records(tmp_path, ["a red circle", "a blue square"])
    (tmp_path / "img/1.png").write_bytes(b"not a png")
    col = LavenderCollator(proc, fam, model.config, AttentionStore(attn), [0])
    batch = col(recs)
    assert batch["input_ids"].shape[0] == 1
    assert col.skipped and col.skipped[0][0] == "s1"
    assert torch.is_tensor(batch["labels"])
