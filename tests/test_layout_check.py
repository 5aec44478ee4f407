"""The layout check: on each family's RELEASED chat format and tokenizer (lavender.vlm.formats), the
collator trains exactly the assistant tokens plus the end-of-turn marker and aligns exactly the
words it should, with rows that spell them — checked WITHOUT ``lavender.chat.layout``: the expected
labels are the answers' own text, decoded from the batch; the expected words come from the messages.

Conversations: single and multi-turn, a system message, an image in a later turn, an image in the
middle of the question, a one-letter multiple-choice answer, an answer word repeated in the
question, a one-word answer with punctuation. Left and right padding; ``--align-on answer`` and
``all``; ``--row-owner next`` and ``query``.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pytest
from PIL import Image

from lavender.attnstore import AttentionStore, AttentionWriter
from lavender.config import AlignmentConfig
from lavender.data_collator import LavenderCollator
from lavender.records import Record
from lavender.vlm.families import families
from lavender.vlm.formats import TEMPLATES, build_tiny_real_format
from lavender.words import split_words

FAMILIES = sorted(TEMPLATES)
# the text the released template writes right after an assistant message (LLaVA-1.5: none; the
# tokenizer's EOS is trained instead, as LLaVA-1.5 was trained)
END_OF_TURN = {"mllama": "<|eot_id|>", "llava": "</s>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>",
               "gemma3": "<end_of_turn>", "qwen3_vl": "<|im_end|>", "paligemma": "<eos>",
               "minicpmv": "<|im_end|>", "llava_onevision": "<|im_end|>",
               "internvl": "<|im_end|>", "llava_next": "</s>"}

U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "single": [(U, "<image>What colour is the circle?"), (A, "Red circle and a blue square.")],
    "one_word_punct": [(U, "<image>What colour is the circle?"), (A, "Red.")],
    "mc_letter": [(U, "<image>Which one is red? A. circle B. square"), (A, "A")],
    "repeated": [(U, "<image>Is the circle red or blue?"), (A, "red")],
    "image_mid": [(U, "What is <image> this shape?"), (A, "A square.")],
    "multi_turn": [(U, "<image>What colour is the circle?"), (A, "Red."), (U, "And the square?"), (A, "Blue.")],
    "later_image": [(U, "Is it red?"), (A, "No."), (U, "<image>What colour is the circle?"), (A, "Green.")],
    "system": [(S, "Answer in one word."), (U, "<image>What colour is the square?"), (A, "Blue.")],
}


def _image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


@cache
def _model(family: str):
    return build_tiny_real_format(family)


def _records(img: str) -> list[Record]:
    out = []
    for i, (name, turns) in enumerate(CONVERSATIONS.items()):
        msgs = [{"role": r, "content": c} for r, c in turns]
        n_img = sum(c.count("<image>") for _, c in turns)
        words = [w.text for _, c in turns for w in split_words(c.replace("<image>", " "))]
        out.append(Record(id=name, index=i, images=[img] * n_img, messages=msgs, align_text=" ".join(words)))
    return out


def _store(tmp_path, records: list[Record]) -> AttentionStore:
    writer = AttentionWriter(tmp_path / "attn", {"map_size": 8, "frame": "squash"})
    for r in records:
        ws = split_words(r.align_text)
        writer.add(r.id, [w.text for w in ws], [(w.start, w.end) for w in ws], np.ones((len(ws), 8, 8), "float32"))
    writer.close()
    return AttentionStore(tmp_path / "attn")


def _expected_words(rec: Record, align_on: str, family: str) -> list[str]:
    """The words read: the last assistant turns' (answer) or all text (all) after the LAST image.
    LLaVA-1.5's released template writes a message's images before its text, wherever they were."""
    turns = [(m["role"], m["content"]) for m in rec.messages]
    if family == "paligemma":  # PaliGemma's processor puts every image before all the text
        return [w.text for r, c in turns if align_on == "all" or r == "assistant"
                for w in split_words(c.replace("<image>", " "))]
    if family in ("llava", "llava_onevision", "llava_next"):
        turns = [(r, "<image>" * c.count("<image>") + c.replace("<image>", "")) for r, c in turns]
    last = max(i for i, (_, c) in enumerate(turns) if "<image>" in c)
    after = [(r, c.rsplit("<image>", 1)[1] if i == last else c) for i, (r, c) in enumerate(turns) if i >= last]
    return [w.text for r, c in after if align_on == "all" or r == "assistant" for w in split_words(c)]


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_labels_are_exactly_the_answers_and_their_end_of_turn(family, padding, tmp_path_factory) -> None:
    model, proc = _model(family)
    proc.tokenizer.padding_side = padding
    recs = _records(_image_path(tmp_path_factory))
    coll = LavenderCollator(proc, families()[family], model.config)
    batch = coll(recs)
    skipped = {i for i, _ in coll.skipped}
    # the released Llama-3.2-Vision template refuses a system message with an image: skipped, counted
    assert skipped == ({"system"} if family == "mllama" else set())
    kept = [r for r in recs if r.id not in skipped]
    eot = END_OF_TURN[family]
    for b, rec in enumerate(kept):
        trained = proc.tokenizer.decode(batch["input_ids"][b][batch["labels"][b] != -100])
        want = "".join(m["content"] + eot for m in rec.messages if m["role"] == "assistant")
        assert _squash(trained) == _squash(want), (family, padding, rec.id, trained)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding,align_on,owner", [("right", "answer", "next"), ("left", "answer", "query"),
                                                    ("left", "all", "next"), ("right", "all", "query")])
def test_aligned_words_are_found_and_their_rows_spell_them(family, padding, align_on, owner,
                                                           tmp_path, tmp_path_factory) -> None:
    model, proc = _model(family)
    proc.tokenizer.padding_side = padding
    recs = _records(_image_path(tmp_path_factory))
    fam = families()[family]
    coll = LavenderCollator(proc, fam, model.config, _store(tmp_path, recs), [0],
                            AlignmentConfig(align_on=align_on, row_owner=owner))
    batch = coll(recs)
    align = batch["lavender"]
    kept = [r for r in recs if r.id not in {i for i, _ in coll.skipped}]
    first = fam.first_text_row(batch["input_ids"], model.config)
    for b, rec in enumerate(kept):
        got = align.rows.words[b]
        want = _expected_words(rec, align_on, family)
        assert [w.text for w in got] == want, (family, rec.id, [w.text for w in got])
        for w in got:
            pos = [r + (1 if owner == "next" else 0) for r in w.rows]
            assert all(r >= int(first[b]) for r in w.rows)
            spelled = proc.tokenizer.decode(batch["input_ids"][b][pos])
            # the word's tokens (a token may carry the space before it or punctuation after it: '▁square.')
            assert _squash(w.text).lower() in _squash(spelled).lower(), (family, rec.id, w.text, spelled)


# What the released templates render for [user "<image>What colour is the circle?", assistant "Red."],
# and the tokens of the answer turn (a word's token carries the space before it where the text has one)
RENDERED = {
    "mllama": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What colour is the circle?"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"),
    "llava": "USER: <image>\nWhat colour is the circle? ASSISTANT: Red. ",
    "qwen2_vl": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                 "<|image_pad|><|vision_end|>What colour is the circle?<|im_end|>\n<|im_start|>assistant\nRed."
                 "<|im_end|>\n"),
    "idefics3": ("<|begin_of_text|>User:<image>What colour is the circle?<end_of_utterance>\nAssistant: Red."
                 "<end_of_utterance>\n"),
    "gemma3": ("<bos><start_of_turn>user\n<start_of_image>What colour is the circle?<end_of_turn>\n"
               "<start_of_turn>model\nRed.<end_of_turn>\n"),
    "qwen3_vl": ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the circle?"
                 "<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n"),
    "paligemma": "<image><bos>What colour is the circle?\nRed.<eos>",
    "minicpmv": ("<|im_start|>user\n<|image_pad|>What colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
                 "Red.<|im_end|>\n"),
    "llava_onevision": ("<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
                        "Red.<|im_end|>\n"),
    "llava_next": "[INST] <image>\nWhat colour is the circle? [/INST] Red.</s> ",
    "internvl": ("<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
                 "Red.<|im_end|>\n"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_rendered_text_is_the_released_format(family) -> None:
    from lavender.chat import render

    _, proc = _model(family)
    msgs = [{"role": "user", "content": "<image>What colour is the circle?"}, {"role": "assistant", "content": "Red."}]
    assert render(proc, msgs) == RENDERED[family]
    tokens = proc.tokenizer.tokenize(" colour is")
    assert tokens[0] in ("Ġcolour", "▁colour"), tokens  # the space is part of the word's token


def test_tiny_vlm_real_format_round_trips(tmp_path) -> None:
    from lavender.chat import render
    from lavender.cli import main
    from lavender.vlm.load import load_vlm

    assert main(["tiny-vlm", "--arch", "mllama", str(tmp_path / "m"), "--real-format"]) == 0
    _, proc, _ = load_vlm(str(tmp_path / "m"))
    msgs = [{"role": "user", "content": "<image>What colour is the circle?"}, {"role": "assistant", "content": "Red."}]
    assert render(proc, msgs) == RENDERED["mllama"]
