"""`lavender world train-vlm` and the world VLM helpers: recipe, resume, saved model, labels, VQA scoring."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.cli import main as cli
from lavender.world.vlm import (
    STATE_DIR,
    TINY,
    Recipe,
    build_world_vlm,
    encode,
    pretrain_examples,
    train_vlm,
)

TINY_ARGS = ["--steps", "4", "--batch-size", "4", "--tiny", "--save-every", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A tiny Mllama trained 4 steps in one go (the reference for resume and the model for eval tests)."""
    out = str(tmp_path_factory.mktemp("vlm_full"))
    assert cli(["world", "train-vlm", "--arch", "mllama", "--out", out, "--seed", "3", *TINY_ARGS]) == 0
    return out


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_train_vlm_saves_a_loadable_model(trained):
    from transformers import AutoModelForImageTextToText

    from lavender.vlm.load import load_vlm

    assert not os.path.exists(os.path.join(trained, STATE_DIR)), "a finished run leaves no optimiser state"
    rows = [json.loads(x) for x in open(os.path.join(trained, "pretrain_metrics.jsonl"))]
    assert rows[-1]["step"] == 4 and 0 <= rows[-1]["heldout_token_acc"] <= 1
    model = AutoModelForImageTextToText.from_pretrained(trained)
    assert model.config.model_type == "mllama"
    model, processor, family = load_vlm(trained)
    assert family.name == "mllama"
    # the 64-px image is 2×2 tiles of 32 px, never resized: the family stitches a (64/patch)² grid
    img = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    batch = processor(text=["<|image|>What colour is the circle?"], images=[[img]], return_tensors="pt")
    (grid,) = family.image_grids(batch, [[(64, 64)]], config=model.config, processor=processor)
    side = 64 // TINY.patch_size
    assert (grid.rows, grid.cols) == (side, side)
    assert grid.covers == (0.0, 0.0, 64.0, 64.0)


def test_every_world_word_is_one_token():
    from lavender.records import CAPTION_PROMPT
    from lavender.world.questions import vocabulary

    for arch in ("mllama", "llava"):
        _, processor = build_world_vlm(arch, TINY)
        tok = processor.tokenizer
        for word in [*vocabulary(), "describe", "image"]:
            assert tok.tokenize(word) == [word], (arch, word)
        assert tok.unk_token_id not in tok(CAPTION_PROMPT)["input_ids"]


def test_resume_continues_exactly(trained, tmp_path):
    """Stopped after its first step (--chunk-minutes 0) and resumed, the run ends with the same weights."""
    out = str(tmp_path / "chunks")
    base = ["world", "train-vlm", "--arch", "mllama", "--out", out, "--seed", "3", *TINY_ARGS]
    assert cli([*base, "--chunk-minutes", "0"]) == 0
    state = torch.load(os.path.join(out, STATE_DIR, "state.pt"), weights_only=False)
    assert state["step"] == 1
    assert cli(base) == 1  # an unfinished run is never silently restarted
    assert cli([*base, "--resume"]) == 0
    assert not os.path.exists(os.path.join(out, STATE_DIR))
    a, b = _weights(trained), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "pretrain_metrics.jsonl"))]
    assert steps == sorted(set(steps)), "metrics never repeat a step across chunks"


def test_resume_rejects_another_recipe(tmp_path):
    out = str(tmp_path / "r")
    r = Recipe(steps=3, batch_size=2, model=TINY, save_every=1, eval_n=4)
    train_vlm(out, r, max_minutes=0, progress=lambda s: None)
    with pytest.raises(ValueError, match="lr"):
        train_vlm(out, Recipe(steps=3, batch_size=2, model=TINY, save_every=1, eval_n=4, lr=1.0),
                  resume=True, progress=lambda s: None)


def test_llava_trains_and_loads(tmp_path):
    from lavender.vlm.load import load_vlm

    out = str(tmp_path / "llava")
    r = Recipe(arch="llava", steps=2, batch_size=2, model=TINY, eval_n=4)
    result = train_vlm(out, r, progress=lambda s: None)
    assert result["done"] and 0 <= result["caption_token_accuracy"] <= 1
    model, processor, family = load_vlm(out)
    assert family.name == "llava" and model.config.image_seq_length == (64 // TINY.patch_size) ** 2


def test_pretrain_examples_captions_and_seen_questions():
    from lavender.world.questions import TEMPLATES

    imgs, convs = pretrain_examples(np.random.default_rng(0), 6)
    _, again = pretrain_examples(np.random.default_rng(0), 6)
    assert convs == again and len(imgs) == 6 and imgs[0].size == (64, 64)
    assert all(c[0]["content"] == "<image>Describe the image." for c in convs)
    assert all(c[1]["content"].startswith(("a ", "an ")) for c in convs)
    _, qa = pretrain_examples(np.random.default_rng(1), 40, vqa_fraction=1.0)
    questions = [c[0]["content"].removeprefix("<image>") for c in qa if "Describe" not in c[0]["content"]]
    assert len(questions) >= 30
    seen = [_template_regex(t) for s, _ in TEMPLATES.values() for t in s]
    unseen = [_template_regex(t) for _, u in TEMPLATES.values() for t in u]
    for q in questions:
        assert any(r.fullmatch(q) for r in seen) and not any(r.fullmatch(q) for r in unseen), q


def _template_regex(template: str):
    """A template as a regex whose placeholders take only what they can hold (``{a}`` = colour shape)."""
    import re

    fill = {"a": r"\w+ \w+", "b": r"\w+ \w+", "side": "(?:left|right)", "art": "an?",
            "colour": r"\w+", "shape": r"\w+"}
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(x) if i % 2 == 0 else fill[x] for i, x in enumerate(parts)))


