"""Stage 1 teachers beyond SD-1.x (SDXL, SD3, Flux) on tiny random pipelines built offline: detection
from the folder, the conditioning each model is given, captured maps vs an explicit softmax(QKᵀ/√d)
from the module's own weights, extraction end to end, and recipes a teacher refuses."""

from __future__ import annotations

import json
import math
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from _stage1_fixtures import write_images_and_records

from lavender.attnstore import AttentionStore
from lavender.cli import main
from lavender.diffusion.capture import AttentionAccumulator
from lavender.diffusion.extract import load_teacher

FAST = ["--steps", "2", "--inversion-steps", "1", "--map-size", "16", "--no-progress"]


@lru_cache(maxsize=4)
def tiny(architecture: str) -> str:
    """A tiny random pipeline of ``architecture`` at 32 px, built once per test process."""
    from lavender.diffusion.tiny import make_tiny_dm

    out = Path(tempfile.mkdtemp(prefix=f"lavender-tiny-{architecture}-")) / "dm"
    return str(make_tiny_dm(out, seed=0, image_size=32, architecture=architecture))


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _record_inputs(model: torch.nn.Module, suffix: str) -> tuple[dict, list]:
    """Forward-pre-hooks that keep each ``suffix`` attention module's (hidden, encoder hidden) inputs."""
    seen: dict[str, tuple] = {}
    mods = {n: m for n, m in model.named_modules() if n.endswith(suffix)}
    def keep(mod, a, kw, name):
        enc, rot = kw.get("encoder_hidden_states"), kw.get("image_rotary_emb")
        seen[name] = ((a[0] if a else kw["hidden_states"]).detach(), None if enc is None else enc.detach(), rot)

    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, name=n: keep(mod, a, kw, name), with_kwargs=True)
             for n, m in mods.items()]
    return seen, hooks


# ------------------------------------------------------------------------------------------ SDXL
def _capture_one_guided_call(teacher, store) -> tuple[dict, torch.Tensor]:
    """One [uncond, cond] velocity call of a transformer teacher with capture on, its blocks' inputs
    recorded; asserts capture leaves the output unchanged. Returns (inputs per block, conditioning)."""
    seen, hooks = _record_inputs(teacher.transformer, ".attn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, 16, generator=g)
    cond = teacher.encode_prompts(teacher.tokenize(["a red dog", "blue squares left of a cat"]))
    uncond = teacher.null_embedding().expand(2, -1, -1)
    with torch.no_grad():
        ref = teacher.velocity(torch.cat([x, x]), 500.0, torch.cat([uncond, cond]))
        store.reset(2)
        store.active = True
        out = teacher.velocity(torch.cat([x, x]), 500.0, torch.cat([uncond, cond]))
        store.active = False
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    return seen, cond


@pytest.fixture(scope="module")
def sdxl():
    return load_teacher(tiny("sdxl"))


def test_sdxl_is_detected_and_has_no_cross_attention_at_the_top_resolution(sdxl):
    from lavender.diffusion.teachers import SDXLModel, pipeline_class_of

    assert pipeline_class_of(tiny("sdxl")) == "StableDiffusionXLPipeline" and isinstance(sdxl, SDXLModel)
    sides = sdxl.attention_sides()
    # latent 16×16: the first (DownBlock2D) level has no attention; 8 and 4 do
    assert sorted(set(sides.values())) == [4, 8] and sdxl.latent_side == 16
    assert sdxl.default_resolutions(sides) == [4, 8] and sdxl.default_modules is None


def test_sdxl_conditioning_is_what_the_diffusers_pipeline_gives(sdxl):
    """Both encoders' penultimate states per token, the second's pooled projection, the six size ids,
    and the all-zero unconditional embedding: compared with StableDiffusionXLPipeline's own methods."""
    from diffusers import StableDiffusionXLPipeline

    from lavender.diffusion.teachers import unpack

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny("sdxl"), add_watermarker=False)
    texts = ["a red circle_x, left of squares", "two dogs"]
    pe, ne, pp, npool = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=True)
    ctx, pooled = unpack(sdxl.encode_prompts(sdxl.tokenize(texts)), sdxl.pooled_dim)
    torch.testing.assert_close(ctx, pe)
    torch.testing.assert_close(pooled, pp)
    null_ctx, null_pooled = unpack(sdxl.null_embedding(), sdxl.pooled_dim)
    assert not null_ctx.any() and not null_pooled.any() and not ne.any() and not npool.any()
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(sdxl.time_ids, ids)
    # the teacher's UNet call is the pipeline's: same added conditioning
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe.unet(x, torch.tensor([301, 301]), pe,
                        added_cond_kwargs={"text_embeds": pp, "time_ids": ids.expand(2, -1)}).sample
        ours = sdxl.eps(x, 301, sdxl.encode_prompts(sdxl.tokenize(texts)))
    torch.testing.assert_close(ours, ref)


