"""Aggregations against hand computations; flow-mult without underflow; r_t; the ``learn`` projections."""

from __future__ import annotations

import pytest
import torch

from lavender.vlm.aggregate import LearnedProjections, aggregate, average_word_rows, pool, row_weights
from lavender.vlm.families import ImageGrid, families
from lavender.vlm.rows import WordRows, batch_rows

# two layers, two heads, one row, three keys: (B=1, H=2, R=1, K=3)
L0 = [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]
L1 = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]
MAPS = {0: torch.tensor(L0)[None, :, None, :], 3: torch.tensor(L1)[None, :, None, :]}

HAND = {  # computed by hand from L0 / L1 above
    "mean-mean": [0.275, 0.3375, 0.3875],
    "mean-max": [0.35, 0.425, 0.55],
    "max-mean": [0.4, 0.45, 0.475],
    "max-max": [0.5, 0.6, 0.7],
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_pool_against_hand(name: str) -> None:
    out = pool(MAPS, name)
    assert out.shape == (1, 1, 1, 3)
    torch.testing.assert_close(out.flatten(), torch.tensor(HAND[name]))


def test_heads_keeps_heads_as_channels() -> None:
    out = pool(MAPS, "heads")
    assert out.shape == (1, 2, 1, 3)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[0.3, 0.225, 0.475], [0.25, 0.45, 0.3]]))


def test_flow_sum_and_mult_with_r() -> None:
    r = torch.tensor([[0.5]])
    torch.testing.assert_close(pool(MAPS, "flow-sum", r).flatten(), 0.5 * torch.tensor([0.55, 0.675, 0.775]))
    product = torch.tensor([0.2 * 0.35, 0.25 * 0.425, 0.55 * 0.225])  # head means multiplied
    torch.testing.assert_close(pool(MAPS, "flow-mult", r).flatten(), 0.5 * product / product.max())
    with pytest.raises(ValueError, match="r_t"):
        pool(MAPS, "flow-mult")


def test_flow_mult_bf16_eight_layers_does_not_underflow() -> None:
    # eight bf16 layers whose probabilities are ~1e-6: the plain product (1e-48) is 0 even in float32
    a, b = 2e-6, 1e-6
    layer = torch.tensor([a, b, b], dtype=torch.bfloat16)[None, None, None, :].expand(1, 4, 1, 3)
    maps = {i: layer.clone() for i in range(8)}
    assert float(torch.stack([m.float() for m in maps.values()]).prod(dim=0).max()) == 0.0  # naive underflows
    out = pool(maps, "flow-mult", torch.ones(1, 1)).flatten()
    assert torch.isfinite(out).all() and out[0] == 1.0
    ratio = (float(layer[0, 0, 0, 1]) / float(layer[0, 0, 0, 0])) ** 8  # bf16-rounded inputs, by hand
    assert out[1].item() == pytest.approx(ratio, rel=1e-3) and out[1] > 0


