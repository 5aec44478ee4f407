"""Aligner shapes/normalisation and L_att against hand computations (docs/pitfalls.md #6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavender.aligner import VARIANTS, Aligner
from lavender.loss import attention_loss
from lavender.maps import minmax, minmax_np


def test_loss_hand_computation() -> None:
    pred = torch.zeros(3, 2, 2, requires_grad=True)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],  # MSE 1/4
                           [[1.0, 1.0], [1.0, 1.0]],  # MSE 1 (not matched)
                           [[0.5, 0.5], [0.0, 0.0]]])  # MSE (0.25 + 0.25) / 4 = 1/8
    valid = torch.tensor([True, False, True])
    loss, rate = attention_loss(pred, target, valid)
    assert loss.item() == pytest.approx((0.25 + 0.125) / 2)
    assert rate.item() == pytest.approx(2 / 3)
    loss.backward()
    assert pred.grad[1].abs().sum() == 0 and pred.grad[0].abs().sum() > 0


def test_loss_is_a_graph_zero_when_nothing_matches() -> None:
    aligner = Aligner(1, "light")
    pred = aligner(torch.rand(2, 1, 32, 32))
    target = torch.full((2, 32, 32), float("nan"))  # unmatched targets are never read
    loss, rate = attention_loss(pred, target, torch.tensor([False, False]))
    assert loss.item() == 0.0 and rate.item() == 0.0 and loss.requires_grad
    loss.backward()  # the graph is intact: gradients exist (and are zero)
    assert all(p.grad is not None for p in aligner.parameters())
    empty, rate = attention_loss(aligner(torch.rand(0, 1, 32, 32)), torch.zeros(0, 32, 32))
    assert empty.item() == 0.0 and empty.requires_grad and rate.item() == 0.0


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "identity"])
@pytest.mark.parametrize("norm,act", [("instance", "relu6"), ("batch", "leakyrelu")])
def test_aligner_shapes_range_and_gradients(variant: str, norm: str, act: str) -> None:
    torch.manual_seed(0)
    aligner = Aligner(in_channels=8, variant=variant, norm=norm, act=act)
    assert 4_000 <= sum(p.numel() for p in aligner.parameters()) <= 150_000
    out = aligner(torch.rand(5, 8, 32, 32))
    assert out.shape == (5, 32, 32)
    flat = out.flatten(1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.max(1).values, torch.ones(5), atol=1e-4, rtol=0)
    loss, _ = attention_loss(out, torch.rand(5, 32, 32))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.net[0].parameters())


def test_identity_aligner_is_the_normalised_channel_mean() -> None:
    aligner = Aligner(in_channels=3, variant="identity")
    assert not list(aligner.parameters())
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = aligner(x)
    torch.testing.assert_close(out, minmax(x.mean(dim=1)))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient goes straight to the VLM's maps


def test_minmax_is_eps_safe_on_constant_maps() -> None:
    x = torch.ones(2, 4, 4, requires_grad=True)
    y = minmax(x)
    assert torch.isfinite(y).all() and y.abs().max() == 0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_aligner_rejects_unknown_options() -> None:
    for kwargs in ({"variant": "huge"}, {"norm": "layer"}, {"act": "gelu"}, {"out_norm": "softmax"}):
        with pytest.raises(ValueError, match="unknown Aligner"):
            Aligner(1, **kwargs)


def test_minmax_torch_and_numpy_agree_and_eps_zero_is_exact() -> None:
    x = torch.rand(3, 5, 5) * 1e-9  # a range under eps: eps = 0 divides exactly, eps > 0 clamps
    x[1] = 0.25  # a constant map becomes 0 in both
    np.testing.assert_allclose(minmax(x, eps=0.0).numpy(), minmax_np(x.numpy()), atol=1e-5)
    assert float(minmax(x, eps=0.0)[0].max()) == pytest.approx(1.0)
    assert float(minmax(x)[0].max()) < 1.0  # clamped at 1e-8
    assert minmax_np(x.numpy())[1].max() == 0.0


@pytest.mark.parametrize("variant,norm", [("sim", "instance"), ("deep", "instance"), ("sim", "batch")])
def test_recomputed_aligner_gives_identical_numbers_and_keeps_less(variant: str, norm: str) -> None:
    """``apply_aligner`` recomputes the Aligner in backward: the output, the input's gradient and the
    weights' gradients are bit-identical to a plain call, while autograd keeps fewer bytes; BatchNorm is
    not recomputed (its running statistics must update once)."""
    from lavender.aligner import apply_aligner

    torch.manual_seed(0)
    maps = torch.rand(12, 8, 32, 32)
    results, kept = [], []
    for recompute in (False, True):
        torch.manual_seed(1)
        aligner = Aligner(8, variant, norm=norm)
        x = maps.clone().requires_grad_(True)
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = apply_aligner(aligner, x) if recompute else aligner(x)
        (y * torch.linspace(0, 1, 32 * 32).view(32, 32)).sum().backward()
        results.append((y.detach(), x.grad, [p.grad for p in aligner.parameters()], aligner.state_dict()))
        kept.append(sum(saved))
    (y0, gx0, gp0, sd0), (y1, gx1, gp1, sd1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gp0, gp1))
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # BatchNorm's running stats: updated once
    if norm == "batch":
        assert kept[1] == kept[0]
    else:
        assert kept[1] < kept[0] / 4, kept
