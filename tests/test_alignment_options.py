"""Alignment options end to end: --match lemma, --aligner-norm batch, learn through the trainer, and
`attend --align-on all` reading exactly the maps training reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.attnstore import AttentionStore, AttentionWriter
from lavender.config import AlignmentConfig, TrainConfig
from lavender.data_collator import LavenderCollator
from lavender.records import read_records
from lavender.vlm.load import load_vlm
from lavender.words import split_words


def _records(tmp_path, rows: list[tuple[str, str, str]], extra: list[dict] | None = None) -> tuple[str, str]:
    """``rows`` of (question, answer, DM text) → a records file and an attention dataset of random maps.

    ``extra``: per row, more record fields (e.g. ``align_pairs``)."""
    rng = np.random.default_rng(0)
    writer = AttentionWriter(tmp_path / "attn", {"map_size": 32, "frame": "squash"})
    lines = []
    for i, (question, answer, dm_text) in enumerate(rows):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"id": f"s{i}", "images": [f"{i}.png"],
                      "messages": [{"role": "user", "content": "<image>" + question},
                                   {"role": "assistant", "content": answer}],
                      **(extra[i] if extra else {})})
        ws = split_words(dm_text)
        writer.add(f"s{i}", [w.text for w in ws], [(w.start, w.end) for w in ws],
                   rng.random((len(ws), 32, 32)).astype("float32"))
    writer.close()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path), str(tmp_path / "attn")


def test_lemma_matching_pairs_inflections_in_the_collator(tiny_vlm, tmp_path) -> None:
    data, attn = _records(tmp_path, [("What is there?", "two red circles", "a red circle")])
    model, proc, fam = load_vlm(tiny_vlm("mllama"))
    recs = read_records(data)
    store = AttentionStore(attn)
    exact = LavenderCollator(proc, fam, model.config, store, [0], AlignmentConfig(match="exact"))(recs)["lavender"]
    lemma = LavenderCollator(proc, fam, model.config, store, [0], AlignmentConfig(match="lemma"))(recs)["lavender"]
    assert [w.text for w in exact.rows.words[0]] == ["red"]
    assert [w.text for w in lemma.rows.words[0]] == ["red", "circles"]
    assert lemma.target_index == [1, 2]  # "circles" takes the DM's "circle"


AMBIGUOUS = ("What colour is the circle?", "red", "a red circle and a red square")


@pytest.mark.parametrize("policy,expected", [("occurrence", [1]), ("first", [1]), ("skip", []),
                                             ("mean", [1])])
def test_ambiguous_policy_decides_a_repeated_dm_word(tiny_vlm, tmp_path, policy, expected) -> None:
    data, attn = _records(tmp_path, [AMBIGUOUS])
    model, proc, fam = load_vlm(tiny_vlm("llava"))
    store = AttentionStore(attn)
    align = LavenderCollator(proc, fam, model.config, store, [0], AlignmentConfig(ambiguous=policy))(
        read_records(data))["lavender"]
    assert align.target_index == expected
    assert align.n_ambiguous == 1
    if policy == "mean":  # the average of both "red" maps (words 1 and 5 of the DM text)
        maps = store.get("s0")["maps"].astype(np.float32)
        torch.testing.assert_close(align.targets[0], torch.from_numpy((maps[1] + maps[5]) / 2))


def test_explicit_align_pairs_choose_the_occurrence(tiny_vlm, tmp_path) -> None:
    """The record says its answer is the SECOND "red" (the referent), which text matching never picks."""
    second = AMBIGUOUS[2].index("red", 5)
    pair = {"message": 1, "start": 0, "end": 3, "dm_start": second, "dm_end": second + 3}
    data, attn = _records(tmp_path, [AMBIGUOUS], [{"align_pairs": [pair], "align_text": AMBIGUOUS[2]}])
    model, proc, fam = load_vlm(tiny_vlm("llava"))
    store = AttentionStore(attn)
    align = LavenderCollator(proc, fam, model.config, store, [0], AlignmentConfig())(read_records(data))["lavender"]
    assert align.target_index == [5] and align.n_ambiguous == 0
    torch.testing.assert_close(align.targets[0], torch.from_numpy(store.get("s0")["maps"][5].astype(np.float32)))


def test_a_pair_spanning_a_phrase_targets_the_mean_of_its_words(tiny_vlm, tmp_path) -> None:
    """A DM span covering "red square" (two DM words) gives the answer the mean of both words' maps."""
    start = AMBIGUOUS[2].index("red", 5)
    pair = {"message": 1, "start": 0, "end": 3, "dm_start": start, "dm_end": len(AMBIGUOUS[2])}
    data, attn = _records(tmp_path, [AMBIGUOUS], [{"align_pairs": [pair], "align_text": AMBIGUOUS[2]}])
    model, proc, fam = load_vlm(tiny_vlm("llava"))
    store = AttentionStore(attn)
    align = LavenderCollator(proc, fam, model.config, store, [0], AlignmentConfig())(read_records(data))["lavender"]
    maps = store.get("s0")["maps"].astype(np.float32)
    assert align.target_index == [5]
    torch.testing.assert_close(align.targets[0], torch.from_numpy((maps[5] + maps[6]) / 2))


@pytest.mark.parametrize("pairs,needle", [
    ("red", "must be a list"), ([{"message": 1}], "integer fields"),
    ([{"message": 7, "start": 0, "end": 3, "dm_start": 0, "dm_end": 1}], "not a message index"),
    ([{"message": 1, "start": 0, "end": 30, "dm_start": 0, "dm_end": 1}], "outside messages[1]"),
    ([{"message": 1, "start": 0, "end": 3, "dm_start": 0, "dm_end": 99}], "outside the DM text")])
