"""Capture backend: captured slices == eager ``output_attentions`` slices, for every family's tiny model.

Tolerance: 1e-5 absolute on probabilities (float32 models; observed ~1e-7): the capture recomputes
q·kᵀ in float32 from the same q/k the eager path uses, so only summation order differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.vlm.aggregate import keys_from_grids
from lavender.vlm.backend import CapturePlan, disable_capture, enable_capture
from lavender.vlm.families import families

ARCHS = sorted(families())  # every registered family, with no list to keep in sync
TEXTS = ["a red circle on the left", "two blue squares", "the small green triangle is above a big yellow star"]
SIZES = [(70, 40), (48, 64), (56, 56)]
TOL = 1e-5


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def _load(path: str, attn: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn).eval()


def make_batch(arch: str, path: str, n: int, padding_side: str) -> tuple[dict, tuple]:
    """``n`` samples of different lengths (so padding happens) and image sizes, processed for real."""
    fam = families()[arch]
    proc = fam.load_processor(path)
    proc.tokenizer.padding_side = padding_side
    texts, images, starts = [], [], []
    for i in range(n):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is here?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": TEXTS[i % 3]}]}]
        texts.append(proc.apply_chat_template(msgs, tokenize=False))
        # where the answer starts: PaliGemma's processor gets it apart (the causal suffix after its prefix)
        starts.append(len(proc.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)))
        images.append(_image(i, SIZES[i % 3]))
    # every supported processor takes one list of images per sample; the family runs it, as the collator does
    inputs = fam.encode(proc, texts, [[im] for im in images], starts, padding=True, return_tensors="pt")
    # image_grids needs the original sizes and the processor's resize settings (Idefics3)
    return dict(inputs), ([[im.size] for im in images], proc)


def plan_for(arch: str, model: torch.nn.Module, inputs: dict, meta: tuple, layers: list[int]) -> CapturePlan:
    """Rows: every real token from the first text row on, at most 6 per sample (unequal counts → padding)."""
    fam = families()[arch]
    image_sizes, processor = meta
    grids = fam.image_grids(inputs, image_sizes, model.config, processor)
    keys, key_valid, _ = keys_from_grids(grids, inputs["input_ids"].shape[0])
    first = fam.first_text_row(inputs["input_ids"], model.config)
    mask = inputs["attention_mask"].bool()
    per_sample = []
    for b in range(mask.shape[0]):
        real = [t for t in torch.nonzero(mask[b]).flatten().tolist() if t >= int(first[b])]
        per_sample.append(real[-(6 - b):])  # last tokens, 6, 5, 4 of them
    width = max(len(r) for r in per_sample)
    rows = torch.zeros(len(per_sample), width, dtype=torch.long)
    valid = torch.zeros_like(rows, dtype=torch.bool)
    for b, r in enumerate(per_sample):
        rows[b, : len(r)] = torch.tensor(r)
        valid[b, : len(r)] = True
    return CapturePlan(layers, rows, valid, keys, key_valid)


def expected_slice(attn: torch.Tensor, plan: CapturePlan) -> torch.Tensor:
    """The plan's slice of an eager ``(B, H, T, S)`` attention, by plain indexing (independent of the backend)."""
    out = torch.zeros(attn.shape[0], attn.shape[1], plan.rows.shape[1], plan.keys.shape[1])
    for b in range(attn.shape[0]):
        for i, t in enumerate(plan.rows[b].tolist()):
            if not plan.row_valid[b, i]:
                continue
            for j, k in enumerate(plan.keys[b].tolist()):
                if plan.key_valid[b, j]:
                    out[b, :, i, j] = attn[b, :, t, k]
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n,padding_side", [(1, "right"), (3, "right"), (3, "left")])
def test_capture_equals_eager(arch: str, n: int, padding_side: str, tiny_vlm) -> None:
    path = tiny_vlm(arch)
    fam = families()[arch]
    inputs, sizes = make_batch(arch, path, n, padding_side)
    ref_model = _load(path, "eager")
    with torch.no_grad():
        ref = ref_model(**inputs, output_attentions=True)
    model = _load(path)
    layers = fam.default_layers(model)
    capture = enable_capture(model, fam)
    plan = plan_for(arch, model, inputs, sizes, layers)
    capture.arm(plan)
    with torch.no_grad():
        out = model(**inputs)
    real = inputs["attention_mask"].bool()
    # the model's own output is unchanged by capture (SDPA), on real tokens
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-4, rtol=1e-4)
    assert sorted(capture.maps) == sorted(layers)
    # hybrid models (MiniCPM-V 4.6's Qwen3.5: DeltaNet + attention) return the attention layers' maps only
    eager = dict(enumerate(ref.attentions)) if len(ref.attentions) > max(layers) else \
        dict(zip(sorted(fam.attention_modules(ref_model)), ref.attentions))
    for layer in layers:
        got = capture.maps[layer]
        assert got.shape == (n, eager[layer].shape[1], plan.rows.shape[1], plan.keys.shape[1])
        want = expected_slice(eager[layer], plan)
        assert (got - want).abs().max() < TOL, f"{arch} layer {layer}"
        assert want.sum() > 0  # the comparison is not between two zero tensors
    disable_capture(model, fam)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def _loss(maps: dict[int, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return sum((m * weights[: m.shape[1], : m.shape[2], : m.shape[3]]).sum() for m in maps.values())


def test_gradients_reach_lora_and_base_weights(tiny_llava_dir: str) -> None:
    from peft import LoraConfig, get_peft_model

    fam = families()["llava"]
    inputs, sizes = make_batch("llava", tiny_llava_dir, 3, "left")
    weights = torch.rand(16, 16, 16)
    # base weights (full fine-tuning)
    model = _load(tiny_llava_dir)
    layers = fam.default_layers(model)
    capture = enable_capture(model, fam)
    capture.arm(plan_for("llava", model, inputs, sizes, layers))
    model(**inputs)
    _loss(capture.maps, weights).backward()
    q = fam.attention_modules(model)[layers[0]].q_proj.weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    # LoRA: lora_B starts at zero, so its gradient is the one that must be non-zero
    model = _load(tiny_llava_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=fam.lora_target_regex))
    capture = enable_capture(peft_model, fam)
    capture.arm(plan_for("llava", model, inputs, sizes, layers))
    peft_model(**inputs)
    _loss(capture.maps, weights).backward()
    lora_q = fam.attention_modules(peft_model.get_base_model())[layers[0]].q_proj
    grad = lora_q.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", [a for a in ("llava", "mllama") if a in ARCHS])
def test_gradient_checkpointing_same_loss_and_grads(arch: str, tiny_vlm) -> None:
    path = tiny_vlm(arch)
    fam = families()[arch]
    inputs, sizes = make_batch(arch, path, 3, "right")
    weights = torch.rand(64, 64, 64)
    results = []
    for checkpointing in (False, True):
        model = _load(path)
        model.train()  # checkpointing is active in training mode only (tiny configs have no dropout)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = fam.default_layers(model)
        capture = enable_capture(model, fam)
        plan = plan_for(arch, model, inputs, sizes, layers)
        capture.arm(plan)
        calls = []
        record = capture.record
        capture.record = lambda *a, _c=calls, _r=record, **k: (_c.append(1), _r(*a, **k))  # count captures
        out = model(**inputs)
        maps_before = {k: v for k, v in capture.maps.items()}
        loss = out.logits.float().pow(2).mean() + _loss(capture.maps, weights)
        loss.backward()
        # checkpointing really recomputed the watched layers during backward (else this test is moot)
        assert len(calls) == len(layers) * (2 if checkpointing else 1)
        # recomputation in backward overwrote by layer: still one map per layer, same shape
        assert sorted(capture.maps) == sorted(layers)
        for k in layers:
            assert capture.maps[k].shape == maps_before[k].shape
        capture.clear()
        assert capture.maps == {}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "q_proj" in n}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def test_state_is_per_step(tiny_llava_dir: str) -> None:
    fam = families()["llava"]
    model = _load(tiny_llava_dir)
    layers = fam.default_layers(model)
    capture = enable_capture(model, fam)
    inputs3, sizes3 = make_batch("llava", tiny_llava_dir, 3, "right")
    inputs1, sizes1 = make_batch("llava", tiny_llava_dir, 1, "right")
    with torch.no_grad():
        capture.arm(plan_for("llava", model, inputs3, sizes3, layers))
        model(**inputs3)
        assert all(m.shape[0] == 3 for m in capture.maps.values())
        plan1 = plan_for("llava", model, inputs1, sizes1, layers[:1])
        capture.arm(plan1)  # a new step: batch size 1, one layer
        assert capture.maps == {}
        model(**inputs1)
        assert sorted(capture.maps) == layers[:1] and capture.maps[layers[0]].shape[0] == 1
        capture.clear()
        model(**inputs1)  # disarmed: nothing captured
        assert capture.maps == {}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", [a for a in ("llava", "mllama") if a in ARCHS])
