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
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, kw, name=n: seen.__setitem__(name, ((a[0] if a else kw["hidden_states"]).detach(),
                                                           kw["encoder_hidden_states"].detach())),
        with_kwargs=True) for n, m in mods.items()]
    return seen, hooks


# ------------------------------------------------------------------------------------------ SDXL
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
    for name, (hs, ctx) in seen.items():
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