def test_bad_align_pairs_name_the_record(tmp_path, pairs, needle) -> None:
    from lavender.records import RecordError, iter_records

    data, _ = _records(tmp_path, [AMBIGUOUS], [{"align_pairs": pairs, "align_text": AMBIGUOUS[2]}])
    (err,) = list(iter_records(data))
    assert isinstance(err, RecordError) and needle in str(err) and "s0" in str(err)


def _train_cfg(tiny_vlm, data, attn, out, **kw) -> TrainConfig:
    base = dict(model=tiny_vlm("mllama"), data=data, attention=attn, output_dir=str(out), max_steps=2,
                per_device_train_batch_size=2, save_steps=1000, seed=0, lambda_att=10.0, learning_rate=1e-2,
                disable_tqdm=True, use_cpu=True, report_to=[])
    base.update(kw)
    return TrainConfig(**base)


ROWS = [("What is it?", "a red circle", "a red circle"), ("Colour?", "blue square", "a blue square"),
        ("Where?", "the green ring is left", "the green ring is left of a cross")]


def test_batch_norm_aligner_trains(tiny_vlm, tmp_path) -> None:
    from lavender.trainer import build_trainer

    data, attn = _records(tmp_path, ROWS)
    trainer = build_trainer(_train_cfg(tiny_vlm, data, attn, tmp_path / "run", aligner_norm="batch"),
                            AlignmentConfig())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.head.modules())
    before = {n: p.detach().clone() for n, p in trainer.head.named_parameters()}
    trainer.train()
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(np.isfinite(r["loss_att"]) and r["loss_att"] > 0 for r in rows)
    assert any(not torch.equal(before[n], p) for n, p in trainer.head.named_parameters())


def test_learn_aggregation_trains_its_projections(tiny_vlm, tmp_path) -> None:
    from lavender.trainer import build_trainer

    data, attn = _records(tmp_path, ROWS)
    trainer = build_trainer(_train_cfg(tiny_vlm, data, attn, tmp_path / "run"), AlignmentConfig(aggregation="learn"))
    assert trainer.head.learn is not None
    learn0 = {n: p.detach().clone() for n, p in trainer.head.learn.named_parameters()}
    assert learn0
    trainer.train()
    moved = [n for n, p in trainer.head.learn.named_parameters() if not torch.equal(learn0[n], p)]
    assert moved, "the learn projections must receive L_att's gradient"


@pytest.mark.parametrize("arch", ["mllama", "llava"])
def test_attend_align_on_all_equals_the_training_maps(tiny_vlm, tmp_path, arch: str) -> None:
    """attend (no DM) and the training path (collator + capture with a DM dataset of the same words)
    read the same words with the same maps — and no template word such as ``assistant``."""
    from lavender.analysis import collect_word_maps
    from lavender.commands.attend import compute_word_maps

    question, answer = "where is the red circle", "the red circle is left"
    data, attn = _records(tmp_path, [(question, answer, f"{question} {answer}")])
    model, proc, fam = load_vlm(tiny_vlm(arch))
    model.eval()
    align = AlignmentConfig(align_on="all", aggregation="mean-mean")
    rec = read_records(data)[0]
    words, maps, chat = compute_word_maps(model, proc, fam, rec.images[0], answer, question, align)
    rows = collect_word_maps(model, proc, fam, [rec], AttentionStore(attn), align)
    assert [w.text for w in words] == [r["word"] for r in rows] == (question + " " + answer).split()
    assert "assistant" not in [w.text.lower() for w in words] and "user" not in [w.text.lower() for w in words]
    assert [chat[w.start:w.end] for w in words] == [w.text for w in words]
    attend_maps = maps.mean(dim=1).numpy()
    np.testing.assert_allclose(attend_maps, np.stack([r["vlm"] for r in rows]), rtol=1e-5, atol=1e-7)


def test_analyze_reads_the_run_folders_alignment_and_flags_override(tiny_vlm, tmp_path) -> None:
    from lavender.cli import main as cli

    data, attn = _records(tmp_path, ROWS)
    run = tmp_path / "run"
    assert cli(["train", "--model", tiny_vlm("mllama"), "--data", data, "--attention", attn, "--out", str(run),
                "--max_steps", "1", "--per_device_train_batch_size", "2", "--layers", "1",
                "--aggregation", "mean-max", "--row-owner", "query", "--disable_tqdm", "true",
                "--report_to", "none"]) == 0
    card = (run / "README.md").read_text()
    assert tiny_vlm("mllama") in card and "mean-max" in card and "| steps | 1 |" in card
    assert cli(["analyze", "--attention", attn, "--data", data, "--model", str(run), "--out", str(tmp_path / "a")]) == 0
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    got = result["alignment_config"]
    assert (got["layers"], got["aggregation"], got["row_owner"]) == ([1], "mean-max", "query")
    # Mllama's CLS and padding-tile keys are off the grid: some of every row's attention is there
    assert 0.0 < result["alignment"]["sink_mass"]["mean"] < 1.0
    assert cli(["analyze", "--attention", attn, "--data", data, "--model", str(run), "--out", str(tmp_path / "b"),
                "--aggregation", "flow-sum"]) == 0
    got = json.loads((tmp_path / "b" / "analysis.json").read_text())["alignment_config"]
    assert (got["layers"], got["aggregation"]) == ([1], "flow-sum")