def test_row_chunks_give_the_same_maps_and_grads(arch: str, checkpointing: bool, tiny_vlm, monkeypatch) -> None:
    """Scoring rows in checkpointed chunks (the memory bound for real sizes) changes nothing: the same
    maps and q_proj gradients as one unchunked slice, with and without model gradient checkpointing."""
    import lavender.vlm.backend as backend

    path = tiny_vlm(arch)
    fam = families()[arch]
    inputs, sizes = make_batch(arch, path, 3, "left")
    weights = torch.rand(64, 64, 64)
    calls: list[int] = []
    real_slice = backend.attention_slice
    monkeypatch.setattr(backend, "attention_slice", lambda q, k, m, plan, *a, **kw: (
        calls.append(plan.rows.shape[1]), real_slice(q, k, m, plan, *a, **kw))[1])
    results = []
    for chunk_bytes in (2**40, 1):  # one slice; one row per chunk
        model = _load(path)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = fam.default_layers(model)
        capture = enable_capture(model, fam)
        capture.chunk_bytes = chunk_bytes
        capture.arm(plan_for(arch, model, inputs, sizes, layers))
        calls.clear()
        out = model(**inputs)
        maps = {k: v.detach().clone() for k, v in capture.maps.items()}
        loss = out.logits.float().pow(2).mean() + _loss(capture.maps, weights)
        loss.backward()
        capture.clear()
        rows_per_call = sorted(set(calls))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "q_proj" in n}
        results.append((maps, loss.detach(), grads, rows_per_call))
    (maps_a, loss_a, grads_a, rows_a), (maps_b, loss_b, grads_b, rows_b) = results
    assert rows_a == [6] and rows_b == [1]  # the chunked run really scored one row at a time
    for k in maps_a:
        torch.testing.assert_close(maps_a[k], maps_b[k], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("float_mask", [False, True])
def test_keys_no_row_may_see_are_dropped_without_changing_maps_or_grads(float_mask: bool) -> None:
    """Mllama's padding tiles are masked for every row: the slice skips those keys (the cost), and the
    probabilities and gradients equal a softmax over ALL keys computed by hand."""
    from lavender.vlm.backend import attention_slice

    g = torch.Generator().manual_seed(0)
    bsz, heads, kv, t_len, s_len, dim = 2, 4, 2, 6, 40, 8
    q = torch.randn(bsz, heads, t_len, dim, generator=g, requires_grad=True)
    k = torch.randn(bsz, kv, s_len, dim, generator=g, requires_grad=True)
    allowed = torch.ones(bsz, 1, t_len, s_len, dtype=torch.bool)
    allowed[..., 10:30] = False  # dead for every row of the batch (two of four "tiles")
    allowed[1, :, :, 30:34] = False  # dead for one sample only: kept as columns, masked per sample
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min) if float_mask else allowed
    keys = torch.tensor([[0, 5, 12, 31, 39], [1, 15, 30, 33, 38]])
    plan = CapturePlan([0], torch.tensor([[5, 4, 3], [5, 2, 0]]), torch.tensor([[True] * 3, [True, True, False]]),
                       keys, torch.ones_like(keys, dtype=torch.bool))
    got = attention_slice(q, k, mask, plan)
    kk = k.repeat_interleave(heads // kv, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * dim**-0.5
    probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(torch.float32).min), -1)
    want = torch.zeros_like(got)
    for b in range(bsz):
        for i, r in enumerate(plan.rows[b].tolist()):
            if plan.row_valid[b, i]:
                want[b, :, i] = probs[b, :, r, keys[b]]
    torch.testing.assert_close(got, want)
    assert got[0, :, :, 2].abs().max() == 0 and got[1, :, :, 1].abs().max() == 0  # dead keys: probability 0
    w = torch.randn(got.shape, generator=g)
    gq, gk = torch.autograd.grad((got * w).sum(), (q, k))
    wq, wk = torch.autograd.grad((want * w).sum(), (q, k))
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gk, wk)