def test_sdxl_captured_maps_equal_explicit_softmax(sdxl):
    sides = sdxl.attention_sides()
    store = AttentionAccumulator([4, 8], 2, 77)
    captured = sdxl.install_capture(store, sides, None)
    assert captured == sorted(sides)
    seen, hooks = _record_inputs(sdxl.unet, "attn2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb = sdxl.encode_prompts(sdxl.tokenize(["a red dog", "blue squares left of a cat"]))
    with torch.no_grad():
        ref = sdxl.eps(x, 500, emb)
        store.reset(2)
        store.active = True
        out = sdxl.eps(x, 500, emb)
        store.active = False
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # capture does not change the UNet
    expected = {4: torch.zeros(2, 16, 77, dtype=torch.float64), 8: torch.zeros(2, 64, 77, dtype=torch.float64)}
    for name, (hs, ctx, _) in seen.items():
        attn = sdxl.unet.get_submodule(name)
        q = hs.double() @ attn.to_q.weight.double().T
        k = ctx.double() @ attn.to_k.weight.double().T
        h, d = attn.heads, q.shape[-1] // attn.heads
        probs = torch.stack([_softmax_rows(q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2)
                                           / math.sqrt(d)) for i in range(h)]).mean(0)
        expected[sides[name + ".processor"]] += probs
    assert store.counts == {4: 8, 8: 3}
    for side in (4, 8):
        torch.testing.assert_close(store.buffers[side][:2].double(), expected[side], atol=1e-5, rtol=1e-4)


def test_sdxl_tokenizers_that_split_differently_are_refused(sdxl, tmp_path):
    """Key i of SDXL's cross-attention is token i of BOTH tokenizers; a second tokenizer without the
    first's merges puts other text at position i: refused, naming the text."""
    from lavender.diffusion.tiny import build_vocab_and_merges, write_clip_tokenizer

    vocab, merges = build_vocab_and_merges()
    other = write_clip_tokenizer(tmp_path / "chars", vocab, merges[:1])  # "red" → r, e, d
    original = sdxl.tokenizer_2
    sdxl.tokenizer_2 = other
    try:
        with pytest.raises(ValueError, match="split 'a red dog' differently"):
            sdxl.tokenize(["a red dog"])
    finally:
        sdxl.tokenizer_2 = original


@pytest.mark.parametrize("recipe,extra,evals", [("ddim", [], 3), ("noise", ["--timesteps", "300"], 1),
                                                ("nulltext", ["--inner-steps", "1"], 8)])