def test_encode_labels_only_the_caption():
    _, processor = build_world_vlm("mllama", TINY)
    imgs, convs = pretrain_examples(np.random.default_rng(2), 3)
    batch = encode(processor, imgs, convs)
    tok = processor.tokenizer
    for b, conv in enumerate(convs):
        ids = batch["input_ids"][b][batch["labels"][b] != -100].tolist()
        assert tok.convert_ids_to_tokens(ids) == conv[1]["content"].split() + [tok.eos_token]


def test_batched_evaluation_matches_single_generation(trained, tmp_path):
    """Two answers set to the model's own unpadded greedy output, two wrong: exactly 50 % under padding."""
    from lavender.chat import render
    from lavender.vlm.load import load_vlm

    model, processor, _ = load_vlm(trained)
    tok = processor.tokenizer
    questions = ["Is there a red circle?", "How many shapes are there?", "What colour is the square?",
                 "Which side is the blue cross on?"]
    rows, truth = [], []
    for i, q in enumerate(questions):
        img = np.full((64, 64, 3), 255, np.uint8)
        img[8 * i: 8 * i + 20, 10:30] = (220, 30, 30)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        msgs = [{"role": "user", "content": "<image>" + q}]
        enc = processor(text=[render(processor, msgs, add_generation_prompt=True)],
                        images=[[Image.open(tmp_path / f"{i}.png").convert("RGB")]], return_tensors="pt",
                        add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        single = " ".join(t for t in tok.convert_ids_to_tokens(out[0, enc["input_ids"].shape[1]:].tolist())
                          if t not in tok.all_special_tokens)
        truth.append(single)
        answer = single if i < 2 else "zebra"
        rows.append({"id": f"q{i}", "images": [f"{i}.png"], "type": "colour" if i % 2 else "count",
                     "messages": [*msgs, {"role": "assistant", "content": answer}], "answers": [answer]})
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from lavender.evaluate import evaluate
    from lavender.metrics import normalize_text

    got = evaluate(model, processor, str(tmp_path / "vqa.jsonl"), metric="exact", batch_size=4, max_new_tokens=4)
    preds = {p["id"]: normalize_text(p["prediction"]) for p in got["predictions"]}
    assert preds == {f"q{i}": normalize_text(t) for i, t in enumerate(truth)}
    exact = got["scores"]["exact"]
    assert exact["overall"]["exact"]["exact"] == 0.5
    assert {t: v["exact"]["exact"] for t, v in exact["by_type"].items()} == {"count": 0.5, "colour": 0.5}


@pytest.mark.parametrize("arch", ["mllama", "llava"])
def test_committed_checkpoint_sees_colours(arch):
    """The committed world VLM loads like a hub model and names the colour of one-object scenes."""
    from pathlib import Path

    from lavender.generation import generate
    from lavender.records import CAPTION_PROMPT
    from lavender.vlm.load import load_vlm
    from lavender.world.scenes import sample_batch

    path = Path(__file__).parents[1] / "src/lavender/world/checkpoints" / f"vlm_{arch}"
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no committed checkpoint at {path}")
    model, processor, family = load_vlm(str(path))
    assert family.name == arch
    b = sample_batch(np.random.default_rng(99), 12, split="test", objects=(1, 1))
    convs = [[{"role": "user", "content": "<image>" + CAPTION_PROMPT}]] * 12
    captions = generate(model.eval(), processor, [(c, [Image.fromarray(im)]) for c, im in zip(convs, b.images)],
                        max_new_tokens=5, batch_size=12)
    captions = [c.lower().strip() for c in captions]
    right = sum(c.split()[1:2] == t.split()[1:2] for c, t in zip(captions, b.captions))
    assert right >= 9, list(zip(captions, b.captions))  # chance is 2 of 12


def test_resume_refuses_a_planted_pickle(tmp_path):
    """A state file that would run code when unpickled is refused (weights_only), with one line."""
    import pickle

    from lavender.config import LavenderError
    from lavender.world.write import load_state

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo planted > " + str(tmp_path / "ran"),))

    path = tmp_path / "state.pt"
    with open(path, "wb") as f:
        pickle.dump({"step": 1, "x": Boom()}, f)
    with pytest.raises(LavenderError, match="refusing to unpickle"):
        load_state(path)
    assert not (tmp_path / "ran").exists()