def test_row_chunks_are_sized_by_the_keys_a_row_may_see(monkeypatch) -> None:
    """The chunk bound counts the keys the slice really scores: with half the keys masked for every row
    (Mllama's padding tiles), rows that fit in ``chunk_bytes`` over the LIVE keys are scored in one
    slice, not chunked (and recomputed in backward) as if all keys were scored; the maps are unchanged."""
    import lavender.vlm.backend as backend
    from lavender.vlm.backend import AttentionCapture, attention_slice

    g = torch.Generator().manual_seed(0)
    bsz, heads, kv, t_len, s_len, dim, n_rows = 1, 4, 2, 8, 64, 8, 6
    q = torch.randn(bsz, heads, t_len, dim, generator=g, requires_grad=True)
    k = torch.randn(bsz, kv, s_len, dim, generator=g, requires_grad=True)
    allowed = torch.ones(bsz, 1, t_len, s_len, dtype=torch.bool)
    allowed[..., 32:] = False
    keys = torch.arange(0, 32, 4)[None]
    plan = CapturePlan([0], torch.arange(n_rows)[None], torch.ones(1, n_rows, dtype=torch.bool),
                       keys, torch.ones_like(keys, dtype=torch.bool))
    calls: list[int] = []
    monkeypatch.setattr(backend, "attention_slice", lambda qq, kk, m, p, *a, **kw: (
        calls.append(p.rows.shape[1]), attention_slice(qq, kk, m, p, *a, **kw))[1])
    module = torch.nn.Module()
    module.layer_idx = 0
    capture = AttentionCapture(causal=False, chunk_bytes=bsz * heads * 32 * 4 * n_rows)  # all rows × live keys
    capture.arm(plan)
    capture.record(module, q, k, allowed, None, None)
    assert calls == [n_rows]
    torch.testing.assert_close(capture.maps[0], attention_slice(q, k, allowed, plan))
    capture.chunk_bytes //= 2  # now two chunks of three rows, the same numbers
    calls.clear()
    capture.record(module, q, k, allowed, None, None)
    assert calls == [3, 3]
    torch.testing.assert_close(capture.maps[0], attention_slice(q, k, allowed, plan))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_mask_that_allows_every_kept_key_is_skipped_bit_for_bit(kind: str) -> None:
    """Every key allowed to every planned row (Mllama's valid tiles): skipping the mask (and the ×1 of
    all-valid rows and keys) gives exactly the numbers and gradients of no mask at all."""
    from lavender.vlm.backend import attention_slice

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 20, 8, generator=g, requires_grad=True)
    mask = torch.ones(1, 1, 6, 20, dtype=torch.bool) if kind == "bool" else torch.zeros(1, 1, 6, 20)
    keys = torch.arange(20)[None]
    plan = CapturePlan([0], torch.tensor([[1, 3, 5]]), torch.ones(1, 3, dtype=torch.bool), keys,
                       torch.ones_like(keys, dtype=torch.bool))
    got, want = attention_slice(q, k, mask, plan), attention_slice(q, k, None, plan, causal=False)
    assert torch.equal(got, want)
    w = torch.randn(got.shape, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k)),
                                                   torch.autograd.grad((want * w).sum(), (q, k))))
