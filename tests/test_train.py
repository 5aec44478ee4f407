"""`lavender train`: the loss, labels, saving/loading, resuming, Aligner pre-training, every family."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _train_data import CAPTIONS, write_train_world

from lavender.cli import main as cli
from lavender.config import AlignmentConfig, TrainConfig
from lavender.trainer import build_trainer, lambda_at, load_head_state
from lavender.vlm.families import families

ARCHS = sorted(families())  # every registered family, with no list to keep in sync
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Six records with images and random DM maps for their answer words, plus one broken record."""
    return write_train_world(tmp_path_factory.mktemp("train_data"), broken=True)


def _args(tiny_vlm, world, out, arch="mllama", **kw) -> tuple[TrainConfig, AlignmentConfig]:
    base = dict(model=tiny_vlm(arch), data=world["data"], attention=world["attention"], output_dir=str(out),
                max_steps=2, per_device_train_batch_size=3, save_steps=1000, seed=0, lambda_att=10.0,
                dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
    base.update(kw)
    align_names = {f.name for f in dataclasses.fields(AlignmentConfig)}
    align = AlignmentConfig(**{k: base.pop(k) for k in list(base) if k in align_names})
    return TrainConfig(**base), align


def _batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(3)])


def test_lambda_schedules_stay_within_zero_and_lambda() -> None:
    for sched in ("constant", "exp-decay", "linear-warmup"):
        for lam in (0.0, 0.5, 10.0, 100.0):
            vals = [lambda_at(s, lam, sched, decay_steps=7, warmup_steps=5) for s in range(0, 200, 3)]
            assert all(0.0 <= v <= lam for v in vals), (sched, lam)
    assert lambda_at(0, 10, "linear-warmup", warmup_steps=10) == 0.0
    assert lambda_at(5, 10, "linear-warmup", warmup_steps=10) == pytest.approx(5.0)
    assert lambda_at(10, 10, "exp-decay", decay_steps=10) == pytest.approx(10 * np.exp(-1))


def test_lambda_zero_is_exactly_plain_sft(tiny_vlm, world, tmp_path) -> None:
    trainer = build_trainer(*_args(tiny_vlm, world, tmp_path, lambda_att=0.0))
    assert trainer.head is None and trainer.capture is None  # capture off: nothing extra runs
    batch = _batch(trainer)
    assert "lavender" not in batch
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    ref = model(**batch).loss
    assert torch.equal(loss, ref)


def test_positive_lambda_adds_latt_and_changes_watched_layer_grads(tiny_vlm, world, tmp_path) -> None:
    trainer = build_trainer(*_args(tiny_vlm, world, tmp_path, lambda_att=10.0))
    model = trainer.model
    batch = _batch(trainer)
    assert batch["lavender"].n_matched > 0

    def grads(lam: float) -> tuple[float, dict[str, torch.Tensor]]:
        trainer.args.lambda_att = lam
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        trainer.capture.clear()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None and "lora_" in n}

    l10, g10 = grads(10.0)
    l0, g0 = grads(0.0)
    latt = trainer._acc["loss_att"][0]
    assert latt > 0
    assert l10 == pytest.approx(l0 + 10.0 * latt, rel=1e-5)
    watched = [f"layers.{i}.cross_attn" for i in trainer.data_collator.layers]
    changed = [n for n in g10 if any(w in n for w in watched) and not torch.allclose(g10[n], g0[n])]
    assert changed, "L_att must reach the LoRA weights of the watched cross-attention layers"


