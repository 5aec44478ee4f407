"""Stage 1 internals on the tiny DM: captured maps vs an explicit computation, batch invariance,
word merging with the CLIP tokenizer's offsets, and null-text vs DDIM reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _stage1_fixtures import tiny_dm_path

from lavender.diffusion.capture import (
    AttentionAccumulator,
    CaptureCrossAttnProcessor,
    cross_attention_sides,
    install_capture,
)
from lavender.diffusion.extract import DiffusionModel, ExtractConfig, Extractor, words_from_token_maps
from lavender.diffusion.inversion import run_ddim, run_nulltext


@pytest.fixture(scope="module")
def dm():
    return DiffusionModel(tiny_dm_path())


def test_tiny_dm_loads_with_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dm_path())
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert pipe.tokenizer.model_max_length == 77


def test_cross_attention_sides_and_processors(dm):
    sides = cross_attention_sides(dm.unet, dm.latent_side)
    assert sorted(set(sides.values())) == [8, 16]
    assert all(k.endswith("attn2.processor") for k in sides) and len(sides) == 7
    store = AttentionAccumulator([16], 2, 77)
    captured = install_capture(dm.unet, store, sides)
    assert captured == sorted(k for k, s in sides.items() if s == 16)
    procs = dm.unet.attn_processors
    from diffusers.models.attention_processor import AttnProcessor2_0

    for k, p in procs.items():
        assert isinstance(p, CaptureCrossAttnProcessor) == (k in captured)
        if ".attn1." in k:
            assert type(p) is AttnProcessor2_0  # self-attention keeps fused SDPA
    with pytest.raises(ValueError, match=r"--resolutions \[32\] not in this UNet.*\[8, 16\]"):
        install_capture(dm.unet, AttentionAccumulator([16, 32], 1, 77), sides)


def _explicit_probs(attn, hs: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d)) per head from the module's weights, averaged over heads: (B, N, T)."""
    q = hs @ attn.to_q.weight.double().T
    k = ctx @ attn.to_k.weight.double().T
    h = attn.heads
    d = q.shape[-1] // h
    per_head = []
    for i in range(h):
        s = q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / math.sqrt(d)
        per_head.append(torch.exp(s - s.amax(-1, keepdim=True)) / torch.exp(s - s.amax(-1, keepdim=True)).sum(-1,
                        keepdim=True))
    return torch.stack(per_head).mean(0)


def test_captured_maps_equal_explicit_softmax_and_keep_cond_half(dm):
    sides = cross_attention_sides(dm.unet, dm.latent_side)
    store = AttentionAccumulator([8, 16], 2, 77)
    install_capture(dm.unet, store, sides)
    modules = {n: m for n, m in dm.unet.named_modules() if n.endswith("attn2")}
    inputs: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, kw, name=n: inputs.__setitem__(name, (a[0].detach(), kw["encoder_hidden_states"].detach())),
        with_kwargs=True) for n, m in modules.items()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond, uncond = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref_out = dm.eps(torch.cat([x, x]), 301, torch.cat([uncond, cond]))  # SDPA (capture inactive)
        store.reset(2)
        store.active = True
        out = dm.eps(torch.cat([x, x]), 301, torch.cat([uncond, cond]))  # [uncond, cond] as under CFG
        store.active = False
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)  # capturing does not change the UNet
    expected = {8: torch.zeros(2, 64, 77, dtype=torch.float64), 16: torch.zeros(2, 256, 77, dtype=torch.float64)}
    for name, (hs, ctx) in inputs.items():
        side = sides[name + ".processor"]
        p = _explicit_probs(modules[name], hs.double(), ctx.double())
        expected[side] += p[2:]  # rows 2..3 are the conditional half
    # down1 + mid + up0 (2 modules) at 8; down0 + up1 (2 modules) at 16
    assert store.counts == {8: 4, 16: 3} == {s: list(sides.values()).count(s) for s in (8, 16)}
    for side in (8, 16):
        torch.testing.assert_close(store.buffers[side][:2].double(), expected[side], atol=1e-5, rtol=1e-4)
    # token maps: every call weighs equally; the 8×8 sums are upsampled to the map size
    tm = store.token_maps(16)
    up = torch.nn.functional.interpolate(expected[8].transpose(1, 2).reshape(2, 77, 8, 8).float(), size=(16, 16),
                                         mode="bilinear", align_corners=False)
    ref = (up + expected[16].transpose(1, 2).reshape(2, 77, 16, 16).float()) / 7
    torch.testing.assert_close(tm, ref, atol=1e-5, rtol=1e-4)


