"""Words ↔ rows: sub-words, repeats, punctuation, and the off-by-one of docs/pitfalls.md #3 both ways."""

from __future__ import annotations

import pytest
import torch

from lavender.vlm.families import families
from lavender.vlm.rows import (
    batch_rows,
    candidate_tokens,
    rows_for_batch,
    sample_word_rows,
)

# "the dogs run, the dogs sit." tokenised by hand: "dogs" is two tokens (dog + s)
TEXT = "the dogs run, the dogs sit."
OFFSETS = [(0, 3), (4, 7), (7, 8), (9, 12), (12, 13), (14, 17), (18, 21), (21, 22), (23, 26), (26, 27)]


# An independent oracle for the tests (the library's one path is lavender.chat.layout):
def offsets_from_plain(tokenizer: object, texts: list[str], input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Character offsets into ``texts`` for a processor's ``input_ids``, robust to placeholder expansion.

    Processors of LLaVA, Qwen2-VL and Idefics3 expand each image placeholder into many tokens in
    the string before tokenising, so the offsets they return point into a string the caller never
    sees. Here ``texts`` is tokenised plainly (no expansion, no added specials) and its tokens are
    matched in order as a subsequence of ``input_ids``: every token the processor inserted
    (expanded placeholders, BOS, padding) gets ``(0, 0)``, i.e. belongs to no word.

    Raises:
        ValueError naming the sample when a plain token cannot be found in order (a different
        tokenisation, e.g. a text that is not the one the processor saw).
    """
    out = []
    for b, text in enumerate(texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        plain, plain_off = enc["input_ids"], enc["offset_mapping"]
        ids = input_ids[b].tolist()
        offs = [(0, 0)] * len(ids)
        j = 0
        for i, tok in enumerate(ids):
            if j < len(plain) and tok == plain[j]:
                offs[i] = tuple(plain_off[j])
                j += 1
        if j < len(plain):
            raise ValueError(f"sample {b}: token {j} of its text ({plain[j]}) was not found in input_ids in order; "
                             "pass the exact text given to the processor")
        out.append(offs)
    return out



def test_query_rows_are_the_words_own_tokens() -> None:
    words = sample_word_rows(TEXT, OFFSETS, [True] * 10, row_owner="query")
    assert [(w.text, w.rows) for w in words] == [
        ("the", [0]), ("dogs", [1, 2]), ("run", [3]), ("the", [5]), ("dogs", [6, 7]), ("sit", [8])]


def test_next_rows_are_one_before_each_token() -> None:
    words = sample_word_rows(TEXT, OFFSETS, [True] * 10, row_owner="next")
    # the first word has no row before it (row -1 does not exist) and is dropped
    assert [(w.text, w.rows) for w in words] == [
        ("dogs", [0, 1]), ("run", [2]), ("the", [4]), ("dogs", [5, 6]), ("sit", [7])]


def test_candidates_and_first_row_restrict_words() -> None:
    cand = [False] * 5 + [True] * 5  # only the second clause is "answer"
    words = sample_word_rows(TEXT, OFFSETS, cand, row_owner="next")
    assert [(w.text, w.rows, w.start) for w in words] == [("the", [4], 14), ("dogs", [5, 6], 18), ("sit", [7], 23)]
    words = sample_word_rows(TEXT, OFFSETS, cand, row_owner="next", first_row=6)
    assert [(w.text, w.rows) for w in words] == [("dogs", [6]), ("sit", [7])]
    with pytest.raises(ValueError, match="row-owner"):
        sample_word_rows(TEXT, OFFSETS, cand, row_owner="argmax")


def test_batch_rows_pads_and_maps_columns() -> None:
    a = sample_word_rows(TEXT, OFFSETS, [True] * 10, row_owner="query")
    b = sample_word_rows("dogs", [(0, 3), (3, 4)], [True, True], row_owner="query")
    batch = batch_rows([a, b, []])
    assert batch.rows.shape == (3, 8)  # sample 0: 10 tokens, "," and "." belong to no word
    assert batch.row_valid.sum(dim=1).tolist() == [8, 2, 0]
    for b_idx, words in enumerate(batch.words):
        for word, cols in zip(words, batch.word_columns[b_idx]):
            assert batch.rows[b_idx, cols].tolist() == word.rows


def _llava_batch(tiny_llava_dir: str, padding_side: str):
    fam = families()["llava"]
    proc = fam.load_processor(tiny_llava_dir)
    proc.tokenizer.padding_side = padding_side
    from PIL import Image

    answers = ["a big red circle", "two blue squares left of the red star"]
    texts, starts = [], []
    for ans in answers:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is red?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": ans}]}]
        t = proc.apply_chat_template(msgs, tokenize=False)
        texts.append(t)
        starts.append(t.index(ans))
    imgs = [Image.new("RGB", (56, 56)), Image.new("RGB", (40, 60))]
    inputs = proc(images=imgs, text=texts, padding=True, return_tensors="pt")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llava_dir)
    offsets = offsets_from_plain(proc.tokenizer, texts, inputs["input_ids"])
    # labels: the answer's tokens (what a collator would mark), found from the offsets independently
    labels = torch.full_like(inputs["input_ids"], -100)
    for b, s in enumerate(starts):
        for i, (a, e) in enumerate(offsets[b]):
            if e > a and a >= s and e <= s + len(answers[b]):
                labels[b, i] = inputs["input_ids"][b, i]
    return fam, proc, inputs, texts, offsets, labels, answers, config


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pitfall3_next_row_precedes_the_label_token(tiny_llava_dir: str, padding_side: str) -> None:
    fam, proc, inputs, texts, offsets, labels, answers, config = _llava_batch(tiny_llava_dir, padding_side)
    ids = inputs["input_ids"]
    nxt = rows_for_batch(texts, offsets, ids, fam, config, attention_mask=inputs["attention_mask"], labels=labels,
                         align_on="answer", row_owner="next")
    qry = rows_for_batch(texts, offsets, ids, fam, config, attention_mask=inputs["attention_mask"], labels=labels,
                         align_on="answer", row_owner="query")
    for b in range(2):
        assert [w.text for w in nxt.words[b]] == answers[b].split()
        for wn, wq in zip(nxt.words[b], qry.words[b]):
            # next: the token AFTER each row is the label word; query: the row itself is the word
            assert proc.tokenizer.decode(ids[b, [r + 1 for r in wn.rows]]).replace(" ", "") == wn.text
            assert proc.tokenizer.decode(ids[b, wq.rows]).replace(" ", "") == wq.text
            assert wn.rows == [r - 1 for r in wq.rows]
            assert all(labels[b, r + 1] != -100 for r in wn.rows)


def test_align_on_all_skips_image_tokens_and_text_before_image(tiny_llava_dir: str) -> None:
    fam, proc, inputs, texts, offsets, labels, answers, config = _llava_batch(tiny_llava_dir, "right")
    ids = inputs["input_ids"]
    image = ids == proc.tokenizer.convert_tokens_to_ids("<image>")  # independent of the family code
    cand = candidate_tokens(ids, inputs["attention_mask"], None, image, align_on="all")
    first_image = int(torch.nonzero(image[0])[0])
    assert not cand[0, : first_image + 1].any() and not (cand & image).any()
    batch = rows_for_batch(texts, offsets, ids, fam, config, attention_mask=inputs["attention_mask"],
                           align_on="all", row_owner="query")
    words = [w.text for w in batch.words[0]]
    assert words[:3] == ["what", "is", "red"] and "user" not in words and "image" not in words
    with pytest.raises(ValueError, match="labels"):
        candidate_tokens(ids, None, None, image, align_on="answer")


def test_mllama_rows_before_the_image_are_dropped(tiny_mllama_dir: str) -> None:
    from transformers import AutoConfig

    fam = families()["mllama"]
    proc = fam.load_processor(tiny_mllama_dir)
    config = AutoConfig.from_pretrained(tiny_mllama_dir)
    from PIL import Image

    text = "red star <|image|>a red star"
    inputs = proc(images=[[Image.new("RGB", (56, 56))]], text=[text], return_tensors="pt")
    offsets = offsets_from_plain(proc.tokenizer, [text], inputs["input_ids"])
    batch = rows_for_batch([text], offsets, inputs["input_ids"], fam, config, align_on="all", row_owner="query")
    first = int(fam.first_text_row(inputs["input_ids"], config)[0])
    assert [w.text for w in batch.words[0]] == ["a", "red", "star"]  # the "red star" before the image is out
    assert all(r > first for w in batch.words[0] for r in w.rows)