def test_sdxl_extracts_end_to_end(tmp_path, capsys, recipe, extra, evals):
    data = write_images_and_records(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert main(["extract", "--dm", tiny("sdxl"), "--data", str(data), "--out", str(out), "--recipe", recipe,
                 "--json", *FAST, *extra]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] == 2 and summary["unet_evals_per_image"] == evals
    store = AttentionStore(out)
    m = store.manifest
    assert m["dm"]["class"] == "StableDiffusionXLPipeline" and m["resolutions"] == [4, 8]
    assert set(m["modules_by_resolution"]) == {"4", "8"} and all(m["modules_by_resolution"].values())
    ex = store.get("img_000")
    assert ex["words"] == ["a", "red", "circle", "left", "of", "a", "blue", "square", "0"]
    assert ex["maps"].shape == (9, 16, 16) and np.isfinite(ex["maps"]).all() and ex["maps"].max() == 1


def test_sdxl_base_architecture_has_sdxl_sizes():
    """The GPU benchmarks' random SDXL must be SDXL-base-sized: its UNet (meta device, no weights) has
    SDXL base 1.0's 2,567,463,684 parameters and cross-attention at sides 64 and 32 only (1024 px)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lavender.diffusion.capture import cross_attention_sides
    from lavender.diffusion.tiny import ARCHITECTURES

    with init_empty_weights():
        unet = UNet2DConditionModel(sample_size=128, in_channels=4, out_channels=4,
                                    **ARCHITECTURES["sdxl-base"]["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    added = {"text_embeds": torch.zeros(1, 1280, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    assert sorted(set(cross_attention_sides(unet, 128, added_cond_kwargs=added).values())) == [32, 64]


# ------------------------------------------------------------------------------------------- SD3
@pytest.fixture(scope="module")
def sd3():
    return load_teacher(tiny("sd3"))


def test_sd3_is_detected_with_transformer_defaults(sd3):
    """Its own defaults: one resolution (the 8×8 token grid of a 16×16 latent in 2×2 patches), every
    joint block; SD-1.x's 16/32 sides and UNet module names do not apply to it."""
    from lavender.diffusion.teachers import SD3Model

    assert isinstance(sd3, SD3Model) and sd3.flow and sd3.grid == 8
    sides = sd3.attention_sides()
    assert sides == {"transformer_blocks.0.attn.processor": 8, "transformer_blocks.1.attn.processor": 8}
    assert sd3.default_resolutions(sides) == [8] and sd3.default_modules is None
    with pytest.raises(ValueError, match=r"--resolutions \[16, 32\] not in this StableDiffusion3Pipeline"):
        sd3.install_capture(AttentionAccumulator([16, 32], 1, 256), sides, None)
    with pytest.raises(ValueError, match="match no joint attention block"):
        sd3.install_capture(AttentionAccumulator([8], 1, 256), sides, ["down_blocks.0"])


def test_sd3_conditioning_is_what_the_diffusers_pipeline_gives(sd3):
    from diffusers import StableDiffusion3Pipeline

    from lavender.diffusion.teachers import unpack

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny("sd3"))
    texts = ["a red circle_x, left of squares", "two dogs"]
    pe, ne, pp, npool = pipe.encode_prompt(texts, texts, texts, device="cpu", do_classifier_free_guidance=True)
    tokens, pooled = unpack(sd3.encode_prompts(sd3.tokenize(texts)), sd3.pooled_dim)
    assert tokens.shape == (2, 77 + 256, 32) and pooled.shape == (2, 24)
    torch.testing.assert_close(tokens, pe)
    torch.testing.assert_close(pooled, pp)
    null_tokens, null_pooled = unpack(sd3.null_embedding(), sd3.pooled_dim)
    torch.testing.assert_close(null_tokens, ne[:1])
    torch.testing.assert_close(null_pooled, npool[:1])
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # velocity at σ = 0.3: the pipeline passes timestep σ·1000
        ref = pipe.transformer(hidden_states=x, timestep=torch.tensor([300.0, 300.0]), encoder_hidden_states=pe,
                               pooled_projections=pp).sample
        ours = sd3.velocity(x, 300.0, sd3.encode_prompts(sd3.tokenize(texts)))
    torch.testing.assert_close(ours, ref)


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """diffusers' RMSNorm, written out: x / sqrt(mean(x²) + eps) · weight."""
    if norm is None:
        return x
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight.double() if norm.weight is not None else y


