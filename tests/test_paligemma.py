"""PaliGemma's prefix-LM: the answer is the causal suffix, never inside the bidirectional prefix.

PaliGemma's language model attends BIDIRECTIONALLY over the prefix (``token_type_ids`` 0: images,
``<bos>``, prompt, ``\\n``) and causally over the suffix (``token_type_ids`` 1). A trained token inside
the prefix would be visible to the row that predicts it. These tests read the model's own eager
attention on batches the collator made (released-format tokenizer, several conversation shapes,
both paddings) and check where the answer landed; the capture is compared with eager on rows INSIDE
the prefix, where the bidirectional mask matters (the generic capture test reads answer rows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.data_collator import LavenderCollator
from lavender.records import Record
from lavender.vlm.families import families

FAM = families()["paligemma"]
CONVERSATIONS = {
    "single": [("user", "<image>What colour is the circle?"), ("assistant", "Red circle and a blue square.")],
    "multi_turn": [("user", "<image>What colour is the circle?"), ("assistant", "Red."),
                   ("user", "And the square?"), ("assistant", "Blue.")],
    "later_image": [("user", "Is it red?"), ("assistant", "No."), ("user", "<image>What colour?"),
                    ("assistant", "Green.")],
    "system": [("system", "Answer in one word."), ("user", "<image>What colour is the square?"),
               ("assistant", "Blue.")],
}


@pytest.fixture(scope="module")
def tiny():
    from lavender.vlm.formats import build_tiny_real_format

    model, proc = build_tiny_real_format("paligemma")
    model.eval()
    return model, proc


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[Record]:
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    out = []
    for i, (name, turns) in enumerate(CONVERSATIONS.items()):
        n_img = sum(c.count("<image>") for _, c in turns)
        out.append(Record(id=name, index=i, images=[str(path)] * n_img,
                          messages=[{"role": r, "content": c} for r, c in turns]))
    return out


def _eager(model, batch: dict, **override) -> tuple[torch.Tensor, ...]:
    model.set_attn_implementation("eager")
    inputs = {k: v for k, v in batch.items() if k != "lavender"}
    inputs.update(override)
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


@pytest.mark.parametrize("padding", ["right", "left"])
def test_a_label_token_sees_no_later_token_and_no_earlier_row_sees_it(tiny, records, padding) -> None:
    model, proc = tiny
    proc.tokenizer.padding_side = padding
    batch = LavenderCollator(proc, FAM, model.config)(records)
    labels, types, real = batch["labels"], batch["token_type_ids"], batch["attention_mask"].bool()
    attentions = _eager(model, batch)
    image = model.config.image_token_id
    for b in range(labels.shape[0]):
        trained = (labels[b] != -100).nonzero().flatten()
        assert trained.numel() > 0
        first, last_real = int(trained[0]), int(real[b].nonzero().max())
        # the suffix starts exactly at the first trained token and runs to the end of the text
        assert types[b, first:last_real + 1].eq(1).all() and types[b, :first][real[b, :first]].eq(0).all()
        prefix_end = first - 1  # the prefix's "\n"
        image_rows = (batch["input_ids"][b] == image).nonzero().flatten()
        for layer, attn in enumerate(attentions):
            for t in trained.tolist():
                assert attn[b, :, t, t + 1:].abs().sum() == 0, (padding, b, layer, t)  # nothing later
                assert attn[b, :, :t, t].abs().sum() == 0, (padding, b, layer, t)  # no earlier row sees it
            # ... while the prefix IS bidirectional: an image token sees the prompt's last token
            assert attn[b, :, int(image_rows[0]), prefix_end].min() > 0


def test_the_check_catches_an_answer_inside_the_prefix(tiny, records) -> None:
    """Control: with ``token_type_ids`` all 0 (the answer in the prefix, the bug) the row before a label
    token attends to it — the assertion above would fail."""
    model, proc = tiny
    proc.tokenizer.padding_side = "right"
    batch = LavenderCollator(proc, FAM, model.config)(records[:1])
    t = int((batch["labels"][0] != -100).nonzero()[0])
    attentions = _eager(model, batch, token_type_ids=torch.zeros_like(batch["token_type_ids"]))
    assert attentions[0][0, :, t - 1, t].min() > 0


def test_capture_equals_eager_on_prefix_rows(tiny, records) -> None:
    """Rows inside the bidirectional prefix (image tokens, prompt words) see LATER keys; the capture's
    slice equals the eager probabilities there too, at batch 2 with left padding."""
    from lavender.vlm.aggregate import keys_from_grids
    from lavender.vlm.backend import CapturePlan, disable_capture, enable_capture

    model, proc = tiny
    proc.tokenizer.padding_side = "left"
    recs = [records[0], records[3]]
    batch = LavenderCollator(proc, FAM, model.config)(recs)
    attentions = _eager(model, batch)
    sizes = [[(60, 40)] for _ in recs]
    grids = FAM.image_grids(batch, sizes, model.config, proc)
    keys, key_valid, _ = keys_from_grids(grids, len(recs))
    rows = []
    for b in range(len(recs)):
        first = int((batch["labels"][b] != -100).nonzero()[0])
        img = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        rows.append([int(img[0]), int(img[5]), first - 3, first - 1])  # image rows and prompt rows
    rows_t = torch.tensor(rows)
    layers = FAM.default_layers(model)
    model.set_attn_implementation("sdpa")
    capture = enable_capture(model, FAM)
    capture.arm(CapturePlan(layers, rows_t, torch.ones_like(rows_t, dtype=torch.bool), keys, key_valid))
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "lavender"})
    for layer in layers:
        want = torch.stack([attentions[layer][b][:, rows_t[b]][:, :, keys[b]] for b in range(len(recs))])
        got = capture.maps[layer]
        assert (got - want).abs().max() < 1e-5
        # a prefix row attends to image keys AFTER it (bidirectional), so the test is about the prefix mask
        assert want[:, :, 0, -1].min() > 0
    disable_capture(model, FAM)


def test_a_generation_prompt_is_all_prefix(tiny) -> None:
    from lavender.chat import render

    model, proc = tiny
    text = render(proc, [{"role": "user", "content": "<image>What colour is the circle?"}], add_generation_prompt=True)
    assert text == "<image><bos>What colour is the circle?\n"
    image = Image.new("RGB", (30, 20))
    enc = FAM.encode(proc, [text], [[image]], return_tensors="pt")
    tokens = proc.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[:16] == ["<image>"] * 16 and tokens[16] == "<bos>" and tokens.count("<bos>") == 1
    assert tokens[-1] == "\n" and enc["token_type_ids"].eq(0).all()


def test_encode_refuses_text_it_cannot_split(tiny) -> None:
    _, proc = tiny
    image = Image.new("RGB", (30, 20))
    with pytest.raises(ValueError, match="PALIGEMMA_TEMPLATE"):
        FAM.encode(proc, ["<image>USER: hi ASSISTANT: Red.</s>"], [[image]], [22])
    with pytest.raises(ValueError, match="mixes prompts"):
        FAM.encode(proc, ["<image><bos>a\nb<eos>", "<image><bos>a\n"], [[image], [image]], [11, None])


def test_generation_feeds_the_released_prefix(tiny, monkeypatch) -> None:
    """``lavender generate``/``eval`` go through the family too: the model is fed images, ONE <bos>, the
    prompt and its newline, all prefix — not the processor's additions on top of the template's."""
    from lavender.generation import generate

    model, proc = tiny
    model.set_attn_implementation("sdpa")
    seen = []
    original = model.generate

    def spy(**batch):
        seen.append(batch)
        return original(**batch)

    monkeypatch.setattr(model, "generate", spy)
    prompts = [([{"role": "user", "content": "<image>What is it?" + " please" * i}],
                [Image.new("RGB", (30 + 10 * i, 20))]) for i in range(2)]
    generate(model, proc, prompts, max_new_tokens=2, batch_size=2)
    (batch,) = seen
    for b in range(2):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
        tokens = proc.tokenizer.convert_ids_to_tokens(ids)
        assert tokens[:17] == ["<image>"] * 16 + ["<bos>"] and tokens.count("<bos>") == 1 and tokens[-1] == "\n"
    assert batch["token_type_ids"].eq(0).all()


def test_a_released_processor_without_chat_template_gets_the_family_template(tmp_path) -> None:
    """Released PaliGemma / PaliGemma 2 folders ship no chat template; loading through the family (or
    ``load_vlm``) attaches :data:`PALIGEMMA_TEMPLATE`, so the collator and ``generate`` work on them."""
    import json
    import os

    from lavender.generation import generate
    from lavender.vlm.families.paligemma import PALIGEMMA_TEMPLATE
    from lavender.vlm.formats import build_tiny_real_format
    from lavender.vlm.load import load_vlm
    from lavender.vlm.tiny import save_tiny

    out = tmp_path / "pg"
    save_tiny(*build_tiny_real_format("paligemma"), str(out))
    # strip every copy of the template, as in a released folder
    for name in os.listdir(out):
        if name.endswith(".jinja") or name == "chat_template.json":
            os.remove(out / name)
        elif name.endswith(".json"):
            cfg = json.loads((out / name).read_text())
            if isinstance(cfg, dict) and "chat_template" in cfg:
                del cfg["chat_template"]
                (out / name).write_text(json.dumps(cfg))
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(str(out)).chat_template is None  # the released situation
    model, proc, fam = load_vlm(str(out))
    assert fam is FAM and proc.chat_template == PALIGEMMA_TEMPLATE == proc.tokenizer.chat_template
    path = tmp_path / "x.png"
    Image.new("RGB", (60, 40), (200, 10, 10)).save(path)
    rec = Record(id="a", index=0, images=[str(path)],
                 messages=[{"role": "user", "content": "<image>caption en"}, {"role": "assistant", "content": "A cat."}])
    collator = LavenderCollator(proc, FAM, model.config)
    batch = collator([rec])
    assert not collator.skipped and (batch["labels"] != -100).any()
    model.eval()
    (answer,) = generate(model, proc, [(rec.messages[:1], [Image.open(path)])], max_new_tokens=2)
    assert isinstance(answer, str)


def test_records_the_prefix_lm_cannot_take_are_skipped_one_by_one(tiny, records) -> None:
    """A record without an answer, without an image, or whose answer would sit in the prefix is skipped
    with a one-line reason (counted in ``collator.skipped``); the rest of the batch trains. A trailing
    user turn (after the last answer) is cut: it holds no label, and being causal after every label it
    changes nothing the loss sees — the record trains exactly as without it."""
    model, proc = tiny
    proc.tokenizer.padding_side = "right"
    image = records[0].images[0]

    def rec(name, turns, n_images=1):
        return Record(id=name, index=0, images=[image] * n_images,
                      messages=[{"role": r, "content": c} for r, c in turns])

    good = rec("good", [("user", "<image>What?"), ("assistant", "Red.")])
    trailing = rec("trailing", [("user", "<image>What?"), ("assistant", "Red."), ("user", "And?")])
    bad = [rec("no_answer", [("user", "<image>What?")]),
           rec("no_image", [("user", "What colour?"), ("assistant", "Red.")], 0),
           rec("answer_first", [("assistant", "Red."), ("user", "<image>What?"), ("assistant", "Blue.")]),
           rec("image_after_answer", [("user", "<image>What?"), ("assistant", "Red."), ("user", "<image>And?")], 2)]
    collator = LavenderCollator(proc, FAM, model.config)
    batch = collator([good, *bad, trailing])
    assert [i for i, _ in collator.skipped] == [r.id for r in bad]
    assert all("\n" not in why and why.startswith("paligemma:") for _, why in collator.skipped)
    reasons = dict(collator.skipped)
    assert "no answer" in reasons["no_answer"] and "no image" in reasons["no_image"]
    assert "prompt must be" in reasons["answer_first"] and "after the last answer" in reasons["image_after_answer"]
    assert batch["input_ids"].shape[0] == 2
    alone = LavenderCollator(proc, FAM, model.config)([good])
    n = alone["input_ids"].shape[1]
    for key in ("input_ids", "labels", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[key][1, :n], alone[key][0]) and torch.equal(batch[key][0, :n], alone[key][0])
    with pytest.raises(ValueError, match="every record of this batch is unusable"):
        LavenderCollator(proc, FAM, model.config)(bad)


def test_encode_and_generate_refuse_a_sample_without_an_image(tiny) -> None:
    """PaliGemma's processor puts a text-only sample's <bos> inside the prompt, silently; refused."""
    from lavender.generation import generate

    model, proc = tiny
    image = Image.new("RGB", (30, 20))
    with pytest.raises(ValueError, match="paligemma: sample 1 has no image"):
        FAM.encode(proc, ["<image><bos>What?\n", "<bos>What colour?\n"], [[image], []], return_tensors="pt",
                   padding=True)
    with pytest.raises(ValueError, match="has no image"):
        generate(model, proc, [([{"role": "user", "content": "What colour?"}], [])], max_new_tokens=1)


def test_soft_capping_the_capture_ignores_is_warned_once(caplog, monkeypatch) -> None:
    """PaliGemma 2's Gemma-2 text config sets ``attn_logit_softcapping`` (50), applied by transformers in eager
    attention only; the capture backend (SDPA outputs, captured maps) does not: one warning names it."""
    import logging

    from lavender.vlm import backend
    from lavender.vlm.backend import disable_capture, enable_capture

    monkeypatch.setattr(backend, "_WARNED", set(), raising=False)
    model, _ = FAM.build_tiny()
    with caplog.at_level(logging.WARNING, logger="lavender.vlm.backend"):
        disable_capture(model, FAM, "sdpa")
        enable_capture(model, FAM)  # PaliGemma 1 (Gemma): nothing to say
        assert not caplog.records
        model.config.text_config.attn_logit_softcapping = 50.0
        enable_capture(model, FAM)
        enable_capture(model, FAM)
    (record,) = caplog.records
    assert "attn_logit_softcapping=50.0" in record.getMessage() and "eager" in record.getMessage()
    disable_capture(model, FAM)
