"""The attention losses against hand computations; the identity Aligner; λ calibration; reproducibility."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lavender.loss import attention_loss, kl_loss, mass_loss, softmax_map


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(1, 4, 4)
    pred[0, 0, 0], pred[0, 1, 1] = 1.0, 0.5
    target = torch.zeros(1, 4, 4)
    target[0, 0, 0], target[0, 3, 3] = 1.0, 1.0
    return pred, target


def test_mse_by_hand() -> None:
    pred, target = _maps()
    # differences: (1,1) 0.5 and (3,3) -1 → (0.25 + 1) / 16
    assert float(attention_loss(pred, target)[0]) == pytest.approx(1.25 / 16)


def test_kl_by_hand() -> None:
    _, target = _maps()
    prob = torch.full((1, 4, 4), 1.0)
    prob[0, 0, 0] = 3.0  # sums to 18: p(0,0) = 3/18, p(3,3) = 1/18
    t = 0.5  # the target normalised: two pixels of 1/2
    expected = t * math.log(t / (3 / 18)) + t * math.log(t / (1 / 18))
    assert float(kl_loss(prob, target)) == pytest.approx(expected, rel=1e-6)
    assert float(kl_loss(target + 1e-3, target)) < 0.01  # near zero when the prediction is the target
    # the softmax prediction is strictly positive: finite even where the Aligner output is 0
    assert math.isfinite(float(kl_loss(softmax_map(torch.zeros(1, 4, 4)), target)))


def test_mass_by_hand_and_it_sees_mass_moved_to_a_cls_key() -> None:
    _, target = _maps()  # region (>= 0.5): pixels (0,0) and (3,3)
    frame = torch.full((1, 4, 4), 1.0)
    frame[0, 0, 0] = 5.0  # total 20, inside 5 + 1 = 6
    on_grid = torch.tensor([1.0])
    assert float(mass_loss(frame, on_grid, target)) == pytest.approx(-math.log(6 / 20))
    # half the row's attention moves to a CLS key (off the grid): the same map, half the grid mass
    assert float(mass_loss(frame, torch.tensor([0.5]), target)) == pytest.approx(-math.log(3 / 20))
    # a word with an empty region is skipped, not a NaN
    assert float(mass_loss(frame, on_grid, torch.zeros(1, 4, 4))) == 0.0


def test_grid_mass_is_the_row_share_on_the_grid_keys() -> None:
    from types import SimpleNamespace

    from lavender.vlm.aggregate import word_grid_mass
    from lavender.vlm.rows import WordRows, batch_rows

    rows = batch_rows([[WordRows("red", 0, 3, [2])]])
    # one layer, two heads, one row, three grid keys: the heads put 0.6 and 0.4 on the grid
    captured = {0: torch.tensor([[[[0.2, 0.2, 0.2]], [[0.1, 0.1, 0.2]]]])}
    got = word_grid_mass(captured, SimpleNamespace(rows=rows))
    assert got.tolist() == pytest.approx([0.5])


# --- through the trainer ----------------------------------------------------------------------------
ROWS = [("What is it?", "a red circle", "a red circle"), ("Colour?", "blue square", "a blue square"),
        ("Where?", "the green ring is left", "the green ring is left of a cross"),
        ("What?", "two red stars", "two red stars")]


@pytest.fixture()
def data(tmp_path):
    from test_alignment_options import _records

    return _records(tmp_path, ROWS)


def _trainer(tiny_vlm, data, out, align=None, **kw):
    from lavender.config import AlignmentConfig, TrainConfig
    from lavender.trainer import build_trainer

    base = dict(model=tiny_vlm("mllama"), data=data[0], attention=data[1], output_dir=str(out), max_steps=2,
                per_device_train_batch_size=2, save_steps=1000, seed=0, lambda_att=1.0, learning_rate=1e-2,
                disable_tqdm=True, use_cpu=True, report_to=[])
    base.update(kw)
    return build_trainer(TrainConfig(**base), align or AlignmentConfig())


def test_identity_aligner_has_no_parameters_and_latt_reaches_the_watched_lora(tiny_vlm, data, tmp_path) -> None:
    trainer = _trainer(tiny_vlm, data, tmp_path / "run", aligner="identity")
    assert not list(trainer.head.parameters()), "the identity head must have nothing to absorb the loss"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model = trainer.model
    model.zero_grad()
    trainer.args.lambda_att = 1.0
    trainer._step = {}
    # L_att alone (pre-training mode puts only L_att in the loss)
    trainer.args.aligner_pretrain_steps = 0
    align = batch.pop("lavender")
    trainer.capture.arm(align.plan)
    out = model(**batch)
    loss_att = trainer._attention_term(align, out.logits.device, {})
    loss_att.backward()
    trainer.capture.clear()
    watched = [f"layers.{i}.cross_attn" for i in trainer.data_collator.layers]
    got = [n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert got and all("lora_" in n for n in got)
    assert any(any(w in n for w in watched) for n in got)


@pytest.mark.parametrize("att_loss, aligner", [("kl", "sim"), ("kl", "identity"), ("mass", "sim")])
def test_each_loss_trains_and_logs_raw_loss_and_sink_mass(tiny_vlm, data, tmp_path, att_loss, aligner) -> None:
    trainer = _trainer(tiny_vlm, data, tmp_path / "run", att_loss=att_loss, aligner=aligner, grad_ratio_steps=1)
    trainer.train()
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    for r in rows:
        assert np.isfinite(r["loss_att"]) and r["loss_att"] > 0
        assert 0 <= r["loss_att_raw"] <= 1 and 0 <= r["sink_mass"] <= 1 and r["grad_ratio"] > 0


def test_aligner_freeze_keeps_it_fixed_after_pretraining(tiny_vlm, data, tmp_path) -> None:
    from transformers import TrainerCallback

    def head_after_each_step(freeze: bool) -> dict[int, dict[str, torch.Tensor]]:
        trainer = _trainer(tiny_vlm, data, tmp_path / f"run{freeze}", max_steps=3, aligner_pretrain_steps=1,
                           aligner_freeze=freeze)
        snaps: dict[int, dict[str, torch.Tensor]] = {}

        class Snap(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                snaps[state.global_step] = {n: p.detach().clone() for n, p in trainer.head.named_parameters()}

        trainer.add_callback(Snap())
        trainer.train()
        return snaps

    frozen, free = head_after_each_step(True), head_after_each_step(False)
    assert all(torch.equal(frozen[1][n], frozen[3][n]) for n in frozen[1]), "the Aligner moved after pre-training"
    assert any(not torch.equal(free[1][n], free[3][n]) for n in free[1]), "without --aligner-freeze it trains"


def test_calibrated_lambda_gives_the_requested_gradient_ratio(tiny_vlm, data, tmp_path) -> None:
    """Measured independently: ∇(L_VLM + λ·L_att) − ∇L_VLM through the ordinary loss, on the same batches."""
    from lavender.trainer import calibrate_lambda

    trainer = _trainer(tiny_vlm, data, tmp_path / "run", lora_dropout=0.0)
    lam, base = calibrate_lambda(trainer, 0.5, batches=2)
    assert lam == pytest.approx(0.5 / base)
    model = trainer.model
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lavender_head" not in n]
    ratios = []
    for inputs in list(trainer.get_train_dataloader())[:2]:
        grads = {}
        for weight in (0.0, lam):
            trainer.args.lambda_att = weight
            model.zero_grad()
            trainer.compute_loss(model, dict(inputs)).backward()
            trainer.capture.clear()
            grads[weight] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        att = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads[lam], grads[0.0])))
        vlm = torch.sqrt(sum((g ** 2).sum() for g in grads[0.0]))
        ratios.append(float(att / vlm))
    assert np.mean(ratios) == pytest.approx(0.5, rel=0.10)


def test_same_seed_same_losses_with_one_or_two_threads(tiny_vlm, data, tmp_path) -> None:
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            _trainer(tiny_vlm, data, out, max_steps=3).train()
            runs[threads] = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(runs[1], runs[2]):
        for key in ("loss", "loss_vlm", "loss_att"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