def test_sd3_captured_maps_equal_explicit_softmax_over_all_keys(sd3):
    """The stored block is softmax(QKᵀ/√d) of image queries over ALL N + 77 + 256 keys (Q, K from the
    block's own projection weights and q/k RMS norms), restricted to the T5 keys, heads averaged, the
    conditional half of an [uncond, cond] batch; capture does not change the transformer's output."""
    import torch.nn.functional as F

    sides = sd3.attention_sides()
    store = AttentionAccumulator([8], 2, 256)
    assert sd3.install_capture(store, sides, None) == sorted(sides)
    seen, cond = _capture_one_guided_call(sd3, store)
    expected = torch.zeros(2, 64, 256, dtype=torch.float64)
    for name, (hs, ctx, _) in seen.items():
        attn = sd3.transformer.get_submodule(name)
        heads, d = attn.heads, attn.to_q.out_features // attn.heads

        def proj(lin, t, heads=heads, d=d):
            return F.linear(t.double(), lin.weight.double(), lin.bias.double()).view(t.shape[0], -1, heads, d)

        assert attn.norm_q is not None and attn.norm_added_k is not None  # the tiny SD3 has SD3.5's q/k norms
        q = _rms(proj(attn.to_q, hs), attn.norm_q)
        k = torch.cat([_rms(proj(attn.to_k, hs), attn.norm_k), _rms(proj(attn.add_k_proj, ctx), attn.norm_added_k)],
                      dim=1)
        probs = torch.stack([_softmax_rows(q[:, :, i] @ k[:, :, i].transpose(1, 2) / math.sqrt(d))
                             for i in range(heads)]).mean(0)  # (B, 64, 64 + 77 + 256)
        expected += probs[2:, :, 64 + 77:]
    assert store.counts == {8: 2}
    torch.testing.assert_close(store.buffers[8][:2].double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("recipe,extra,evals", [("ddim", [], 3), ("ddim", ["--guidance", "3"], 5),
                                                ("noise", ["--timesteps", "300", "700"], 2)])
def test_sd3_extracts_end_to_end(tmp_path, capsys, recipe, extra, evals):
    """No --resolutions / --layers given: SD3's own defaults apply (one 8×8 grid, both joint blocks);
    words come from T5's tokens."""
    data = write_images_and_records(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert main(["extract", "--dm", tiny("sd3"), "--data", str(data), "--out", str(out), "--recipe", recipe,
                 "--json", *FAST, *extra]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] == 2 and summary["unet_evals_per_image"] == evals
    store = AttentionStore(out)
    m = store.manifest
    assert m["dm"]["class"] == "StableDiffusion3Pipeline" and m["resolutions"] == [8]
    assert m["captured_modules"] == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert m["text"]["max_length"] == 256 and "T5" in m["text"]["tokenizer"]
    ex = store.get("img_001")
    assert ex["words"] == ["a", "red", "circle", "left", "of", "a", "blue", "square", "1"]
    assert ex["maps"].shape == (9, 16, 16) and np.isfinite(ex["maps"]).all() and ex["maps"].max() == 1


@pytest.mark.parametrize("flags,needle", [(["--recipe", "nulltext"], "nulltext is not defined for "
                                           "StableDiffusion3Pipeline"),
                                          (["--layers", "down_blocks.0"], "match no joint attention block"),
                                          (["--resolutions", "16", "32"], "not in this StableDiffusion3Pipeline"),
                                          (["--recipe", "noise", "--timesteps", "1000"], "give values in 0..999")])
def test_sd3_refusals_are_one_line(tmp_path, capsys, flags, needle):
    """A real run and ``--dry-run`` refuse the same choices (recipe, resolutions, modules, timesteps), with
    the same line and exit code: the dry run never estimates a run that would be refused."""
    data = write_images_and_records(tmp_path / "data", 1)
    seen = []
    for dry in ([], ["--dry-run"]):
        rc = main(["extract", "--dm", tiny("sd3"), "--data", str(data), "--out", str(tmp_path / "o"), *FAST,
                   *flags, *dry])
        out, err = capsys.readouterr()
        (line,) = [s for s in err.splitlines() if s.startswith("lavender extract: error:")]
        assert rc != 0 and needle in line and "Traceback" not in err and "dry" not in out, dry
        seen.append((rc, line))
    assert seen[0] == seen[1]


def test_flow_recipes_follow_the_flow_ode(sd3, monkeypatch):
    """``noise`` reads x_σ = (1 − σ)·x_0 + σ·ε at timestep σ·1000 and returns x_σ − σ·v; ``ddim`` Euler-
    inverts up to the top of the scheduler's grid and integrates back down it, so a constant velocity
    field (a straight flow, where Euler is exact) reconstructs x_0 exactly."""
    calls: list[tuple[torch.Tensor, float]] = []
    c = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))

    def stub(x, t, emb):
        calls.append((x.clone(), t))
        return c.expand_as(x).clone()

    monkeypatch.setattr(sd3, "_forward", stub)
    store = AttentionAccumulator([8], 1, 256)
    x0, eps = torch.randn(1, 16, 16, 16), torch.randn(1, 16, 16, 16)
    cond = torch.zeros(1, 334, 32)
    pred = sd3._run_noise(x0, cond, store, [300], eps)
    torch.testing.assert_close(calls[0][0], 0.7 * x0 + 0.3 * eps)
    assert calls[0][1] == pytest.approx(300.0)
    torch.testing.assert_close(pred, calls[0][0] - 0.3 * c)
    calls.clear()
    rec = sd3._run_euler(x0, cond, cond, store, steps=4, inversion_steps=2, guidance=1.0)
    grid = sd3.schedule.sigmas(4)
    assert grid[0] == pytest.approx(1.0) and grid[-1] == 0.0 and len(calls) == 2 + 4
    assert [t for _, t in calls] == pytest.approx([500.0, 1000.0] + [s * 1000 for s in grid[:-1]])
    torch.testing.assert_close(rec, x0, atol=1e-5, rtol=1e-5)


