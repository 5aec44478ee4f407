"""The world DM recipe: trains, saves a loadable Stable Diffusion pipeline, resumes exactly, and scores.

Sizes are tiny (flags of the recipe), so the whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavender.world.dm import DMConfig, DMTrainer, LayerMaps, mass_ratio, thresholded_iou, train_dm
from lavender.world.scenes import SIZE, downsample_masks, sample_batch

TINY = dict(steps=2, vae_steps=1, batch_size=2, vae_batch_size=2, unet_channels=(16, 16), vae_channels=(8, 8, 8),
            text_width=16, heads=2, warmup=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("world_dm")
    trainer = train_dm(out, DMConfig(**TINY), progress=False)
    return out, trainer


def test_recipe_saves_a_loadable_pipeline_with_16_and_8_cross_attention(tiny_run):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from lavender.diffusion.capture import cross_attention_sides

    out, trainer = tiny_run
    assert trainer.done and trainer.step == 2 and trainer.vae_step == 1
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None,
                                                   requires_safety_checker=False, feature_extractor=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    sides = cross_attention_sides(pipe.unet, 16)
    assert sorted(set(sides.values())) == [8, 16]
    # the VAE's scaling factor was measured (unit-std latents), not left at SD's 0.18215
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)
    # every caption word is one token of the world tokenizer
    tok = pipe.tokenizer
    for w in ("a", "an", "and", "red", "orange", "purple", "circle", "triangle", "cross"):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    # weights equal the trainer's (save_pretrained round trip)
    for k, v in trainer.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[k], v)


def test_resume_equals_straight_run(tmp_path):
    torch.set_num_threads(1)
    cfg = DMConfig(**{**TINY, "steps": 4, "vae_steps": 2})
    straight = train_dm(tmp_path / "a", cfg, progress=False)
    first = DMTrainer(tmp_path / "b", cfg)
    first.run(max_steps=3, progress=False)  # 2 VAE steps + 1 UNet step, then "the session ends"
    assert not first.done and first.step == 1
    second = train_dm(tmp_path / "b", cfg, resume=True, progress=False)
    assert second.done
    a = [r["loss"] for r in straight.log]
    b = [r["loss"] for r in second.log]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-4)
    for k, v in straight.unet.state_dict().items():
        torch.testing.assert_close(second.unet.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileExistsError, match="--resume"):
        DMTrainer(tmp_path / "a", cfg)


def test_mass_ratio_and_iou_on_hand_made_maps():
    mask = np.zeros((32, 32), np.float32)
    mask[4:12, 8:16] = 1.0  # 64 of 1024 cells
    assert mass_ratio(mask.copy(), mask) == pytest.approx(1024 / 64)
    assert mass_ratio(np.full((32, 32), 0.3), mask) == pytest.approx(1.0)
    half = mask.copy()
    half[4:12, 12:16] = 0.0  # all mass inside the mask still → same ratio; IoU halves
    assert mass_ratio(half + 0.0, mask) == pytest.approx(16.0)
    assert thresholded_iou(mask, mask) == pytest.approx(1.0)
    assert thresholded_iou(half, mask) == pytest.approx(0.5)
    outside = 1.0 - mask
    assert mass_ratio(outside, mask) == 0.0 and thresholded_iou(outside, mask) == 0.0


def test_layer_maps_resolution_groups_equal_stage1_extractor(tiny_run):
    """The per-layer scorer's ``res16`` maps equal what Stage 1 (``Extractor``) writes for --resolutions 16."""
    from PIL import Image

    from lavender.diffusion.extract import ExtractConfig, Extractor
    from lavender.records import Record

    out, _ = tiny_run
    batch = sample_batch(np.random.default_rng(5), 2, split="test")
    lm = LayerMaps(out / "pipeline", steps=2, inversion_steps=1)
    maps = lm.maps_by_group(batch.images, batch.captions)
    assert {"res16", "res8", "all"} <= set(maps)
    ext = Extractor(ExtractConfig(dm=str(out / "pipeline"), data="-", out="-", steps=2, inversion_steps=1,
                                  resolutions=[16], normalize="none", batch_size=2))
    recs = [Record(id=str(i), index=i, images=[], caption=c) for i, c in enumerate(batch.captions)]
    got, _ = ext.extract_batch(recs, [Image.fromarray(im) for im in batch.images])
    for j, res in enumerate(got):
        for off, m in zip(res["offsets"], res["maps"]):
            np.testing.assert_allclose(maps["res16"][j][tuple(off)], m, rtol=1e-4, atol=1e-6)
    # a word's object mask at the map's grid: the score helpers see coverage in [0, 1]
    cov = downsample_masks(batch.word_masks[0].masks, 32)
    assert cov.shape[1:] == (32, 32) and SIZE % 32 == 0 and cov.max() <= 1.0


def test_cli_train_dm_then_score_dm(tmp_path, capsys):
    """The recipe commands, in-process: a one-step run, --resume refusal/acceptance, and score-dm's JSON."""
    import json

    from lavender.cli import main

    tiny = ["--steps", "1", "--vae-steps", "1", "--batch-size", "2", "--vae-batch-size", "2", "--unet-channels",
            "16", "16", "--vae-channels", "8", "8", "8", "--text-width", "16", "--threads", "1"]
    out = tmp_path / "run"
    assert main(["world", "train-dm", "--out", str(out), *tiny]) == 0
    assert "finished" in capsys.readouterr().out
    info = json.loads((out / "train_info.json").read_text())
    assert info["done"] and info["step"] == 1 and (out / "pipeline" / "model_index.json").exists()
    assert main(["world", "train-dm", "--out", str(out), *tiny]) == 1  # a finished run is never silently redone
    assert "--resume" in capsys.readouterr().err
    assert main(["world", "train-dm", "--out", str(out), *tiny[:1], "2", *tiny[2:], "--resume"]) == 0
    assert json.loads((out / "train_info.json").read_text())["step"] == 2
    scores = tmp_path / "scores.json"
    pair = "down_blocks.0.a0.attn2+up_blocks.1.a0.attn2"
    assert main(["world", "score-dm", "--dm", str(out / "pipeline"), "--n", "2", "--threads", "1",
                 "--out", str(scores), "--combine", pair]) == 0
    table = json.loads(scores.read_text())["table"]
    assert {"res16", "res8", "all", pair} <= set(table)
    assert table[pair]["layers"] == 2 and table[pair]["sides"] == [16]
    capsys.readouterr()
    assert main(["world", "score-dm", "--dm", str(out / "pipeline"), "--n", "2", "--combine", "mid_block+nope"]) == 1
    assert "not layers of this DM" in capsys.readouterr().err
    for row in table.values():
        for kind in ("colour", "shape"):
            assert row[kind]["n"] > 0 and row[kind]["ratio"] > 0 and 0 <= row[kind]["iou"] <= 1


def test_sigterm_saves_the_chunk_and_resume_continues(tmp_path):
    """A session ending (SIGTERM) mid-chunk still leaves a resumable state with the steps made."""
    import os
    import signal
    import threading

    torch.set_num_threads(1)
    cfg = DMConfig(**{**TINY, "steps": 100_000})
    trainer = DMTrainer(tmp_path, cfg)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(SystemExit, match="--resume"):
        trainer.run(progress=False)
    timer.join()
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    again = DMTrainer(tmp_path, cfg, resume=True)
    assert again.vae_step == 1 and again.step == trainer.step > 0
    assert len(again.log) == 1 + trainer.step