def test_save_then_peft_from_pretrained_gives_same_outputs(tiny_vlm, world, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    trainer = build_trainer(*_args(tiny_vlm, world, tmp_path / "run", max_steps=2, learning_rate=1e-2))
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    files = os.listdir(tmp_path / "run")
    assert "adapter_model.safetensors" in files and "lavender_head.safetensors" in files
    batch = _batch(trainer)
    batch.pop("lavender")
    model = trainer.model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    # exactly as the authors' README: the base model + PeftModel.from_pretrained, no Aligner needed
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm("mllama"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()
    with torch.no_grad():
        out = loaded(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the project's loader restores the Aligner bit-for-bit
    fresh = build_trainer(*_args(tiny_vlm, world, tmp_path / "other"))
    assert load_head_state(fresh.head, str(tmp_path / "run"))
    for (n, a), (_, b) in zip(trainer.head.state_dict().items(), fresh.head.state_dict().items()):
        assert torch.equal(a.cpu(), b), n


def test_aligner_pretraining_freezes_the_vlm(tiny_vlm, world, tmp_path) -> None:
    trainer = build_trainer(*_args(tiny_vlm, world, tmp_path, max_steps=2, aligner_pretrain_steps=2,
                                  learning_rate=1e-2))
    lora0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    head0 = {n: p.detach().clone() for n, p in trainer.head.named_parameters()}
    trainer.train()
    lora1 = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert all(torch.equal(lora0[n], lora1[n]) for n in lora0), "VLM weights moved during Aligner pre-training"
    assert any(not torch.equal(head0[n], p) for n, p in trainer.head.named_parameters())
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)  # unfrozen after


def _cli_train(tiny_vlm, world, out, *extra: str) -> list[dict]:
    args = ["train", "--model", tiny_vlm("mllama"), "--data", world["data"], "--attention", world["attention"],
            "--out", str(out), "--per_device_train_batch_size", "2", "--seed", "3", "--learning_rate", "5e-3",
            "--disable_tqdm", "true", *extra]
    assert cli(args) == 0
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_resume_continues_exactly(tiny_vlm, world, tmp_path) -> None:
    straight = _cli_train(tiny_vlm, world, tmp_path / "a", "--max_steps", "6", "--save_steps", "3")
    _cli_train(tiny_vlm, world, tmp_path / "b", "--max_steps", "3", "--save_steps", "3")
    resumed = _cli_train(tiny_vlm, world, tmp_path / "b", "--max_steps", "6", "--save_steps", "3", "--resume")
    assert [m["step"] for m in resumed] == list(range(1, 7)), "metrics.jsonl continues at the next step"
    for a, b in zip(straight, resumed):
        for key in ("loss", "loss_vlm", "loss_att", "match_rate", "lambda"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_missing_image_is_reported_and_skipped(tiny_vlm, world, tmp_path) -> None:
    trainer = build_trainer(*_args(tiny_vlm, world, tmp_path))
    assert len(trainer.train_dataset) == len(CAPTIONS)
    assert [e.record_id for e in trainer.train_dataset.errors] == ["missing"]
    assert "not found" in str(trainer.train_dataset.errors[0])
    with pytest.raises(ValueError, match="missing"):
        build_trainer(*_args(tiny_vlm, world, tmp_path, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_on_every_family(tiny_vlm, world, tmp_path, arch: str) -> None:
    rows = _cli_family(tiny_vlm, world, tmp_path, arch)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss", "loss_vlm", "loss_att", "match_rate", "lambda"} <= set(r)
        assert r["match_rate"] > 0.5 and r["loss_att"] > 0 and np.isfinite(r["loss"])


def _cli_family(tiny_vlm, world, tmp_path, arch: str) -> list[dict]:
    out = tmp_path / arch
    assert cli(["train", "--model", tiny_vlm(arch), "--data", world["data"], "--attention", world["attention"],
                "--out", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--disable_tqdm", "true"]) == 0
    return [json.loads(ln) for ln in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_reload_equals_the_trained_model_on_every_family(tiny_vlm, world, tmp_path, arch: str) -> None:
    """λ > 0 training, then the base model + ``PeftModel.from_pretrained(run)`` gives the trained model's
    logits (and not the base model's: the adapter moved)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run = str(tmp_path / "run")
    trainer = build_trainer(*_args(tiny_vlm, world, run, arch=arch, max_steps=1, learning_rate=1e-2))
    trainer.train()
    trainer.save_model(run)
    batch = _batch(trainer)
    batch.pop("lavender")
    with torch.no_grad():
        ref = trainer.model.eval()(**batch).logits
        base = AutoModelForImageTextToText.from_pretrained(tiny_vlm(arch)).eval()
        before = base(**batch).logits
        out = PeftModel.from_pretrained(base, run).eval()(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, ref, atol=1e-4), "training changed nothing: the check would be vacuous"


def test_full_finetuning_writes_a_plain_model_folder(tiny_vlm, world, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "full"
    assert cli(["train", "--model", tiny_vlm("llava"), "--data", world["data"], "--attention", world["attention"],
                "--out", str(out), "--max_steps", "1", "--full", "--disable_tqdm", "true"]) == 0
    assert (out / "model.safetensors").exists() and (out / "lavender_head.safetensors").exists()
    AutoModelForImageTextToText.from_pretrained(str(out))  # loads with no unexpected Lavender keys
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lavender" in k]


@pytest.mark.slow
def test_two_process_cpu_training_with_accelerate(tiny_vlm, world, tmp_path) -> None:
    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                                "accelerate")):
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "ddp"
    # the shipped examples/accelerate/cpu_2proc.yaml: its MULTI_GPU path spawns 2 processes through
    # torch.distributed.run, which use gloo here (`--cpu --num_processes 2` would start ONE: mpirun's path)
    config = os.path.join(os.path.dirname(__file__), "..", "examples", "accelerate", "cpu_2proc.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--dynamo_backend", "no",
           "-m", "lavender", "train", "--model", tiny_vlm("mllama"), "--data", world["data"],
           "--attention", world["attention"], "--out", str(out), "--max_steps", "2",
           "--per_device_train_batch_size", "1", "--disable_tqdm", "true", "--use_cpu", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "lavender_run.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("name", ["llama32_11b_lora.yaml", "llava15_7b_lora.yaml", "qwen2vl_7b_lora.yaml",
                                  "qwen3vl_8b_lora.yaml", "minicpmv46_lora.yaml", "llava_onevision_7b_lora.yaml",
                                  "internvl3_8b_lora.yaml", "gemma3_12b_lora.yaml"])
def test_shipped_example_configs_parse(name: str) -> None:
    from lavender.config import LavenderParser

    parser = LavenderParser([TrainConfig, AlignmentConfig], prog="lavender train")
    path = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    # flags override the file: the GPU configs ask for bf16, which this CPU cannot build
    args, _ = parser.parse(["--config", path, "--bf16", "false", "--use_cpu"])
    assert not args.bf16
    assert args.model and args.lambda_att == 10.0 and args.learning_rate == pytest.approx(1e-4)