def test_sd3_medium_architecture_has_sd3_medium_sizes():
    """The GPU benchmarks' random SD3 must be SD3-medium-sized: its MM-DiT (meta device) has SD3 medium's
    2,028,328,000 parameters, 24 joint blocks, and a 64×64 token grid at 1024 px."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from lavender.diffusion.tiny import ARCHITECTURES

    arch = ARCHITECTURES["sd3-medium"]
    with init_empty_weights():
        t = SD3Transformer2DModel(sample_size=128, **arch["transformer"])
    assert sum(p.numel() for p in t.parameters()) == 2_028_328_000
    assert len(t.transformer_blocks) == 24 and 128 // t.config.patch_size == 64 and arch["image_size"] == 1024



# ------------------------------------------------------------------------------------------ Flux
@pytest.fixture(scope="module")
def flux():
    return load_teacher(tiny("flux"))


def test_flux_is_detected_with_double_stream_defaults(flux):
    from lavender.diffusion.teachers import FluxModel

    assert isinstance(flux, FluxModel) and flux.flow and flux.grid == 8 and flux.image_size == 32
    sides = flux.attention_sides()
    assert sorted(sides) == ["single_transformer_blocks.0.attn.processor", "transformer_blocks.0.attn.processor",
                             "transformer_blocks.1.attn.processor"] and set(sides.values()) == {8}
    assert flux.default_resolutions(sides) == [8] and flux.default_modules == ["transformer_blocks."]
    store = AttentionAccumulator([8], 1, 512)
    assert flux.install_capture(store, sides, flux.default_modules) == ["transformer_blocks.0.attn.processor",
                                                                        "transformer_blocks.1.attn.processor"]


def test_flux_conditioning_and_call_are_the_pipelines(flux):
    """T5 states + CLIP pooled as FluxPipeline.encode_prompt gives them; the velocity is the transformer
    called on the pipeline's 2×2-packed latents, image/text position ids, σ as timestep, guidance 3.5."""
    from diffusers import FluxPipeline

    from lavender.diffusion.teachers import unpack

    pipe = FluxPipeline.from_pretrained(tiny("flux"))
    texts = ["a red circle_x, left of squares", "two dogs"]
    pe, pp, text_ids = pipe.encode_prompt(texts, texts, device="cpu")
    tokens, pooled = unpack(flux.encode_prompts(flux.tokenize(texts)), flux.pooled_dim)
    assert tokens.shape == (2, 512, 32) and pooled.shape == (2, 16)
    ids = pipe.tokenizer_2(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert torch.equal(flux.tokenize(texts)["input_ids"], ids["input_ids"])
    torch.testing.assert_close(tokens, pe, atol=1e-4, rtol=1e-4)  # the same T5 call; float32 reduction order
    torch.testing.assert_close(pooled, pp)
    torch.testing.assert_close(flux.txt_ids, text_ids)
    torch.testing.assert_close(flux.img_ids, pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, 16, 16, 16), timestep=torch.tensor([0.3, 0.3]),
                               guidance=torch.tensor([3.5, 3.5]), pooled_projections=pp, encoder_hidden_states=pe,
                               txt_ids=text_ids, img_ids=flux.img_ids).sample
        ours = flux.velocity(x, 300.0, flux.encode_prompts(flux.tokenize(texts)))
    torch.testing.assert_close(ours, pipe._unpack_latents(ref, 32, 32, 2))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding written out, x (B, S, H, d): rotate each (even, odd) pair by the angle
    of its position: (a, b) → (a·cos − b·sin, b·cos + a·sin)."""
    a, b = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-b, a], dim=-1).flatten(-2)
    return x * cos[None, :, None, :].double() + rotated * sin[None, :, None, :].double()


def test_flux_captured_maps_equal_explicit_softmax_with_rope(flux):
    """Double-stream AND single-stream blocks: softmax(QKᵀ/√d) over the whole [512 text, 64 image]
    sequence, Q/K from the block's own projections, q/k RMS norms, then RoPE, text FIRST; the stored
    block is image rows × T5 columns, heads averaged, conditional half; output unchanged."""
    import torch.nn.functional as F

    sides = flux.attention_sides()
    store = AttentionAccumulator([8], 2, 512)
    flux.install_capture(store, sides, ["transformer_blocks.", "single_transformer_blocks."])
    seen, cond = _capture_one_guided_call(flux, store)
    assert sorted(seen) == [k.rsplit(".processor", 1)[0] for k in sorted(sides)]
    expected = torch.zeros(2, 64, 512, dtype=torch.float64)
    for name, (hs, ctx, (cos, sin)) in seen.items():
        attn = flux.transformer.get_submodule(name)
        heads, d = attn.heads, attn.head_dim

        def proj(lin, t, norm, heads=heads, d=d):
            return _rms(F.linear(t.double(), lin.weight.double(), lin.bias.double()).view(t.shape[0], -1, heads, d),
                        norm)

        q, k = proj(attn.to_q, hs, attn.norm_q), proj(attn.to_k, hs, attn.norm_k)
        if ctx is not None:  # double-stream: text projections first
            q = torch.cat([proj(attn.add_q_proj, ctx, attn.norm_added_q), q], dim=1)
            k = torch.cat([proj(attn.add_k_proj, ctx, attn.norm_added_k), k], dim=1)
        assert q.shape[1] == 512 + 64
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        probs = torch.stack([_softmax_rows(q[:, :, i] @ k[:, :, i].transpose(1, 2) / math.sqrt(d))
                             for i in range(heads)]).mean(0)
        expected += probs[2:, 512:, :512]  # conditional half, image queries, text keys
    assert store.counts == {8: 3}
    torch.testing.assert_close(store.buffers[8][:2].double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("recipe,extra,evals,modules", [
    ("ddim", [], 3, ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]),
    ("noise", ["--timesteps", "300"], 1, ["transformer_blocks.0.attn.processor",
                                          "transformer_blocks.1.attn.processor"]),
    ("noise", ["--layers", "single_transformer_blocks"], 1, ["single_transformer_blocks.0.attn.processor"])])
def test_flux_extracts_end_to_end(tmp_path, capsys, recipe, extra, evals, modules):
    data = write_images_and_records(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert main(["extract", "--dm", tiny("flux"), "--data", str(data), "--out", str(out), "--recipe", recipe,
                 "--json", *FAST, *extra]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] == 2 and summary["unet_evals_per_image"] == evals
    m = AttentionStore(out).manifest
    assert m["dm"]["class"] == "FluxPipeline" and m["resolutions"] == [8] and m["captured_modules"] == modules
    assert m["text"]["max_length"] == 512
    ex = AttentionStore(out).get("img_000")
    assert ex["words"] == ["a", "red", "circle", "left", "of", "a", "blue", "square", "0"]
    assert ex["maps"].shape == (9, 16, 16) and np.isfinite(ex["maps"]).all() and ex["maps"].max() == 1


def test_flux_nulltext_is_refused_in_one_line(tmp_path, capsys):
    data = write_images_and_records(tmp_path / "data", 1)
    assert main(["extract", "--dm", tiny("flux"), "--data", str(data), "--out", str(tmp_path / "o"), *FAST,
                 "--recipe", "nulltext"]) != 0
    err = capsys.readouterr().err
    assert "nulltext is not defined for FluxPipeline" in err and "Traceback" not in err


def test_flux_dev_architecture_has_flux_dev_sizes():
    """The GPU benchmarks' random Flux must be FLUX.1-dev-sized: 11,901,408,320 transformer parameters
    (meta device), 19 double- and 38 single-stream blocks."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lavender.diffusion.tiny import ARCHITECTURES

    with init_empty_weights():
        t = FluxTransformer2DModel(**ARCHITECTURES["flux-dev"]["transformer"])
    assert sum(p.numel() for p in t.parameters()) == 11_901_408_320
    assert (len(t.transformer_blocks), len(t.single_transformer_blocks)) == (19, 38)