def test_word_merging_with_tokenizer_offsets(dm):
    text = "a red circle_x, left of e.g. squares; squares!"
    enc = dm.tokenize([text])
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    special = [bool(s) for s in enc["special_tokens_mask"][0].tolist()]
    toks = dm.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    # token t's map is the constant t: a word's map is then the mean of its token positions
    token_maps = torch.arange(77, dtype=torch.float32)[:, None, None].expand(77, 4, 4).clone()
    words, offs, maps, lost = words_from_token_maps(text, offsets, special, token_maps, normalize="none")
    assert words == ["a", "red", "circle_x", "left", "of", "e.g", "squares", "squares"] and lost == 0
    assert offs[2] == (6, 14) and offs[5] == (24, 27) and offs[6] == (29, 36) and offs[7] == (38, 45)

    def pos(start, end):  # independent: positions of non-special tokens overlapping [start, end)
        return [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > start and not special[t]]

    for w, (s, e), m in zip(words, offs, maps):
        p = pos(s, e)
        assert m[0, 0] == pytest.approx(sum(p) / len(p)), (w, p, toks)
    assert len(pos(*offs[2])) == 3 and len(pos(*offs[5])) == 3 and len(pos(*offs[6])) > 1  # multi-token words
    assert maps[6][0, 0] != maps[7][0, 0]  # each occurrence its own map
    # min-max: each map in [0, 1]; a constant map becomes zeros (documented)
    _, _, mm, _ = words_from_token_maps(text, offsets, special, torch.rand(77, 4, 4))
    assert mm.min() >= 0 and mm.max() <= 1 and np.allclose(mm.max(axis=(1, 2)), 1)
    _, _, flat, _ = words_from_token_maps(text, offsets, special, token_maps)
    assert np.all(flat == 0)


def test_long_text_is_truncated_and_reported(dm):
    text = " ".join(["red dog"] * 60)  # 120 words > 75 token slots
    enc = dm.tokenize([text, "a dog"])
    assert enc["truncated"] == [True, False]
    offsets = [tuple(o) for o in enc["offset_mapping"][0].tolist()]
    special = [bool(s) for s in enc["special_tokens_mask"][0].tolist()]
    words, _, maps, lost = words_from_token_maps(text, offsets, special, torch.rand(77, 4, 4))
    assert len(words) == 75 and lost == 45 and maps.shape == (75, 4, 4)


def test_batch_invariance(tmp_path):
    """An image's maps alone equal its maps inside a batch of 4 (tolerance 1e-4 on [0, 1] maps)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40 + 8 * i, 3), dtype=np.uint8)) for i in range(4)]
    from lavender.records import Record

    recs = [Record(id=f"r{i}", index=i, images=[], caption=["a red dog", "two blue squares", "a cat", "e.g. x"][i])
            for i in range(4)]
    cfg = ExtractConfig(dm=tiny_dm_path(), data="-", out="-", resolutions=[8, 16], map_size=16, batch_size=4,
                        steps=2, inversion_steps=1, guidance=3.0)  # guidance > 1: [uncond, cond] batches
    ext = Extractor(cfg)
    batch, _ = ext.extract_batch(recs, images)
    alone, _ = ext.extract_batch(recs[2:3], images[2:3])
    assert batch[2]["words"] == alone[0]["words"] == ["a", "cat"]
    np.testing.assert_allclose(batch[2]["maps"], alone[0]["maps"], atol=1e-4)
    assert not np.allclose(batch[1]["maps"][0], batch[2]["maps"][0], atol=1e-3)  # maps differ between images


def test_nulltext_reconstructs_better_than_ddim(dm):
    """At the same guidance and grid, null-text inversion lands closer to the input latent (its point)."""
    g = torch.Generator().manual_seed(1)
    x0 = dm.encode_images(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)
    cond = dm.encode_text(dm.tokenize(["a red circle left of a blue square"])["input_ids"])
    uncond = dm.encode_text(dm.tokenize([""])["input_ids"])
    kw = {"steps": 3, "guidance": 7.5}
    x_ddim = run_ddim(dm.eps, x0, cond, uncond, dm.schedule, None, inversion_steps=3, **kw)
    x_null = run_nulltext(dm.eps, x0, cond, uncond, dm.schedule, None, inner_steps=5, **kw)
    err_ddim, err_null = float(((x_ddim - x0) ** 2).mean()), float(((x_null - x0) ** 2).mean())
    assert err_null < 0.9 * err_ddim, (err_null, err_ddim)
