"""`lavender export --merge`, `generate` and `eval` on a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.cli import main as cli


@pytest.fixture(scope="module")
def run(tiny_vlm, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"q{i}", "images": [f"{i}.png"], "type": "colour" if i % 2 else "shape",
                     "answers": ["red"] if i % 2 else ["a circle"],
                     "messages": [{"role": "user", "content": "<image>What is it?"},
                                  {"role": "assistant", "content": "red" if i % 2 else "a circle"}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    assert cli(["train", "--model", tiny_vlm("llava"), "--data", str(root / "data.jsonl"), "--out", str(out),
                "--max_steps", "2", "--lambda", "0", "--learning_rate", "1e-2", "--disable_tqdm", "true"]) == 0
    return {"root": root, "run": out, "data": root / "data.jsonl"}


def test_merged_export_loads_with_plain_transformers_and_generates_the_same(run, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    from lavender.generation import generate
    from lavender.records import load_image
    from lavender.trainer import load_vlm

    merged = tmp_path / "merged"
    assert cli(["export", str(run["run"]), "--merge", "--out", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists()
    plain = AutoModelForImageTextToText.from_pretrained(str(merged)).eval()  # no PEFT, no Lavender
    adapter, processor, _ = load_vlm(str(run["run"]))
    prompts = [([{"role": "user", "content": "<image>What is it?"}], [load_image(run["root"] / f"{i}.png")])
               for i in range(3)]
    a = generate(adapter.eval(), processor, prompts, max_new_tokens=6, batch_size=2)
    b = generate(plain, processor, prompts, max_new_tokens=6, batch_size=2)
    assert a == b and all(isinstance(x, str) for x in a)


def test_export_without_merge_of_an_adapter_is_refused(run, tmp_path, capsys) -> None:
    assert cli(["export", str(run["run"]), "--out", str(tmp_path / "x")]) == 2
    assert "pass --merge" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_writes_scores_per_type_and_predictions(run, tmp_path) -> None:
    out = tmp_path / "ev"
    assert cli(["eval", "--model", str(run["run"]), "--data", str(run["data"]), "--out", str(out),
                "--max-new-tokens", "4", "--limit", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 3 and set(res["scores"]) == {"exact", "contains"}
    assert set(res["scores"]["exact"]["by_type"]) == {"colour", "shape"}
    preds = [json.loads(ln) for ln in open(out / "predictions.jsonl")]
    assert [p["id"] for p in preds] == ["q0", "q1", "q2"]
    # the summary is the mean of the per-record scores (computed independently here)
    from lavender.metrics import normalize_text

    exact = np.mean([float(any(normalize_text(p["prediction"]) == normalize_text(a) for a in p["answers"]))
                     for p in preds])
    assert res["scores"]["exact"]["overall"]["exact"]["exact"] == pytest.approx(exact)


def test_generate_batches_match_single_prompts(run) -> None:
    from lavender.generation import generate
    from lavender.records import load_image
    from lavender.trainer import load_vlm

    model, processor, _ = load_vlm(str(run["run"]))
    prompts = [([{"role": "user", "content": "<image>What is it?" + " please" * i}],
                [load_image(run["root"] / f"{i}.png")]) for i in range(3)]
    with torch.no_grad():
        batched = generate(model.eval(), processor, prompts, max_new_tokens=5, batch_size=3)
        single = [generate(model, processor, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding keeps every prompt's answer unchanged