@pytest.mark.parametrize("architecture,pipeline", [("sdxl", "StableDiffusionXLPipeline"),
                                                   ("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_tiny_dm_command_writes_each_teacher(tmp_path, capsys, architecture, pipeline):
    from lavender.diffusion.teachers import pipeline_class_of

    assert main(["tiny-dm", str(tmp_path / "dm"), "--architecture", architecture, "--image-size", "32"]) == 0
    assert f"{architecture} " in capsys.readouterr().out and pipeline_class_of(str(tmp_path / "dm")) == pipeline


def test_dry_run_on_a_transformer_teacher(tmp_path, capsys):
    """--dry-run times one transformer call for a flow teacher and prints its evaluations per image."""
    data = write_images_and_records(tmp_path / "data", 2)
    assert main(["extract", "--dm", tiny("sd3"), "--data", str(data), "--out", str(tmp_path / "o"), "--dry-run",
                 "--json", "--recipe", "noise", "--timesteps", "200", "600"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["to_do"] == 2 and s["unet_evals_per_image"] == 2 and s["estimated_seconds"] > 0
    assert not (tmp_path / "o").exists()


def test_flux_ddim_grid_is_flux_pipelines(flux):
    """The Euler grid of Flux's ``ddim`` is FluxPipeline's: linspace(1, 1/n, n) shifted by the mu that
    calculate_shift gives for the image's token count."""
    import copy

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = copy.deepcopy(flux.schedule.scheduler)
    c = sched.config
    mu = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(sched, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    assert flux.schedule.sigmas(4) == pytest.approx([float(s) for s in sched.sigmas])
