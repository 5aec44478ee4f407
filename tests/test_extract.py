"""`lavender extract` / `inspect` / `tiny-dm` end to end on the tiny DM, in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records
from PIL import Image

from lavender.attnstore import AttentionStore
from lavender.cli import main

FAST = ["--steps", "2", "--inversion-steps", "1", "--map-size", "16", "--no-progress", *TEST_RESOLUTIONS]


def _extract(data, out, *extra):
    return main(["extract", "--dm", tiny_dm_path(), "--data", str(data), "--out", str(out), *FAST, *extra])


def _all_maps(root) -> dict:
    store = AttentionStore(root)
    return {id: (ex["words"], ex["offsets"], ex["maps"].astype(np.float32)) for id, ex in store}


def _assert_same(a: dict, b: dict, atol: float = 1e-3) -> None:
    """Same ids, words, offsets; maps equal up to float16 storage (one ulp below 1 is 4.9e-4: different
    batch compositions move fp32 values by ~1e-6, which can flip a rounding)."""
    assert sorted(a) == sorted(b)
    for id in a:
        assert a[id][0] == b[id][0] and a[id][1] == b[id][1]
        np.testing.assert_allclose(a[id][2], b[id][2], atol=atol)


def test_tiny_dm_command(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["tiny-dm", str(tmp_path / "dm"), "--image-size", "32"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "dm")
    assert pipe.unet.config.sample_size == 16 and "tiny Stable Diffusion" in capsys.readouterr().out


def test_sd14_architecture_has_stable_diffusion_1_4_sizes(tmp_path):
    """The GPU benchmarks' random SD-1.4 must really be SD-1.4-sized: its UNet (built on the meta device,
    no weights) has SD-1.4's 859,520,964 parameters and its cross-attention maps SD's sides."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lavender.diffusion.capture import cross_attention_sides
    from lavender.diffusion.tiny import ARCHITECTURES, make_tiny_dm

    arch = ARCHITECTURES["sd14"]
    with init_empty_weights():
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **arch["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sorted(set(cross_attention_sides(unet, 64).values()) - {0}) == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="choose one of tiny, sd14"):
        make_tiny_dm(tmp_path / "x", architecture="sd15")


def test_bad_record_corpus_never_stops_the_run(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    Image.new("L", (40, 30), 90).save(d / "grey.png")
    rgba = Image.new("RGBA", (36, 36), (255, 0, 0, 0))
    rgba.putpixel((3, 3), (0, 255, 0, 255))
    rgba.save(d / "rgba.png")
    Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)).save(d / "deep.png")
    Image.new("RGB", (1200, 20), (9, 9, 9)).save(d / "huge.png")
    Image.new("RGB", (5, 40)).save(d / "tiny.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [
        {"id": "grey", "image": "grey.png", "caption": "a grey field"},
        {"id": "rgba", "image": "rgba.png", "caption": "a green dot"},
        {"id": "deep", "image": "deep.png", "caption": "a gradient"},
        {"id": "huge", "image": "huge.png", "caption": "a very wide strip"},
        {"id": "tiny", "image": "tiny.png", "caption": "too small"},
        {"id": "corrupt", "image": "corrupt.jpg", "caption": "broken"},
        {"id": "missing", "image": "nowhere.png", "caption": "gone"},
        {"id": "empty", "image": "grey.png", "caption": ""},
        {"id": "punct", "image": "grey.png", "caption": "?!"},
    ]
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n")
    out = tmp_path / "attn"
    assert _extract(d / "records.jsonl", out, "--batch-size", "3") == 0
    text = capsys.readouterr().out
    assert "4 done, 0 skipped" in text and "6 failed" in text
    store = AttentionStore(out)
    assert sorted(store.ids()) == ["deep", "grey", "huge", "rgba"]
    reasons = {e["id"]: e["reason"] for e in store.errors()}
    assert "5×40 px" in reasons["tiny"] and "unreadable or corrupt" in reasons["corrupt"]
    assert "not found next to records.jsonl" in reasons["missing"] and "empty text" in reasons["empty"]
    assert "no words" in reasons["punct"] and "not valid JSON" in reasons[None]
    assert store.get("huge")["extra"]["image_size"] == [1200, 20]

    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["examples"], report["words"], report["errors"], report["map_shape"]) == (4, 12, 6, [16, 16])
    assert report["manifest"]["recipe"] == {"name": "ddim", "steps": 2, "inversion_steps": 1, "guidance": 1.0}
    assert report["manifest"]["frame"] == {"mode": "squash"} and report["manifest"]["normalization"] == "minmax"
    assert report["manifest"]["counts"]["examples"] == 4

    # --strict: the first bad record stops the run with exit 1 and names it (schema and path problems are
    # found by the first pass over the file, before any image is decoded)
    assert _extract(d / "records.jsonl", tmp_path / "strict", "--strict") == 1
    assert "record 6 (id 'missing'): image 'nowhere.png' not found" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()  # stopped before loading the model or writing anything


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    data = write_images_and_records(tmp_path / "data", 4)
    assert _extract(data, tmp_path / "full", "--batch-size", "2") == 0
    full = _all_maps(tmp_path / "full")

    # kill the run while it writes its second shard: os.replace never happens, a .tmp file is left
    import lavender.attnstore as attnstore

    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".safetensors") and len([c for c in calls if str(c).endswith(".safetensors")]) >= 2:
            raise KeyboardInterrupt("SIGKILL stand-in")
        return real_replace(src, dst)

    monkeypatch.setattr(attnstore.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _extract(data, tmp_path / "part", "--batch-size", "2", "--shard-size", "1")
    monkeypatch.setattr(attnstore.os, "replace", real_replace)
    assert len(AttentionStore(tmp_path / "part")) == 1  # one complete shard survived, nothing torn
    assert list((tmp_path / "part" / "shards").glob(".*.tmp-*"))

    assert _extract(data, tmp_path / "part", "--batch-size", "2", "--shard-size", "1") == 0
    _assert_same(_all_maps(tmp_path / "part"), full)
    assert not list((tmp_path / "part" / "shards").glob(".*.tmp-*"))
    # a third run skips everything and duplicates nothing
    assert _extract(data, tmp_path / "part", "--batch-size", "2", "--shard-size", "1", "--json") == 0
    assert len(AttentionStore(tmp_path / "part")) == 4
    # other arguments would mix incompatible maps: refused
    assert _extract(data, tmp_path / "part", "--frame", "pad") == 2


def test_frames_are_recorded_and_change_maps(tmp_path):
    data = write_images_and_records(tmp_path / "data", 1)
    assert _extract(data, tmp_path / "pad", "--frame", "pad") == 0
    store = AttentionStore(tmp_path / "pad")
    assert store.manifest["frame"] == {"mode": "pad", "fill": [0, 0, 0], "anchor": "center"}
    # the other frames through the same extractor (one model load): the maps depend on the frame
    from lavender.diffusion.extract import ExtractConfig, Extractor
    from lavender.records import load_image, read_records

    cfg = ExtractConfig(dm=tiny_dm_path(), data=str(data), out="-", steps=2, inversion_steps=1, map_size=16,
                        resolutions=[8, 16], frame="pad")
    ext = Extractor(cfg)
    rec = read_records(data)[0]
    img = load_image(rec.images[0])
    maps = {}
    for frame in ("pad", "squash", "center-crop"):
        ext.cfg.frame = frame
        maps[frame] = ext.extract_batch([rec], [img])[0][0]["maps"]
        if frame != "pad":
            assert ext.manifest()["frame"] == {"mode": frame}
    np.testing.assert_allclose(maps["pad"], store.get("img_000")["maps"], atol=1e-3)
    assert not np.allclose(maps["squash"], maps["pad"], atol=1e-3)
    assert not np.allclose(maps["squash"], maps["center-crop"], atol=1e-3)


def test_frame_geometry():
    from lavender.frames import frame_image

    img = Image.new("RGB", (40, 20), (255, 255, 255))
    pad = np.asarray(frame_image(img, 32, "pad"))
    assert pad.shape == (32, 32, 3) and pad[0, 0].sum() == 0 and pad[16, 16].sum() == 765 and pad[-1, 16].sum() == 0
    crop = np.asarray(frame_image(img, 32, "center-crop"))
    assert crop.shape == (32, 32, 3) and crop.min() == 255


def test_nulltext_recipe_runs(tmp_path, capsys):
    data = write_images_and_records(tmp_path / "data", 2)
    assert _extract(data, tmp_path / "nt", "--recipe", "nulltext", "--inner-steps", "1", "--batch-size", "2",
                    "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # per image: 2 inversion + 2 steps × (1 cond + 1 inner uncond + 1 final uncond) = 8 forward evaluations
    assert summary["unet_evals_per_image"] == 8 and summary["done"] == 2
    assert AttentionStore(tmp_path / "nt").manifest["recipe"] == {"name": "nulltext", "steps": 2,
                                                                 "inner_steps": 1, "guidance": 7.5}


def test_noise_recipe_is_one_pass_and_independent_of_the_batch(tmp_path, capsys):
    """``--recipe noise``: one UNet call per image per timestep; a record's noise is seeded by its id, so
    its maps do not depend on the batch it lands in; other timesteps give other maps."""
    data = write_images_and_records(tmp_path / "data", 3)
    assert _extract(data, tmp_path / "b1", "--recipe", "noise", "--timesteps", "300", "--batch-size", "1",
                    "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["unet_evals_per_image"] == 1 and summary["done"] == 3
    assert AttentionStore(tmp_path / "b1").manifest["recipe"]["timesteps"] == [300]
    assert _extract(data, tmp_path / "b3", "--recipe", "noise", "--timesteps", "300", "--batch-size", "3") == 0
    _assert_same(_all_maps(tmp_path / "b1"), _all_maps(tmp_path / "b3"))
    assert _extract(data, tmp_path / "two", "--recipe", "noise", "--timesteps", "100", "700", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["unet_evals_per_image"] == 2
    a, b = _all_maps(tmp_path / "b1"), _all_maps(tmp_path / "two")
    assert any(not np.allclose(a[i][2], b[i][2], atol=1e-2) for i in a)


@pytest.mark.parametrize("flags,needle", [(["--timesteps", "1000"], "0..999"),
                                          (["--timesteps", "-1"], ">= 0"),
                                          (["--guidance", "7.5"], "does not apply")])
def test_noise_recipe_bad_options_are_one_line(tmp_path, capsys, flags, needle):
    data = write_images_and_records(tmp_path / "data", 1)
    assert _extract(data, tmp_path / "x", "--recipe", "noise", *flags) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data = write_images_and_records(tmp_path / "data", 5)
    assert _extract(data, tmp_path / "one", "--batch-size", "2") == 0
    # accelerate 1.15: `launch --cpu --num_processes 2` starts ONE process (its CPU multi-process path is
    # mpirun); `--multi_gpu` spawns through torch.distributed.run, and extract picks gloo on a CPU machine
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "lavender", "extract", "--dm", tiny_dm_path(),
           "--data", str(data), "--out", str(tmp_path / "two"), "--batch-size", "2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in Path(tmp_path / "two" / "shards").iterdir())
    assert names == ["r000-00000.safetensors", "r001-00000.safetensors"]
    assert "5 done" in res.stdout
    _assert_same(_all_maps(tmp_path / "two"), _all_maps(tmp_path / "one"))


def test_layers_option_reads_only_the_named_modules(tmp_path):
    data = write_images_and_records(tmp_path / "data", 1)
    assert _extract(data, tmp_path / "one", "--layers", "down_blocks.0", "--resolutions", "16") == 0
    captured = AttentionStore(tmp_path / "one").manifest["captured_modules"]
    assert captured and all(k.startswith("down_blocks.0") for k in captured)
    assert _extract(data, tmp_path / "all") == 0
    full = AttentionStore(tmp_path / "all")
    assert len(full.manifest["captured_modules"]) > len(captured)
    assert not np.allclose(full.get("img_000")["maps"], AttentionStore(tmp_path / "one").get("img_000")["maps"])
    assert _extract(data, tmp_path / "bad", "--layers", "no_such_block") != 0


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_denoising_grid_follows_the_scheduler_config(spacing, offset):
    """The grid is the checkpoint scheduler's own (diffusers' set_timesteps), not SD's hard-coded one."""
    from diffusers import DDIMScheduler

    from lavender.diffusion.inversion import NoiseSchedule

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=offset, timestep_spacing=spacing)
    ns = NoiseSchedule.from_scheduler(sched)
    for steps in (10, 25, 7):
        sched.set_timesteps(steps)
        assert ns.denoising_grid(steps)[:-1] == sched.timesteps.tolist(), (spacing, steps)
    assert ns.alpha(-1) == pytest.approx(float(sched.final_alpha_cumprod))


@pytest.mark.parametrize("name,extra", [("EulerDiscreteScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
                                        ("DPMSolverMultistepScheduler", {}),
                                        ("DDIMScheduler", {"prediction_type": "v_prediction"})])
def test_other_schedulers_extract(tmp_path, name, extra):
    """Checkpoints saved with Euler (SDXL's default, many SD-1.x fine-tunes), PNDM, DPM-Solver or a
    v-prediction config extract; the clean end is alphas_cumprod[0] where the scheduler has no final alpha."""
    import shutil

    import diffusers

    dm = tmp_path / "dm"
    shutil.copytree(tiny_dm_path(), dm)
    base = diffusers.DDIMScheduler.from_pretrained(dm / "scheduler")
    _swap_scheduler(dm, getattr(diffusers, name).from_config(base.config, **extra))
    data = write_images_and_records(tmp_path / "data", 2)
    assert main(["extract", "--dm", str(dm), "--data", str(data), "--out", str(tmp_path / "out"), *FAST]) == 0
    assert len(_all_maps(tmp_path / "out")) == 2
    from lavender.diffusion.extract import DiffusionModel

    assert type(diffusers.DiffusionPipeline.from_pretrained(dm).scheduler).__name__ == name
    assert DiffusionModel(str(dm)).prediction_type == extra.get("prediction_type", "epsilon")


def _swap_scheduler(dm: Path, scheduler) -> None:
    """Save ``scheduler`` as the pipeline's, and name its class in model_index.json (what loading reads)."""
    scheduler.save_pretrained(dm / "scheduler")
    index = json.loads((dm / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (dm / "model_index.json").write_text(json.dumps(index))


def test_a_flow_matching_scheduler_is_refused_with_one_line(tmp_path, capsys):
    import shutil

    import diffusers

    dm = tmp_path / "dm"
    shutil.copytree(tiny_dm_path(), dm)
    _swap_scheduler(dm, diffusers.FlowMatchEulerDiscreteScheduler())
    data = write_images_and_records(tmp_path / "data", 1)
    assert main(["extract", "--dm", str(dm), "--data", str(data), "--out", str(tmp_path / "out"), *FAST]) != 0
    err = capsys.readouterr().err
    assert "no alphas_cumprod" in err and "Traceback" not in err


def test_a_resolution_no_selected_module_reads_is_an_error(tmp_path, capsys):
    """--resolutions 8 16 with --layers naming only a 16-side module would average only that one while
    listing both sides: refused in one line; a consistent choice records its modules per resolution."""
    data = write_images_and_records(tmp_path / "data", 1)
    assert _extract(data, tmp_path / "bad", "--layers", "down_blocks.0") != 0
    err = capsys.readouterr().err
    assert "select no cross-attention module at side" in err and "Traceback" not in err
    assert _extract(data, tmp_path / "ok", "--layers", "down_blocks.0", "down_blocks.1") == 0
    by_res = AttentionStore(tmp_path / "ok").manifest["modules_by_resolution"]
    assert set(by_res) == {"8", "16"} and all(by_res.values())


def test_dry_run_counts_what_is_left_and_writes_nothing(tmp_path, capsys):
    data = write_images_and_records(tmp_path / "data", 3)
    assert _extract(data, tmp_path / "none", "--dry-run", "--json") == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["to_do"] == 3 and s["unet_evals_per_image"] == 3 and s["estimated_seconds"] > 0  # 1 + 2 steps
    assert not (tmp_path / "none").exists()
    assert _extract(data, tmp_path / "out", "--limit", "2") == 0
    capsys.readouterr()
    assert _extract(data, tmp_path / "out", "--dry-run", "--recipe", "noise", "--timesteps", "100", "300") == 0
    line = capsys.readouterr().out
    assert "1 of 3 records to do (2 already stored" in line and "2 UNet evaluations/image" in line