def test_row_weights_count_real_tokens_only() -> None:
    rows = torch.tensor([[2, 4], [0, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # left- and right-padded
    torch.testing.assert_close(row_weights(rows, mask), torch.tensor([[1 / 3, 1.0], [1 / 3, 1.0]]))
    torch.testing.assert_close(row_weights(rows, None, seq_len=5), torch.tensor([[0.6, 1.0], [0.2, 0.6]]))


def test_r_t_changes_a_multi_row_word_map() -> None:
    # one word over rows 1 and 3; flow-sum with r_t weights the later row 3x more than row 1
    maps = {0: torch.tensor([[[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]]])}  # (1, 1, R=3, K=2)
    batch = batch_rows([[WordRows("w", 0, 1, [1, 3]), WordRows("v", 2, 3, [2])]])
    assert batch.rows.tolist() == [[1, 2, 3]]
    r = row_weights(batch.rows, None, seq_len=4)  # 0.5, 0.75, 1.0
    pooled = pool(maps, "flow-sum", r)
    wm = average_word_rows(pooled, batch)[0]
    torch.testing.assert_close(wm[0, 0], torch.tensor([0.25, 0.5]))  # mean(0.5*[1,0], 1.0*[0,1])
    torch.testing.assert_close(wm[1, 0], torch.tensor([0.0, 0.0]))


def test_aggregate_places_keys_on_the_grid() -> None:
    # a 2x2 grid whose cell (0, 1) (top right) gets all the attention of the word's row
    maps = {5: torch.tensor([0.0, 1.0, 0.0, 0.0])[None, None, None, :].expand(1, 2, 1, 4)}
    batch = batch_rows([[WordRows("star", 0, 4, [7])]])
    grid = ImageGrid(0, torch.tensor([10, 11, 12, 13]), 2, 2, (0.0, 0.0, 64.0, 64.0), (64, 64))
    out = aggregate(maps, batch, [grid], "mean-mean", frame="squash", size=4)
    assert len(out) == 1 and out[0].shape == (1, 1, 4, 4)
    m = out[0][0, 0]
    # bilinear resampling blurs cell borders; the top-right corner is the cell itself, far corners are 0
    assert m[0, 3] == pytest.approx(1.0) and m[3, 0] == 0 and m[3, 3] < 0.1 and m[0, 0] < 0.1
    assert m[:2, 2:].mean() > 2 * max(m[:2, :2].mean(), m[2:, 2:].mean())


def _llava_step(path: str, projections: bool, init: str = "copy"):
    from transformers import AutoModelForImageTextToText

    from lavender.vlm.backend import CapturePlan, enable_capture

    fam = families()["llava"]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    layers = fam.default_layers(model)
    learn = LearnedProjections({i: fam.attention_modules(model)[i] for i in layers}, init=init).attach() \
        if projections else None
    capture = enable_capture(model, fam, projector=learn)
    torch.manual_seed(0)
    tok = model.config.image_token_id
    ids = torch.randint(5, 50, (2, 24))
    ids[:, 1:17] = tok
    pixels = torch.randn(2, 3, 56, 56)
    keys = torch.arange(1, 17).repeat(2, 1)
    rows = torch.tensor([[17, 20, 23], [18, 19, 22]])
    capture.arm(CapturePlan(layers, rows, torch.ones_like(rows, dtype=torch.bool), keys,
                            torch.ones_like(keys, dtype=torch.bool)))
    out = model(input_ids=ids, pixel_values=pixels)
    return out, capture.maps, learn


def test_learn_copy_init_reproduces_the_model_and_trains(tiny_llava_dir: str) -> None:
    ref_out, ref_maps, _ = _llava_step(tiny_llava_dir, projections=False)
    out, maps, learn = _llava_step(tiny_llava_dir, projections=True)
    torch.testing.assert_close(out.logits, ref_out.logits)  # the model's output is unchanged
    for k in ref_maps:
        torch.testing.assert_close(maps[k], ref_maps[k], atol=1e-6, rtol=1e-5)  # copy init = own maps
    sum(m.pow(2).sum() for m in maps.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.parameters())
    _, rnd_maps, _ = _llava_step(tiny_llava_dir, projections=True, init="random")
    k = next(iter(ref_maps))
    assert (rnd_maps[k] - ref_maps[k]).abs().max() > 1e-3


def test_learn_copy_init_on_mllama_cross_attention(tiny_mllama_dir: str) -> None:
    """Cross-attention: keys from the vision states, Mllama's per-head q_norm/k_norm applied, no RoPE."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lavender.vlm.aggregate import keys_from_grids
    from lavender.vlm.backend import CapturePlan, enable_capture

    fam = families()["mllama"]
    proc = fam.load_processor(tiny_mllama_dir)
    image = Image.new("RGB", (70, 40), (200, 30, 30))
    inputs = dict(proc(images=[[image]], text=["<|image|>a red star on the left"], return_tensors="pt"))
    maps = []
    for learn_on in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(tiny_mllama_dir).eval()
        layers = fam.default_layers(model)
        learn = LearnedProjections({i: fam.attention_modules(model)[i] for i in layers}).attach() if learn_on else None
        capture = enable_capture(model, fam, projector=learn)
        keys, key_valid, _ = keys_from_grids(fam.image_grids(inputs, [[image.size]], model.config, proc), 1)
        rows = torch.arange(2, inputs["input_ids"].shape[1])[None]
        capture.arm(CapturePlan(layers, rows, torch.ones_like(rows, dtype=torch.bool), keys, key_valid))
        model(**inputs)
        maps.append(capture.maps)
    for k in maps[0]:
        torch.testing.assert_close(maps[1][k], maps[0][k], atol=1e-6, rtol=1e-5)
    sum(m.pow(2).sum() for m in maps[1].values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learn.parameters())


@pytest.mark.parametrize("multi", [False, True])
def test_word_average_equals_the_averaging_matmul_bit_for_bit(multi: bool) -> None:
    """One-token words take their row by indexing (the fast path), any multi-token word keeps the
    averaging matmul; both give the matmul's numbers and gradients exactly."""
    g = torch.Generator().manual_seed(0)
    pooled = torch.rand(2, 32, 9, 50, generator=g)  # (B, C, R, K)
    words = [[WordRows("a", 0, 1, [2]), WordRows("b", 2, 3, [4]), WordRows("c", 4, 5, [5])],
             [WordRows("d", 0, 1, [1]), WordRows("e", 2, 3, [3, 4] if multi else [3]), WordRows("f", 4, 5, [7])]]
    batch = batch_rows(words)
    weights = torch.rand(3, 32, 50, generator=g)
    x1, x2 = pooled.clone().requires_grad_(), pooled.clone().requires_grad_()
    got = average_word_rows(x1, batch)
    want = []
    for b, columns in enumerate(batch.word_columns):
        avg = torch.zeros(len(columns), pooled.shape[2])
        for w, cols in enumerate(columns):
            avg[w, cols] = 1.0 / len(cols)
        want.append(torch.einsum("wr,crk->wck", avg, x2[b]))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    sum((a * weights).sum() for a in got).backward()
    sum((b * weights).sum() for b in want).backward()
    assert torch.equal(x1.grad, x2.grad)
