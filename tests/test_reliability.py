"""Training refuses poison and survives torn files: NaN or misshapen maps, repeated ids, an attention
dataset that matches nothing, decompression bombs, a non-finite loss, checkpoints cut off mid-save,
torn metrics lines, and ``--resume`` of a finished run. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.attnstore import AttentionWriter
from lavender.config import AlignmentConfig, LavenderError, TrainConfig
from lavender.records import RecordError, load_image
from lavender.trainer import build_trainer, last_checkpoint, run_training
from lavender.words import split_words

ANSWERS = ["a red circle", "a blue square", "a green triangle", "two yellow crosses"]


def _data(root, *, nan_id: str | None = None, dup: bool = False, shape_id: str | None = None,
          ids_offset: int = 0) -> tuple[str, str]:
    """Records r0..r3 with images and random answer-word maps; optional poison."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = AttentionWriter(root / "attn", {"map_size": 32, "frame": "squash"})
    other = AttentionWriter(root / "attn", {"map_size": 32, "frame": "squash"}, rank=1)  # e.g. another rank
    rows = []
    for i, ans in enumerate(ANSWERS):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rid = f"r{i}"
        rows.append({"id": f"r{i + ids_offset}", "images": [f"{i}.png"],
                     "messages": [{"role": "user", "content": "<image>What is there?"},
                                  {"role": "assistant", "content": ans}]})
        ws = split_words(ans)
        size = 16 if rid == shape_id else 32
        maps = rng.random((len(ws), size, size)).astype("float32")
        if rid == nan_id:
            maps[0, 3, 4] = np.nan
        (other if rid == shape_id else writer).add(rid, [w.text for w in ws], [(w.start, w.end) for w in ws], maps)
    writer.close()
    other.close()
    if dup:  # a different image under an id that already has maps
        rows.append({**rows[0], "images": ["1.png"]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "train.jsonl"), str(root / "attn")


def _cfg(tiny_vlm, data: str, attn: str | None, out, **kw) -> tuple[TrainConfig, AlignmentConfig]:
    base = dict(model=tiny_vlm("mllama"), data=data, attention=attn, output_dir=str(out), max_steps=2,
                per_device_train_batch_size=2, save_steps=1000, seed=0, lambda_att=10.0, disable_tqdm=True,
                use_cpu=True, report_to=[])
    base.update(kw)
    return TrainConfig(**base), AlignmentConfig(align_on="answer")


def test_nan_map_is_skipped_and_counted_or_stops_strict(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d", nan_id="r2")
    trainer = build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run"))
    assert [r.id for r in trainer.train_dataset.records] == ["r0", "r1", "r3"]
    assert [e.record_id for e in trainer.train_dataset.errors] == ["r2"]
    assert "non-finite" in str(trainer.train_dataset.errors[0])
    with pytest.raises(RecordError, match="r2.*non-finite|non-finite.*r2"):
        build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run2", strict=True))


def test_training_with_a_nan_map_in_the_data_keeps_every_weight_finite(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d", nan_id="r0")
    trainer = run_training(*_cfg(tiny_vlm, data, attn, tmp_path / "run"), quiet=True)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_misshapen_maps_are_refused(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d", shape_id="r1")
    trainer = build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run"))
    assert [e.record_id for e in trainer.train_dataset.errors] == ["r1"]
    assert "(words, 32, 32)" in str(trainer.train_dataset.errors[0])


def test_repeated_id_never_trains_on_another_records_maps(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d", dup=True)
    trainer = build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run"))
    assert [r.id for r in trainer.train_dataset.records] == ["r0", "r1", "r2", "r3"]
    assert [(e.record_id, e.index) for e in trainer.train_dataset.errors] == [("r0", 4)]
    # without an attention dataset a repeated id is harmless: kept
    plain = build_trainer(*_cfg(tiny_vlm, data, None, tmp_path / "run2", lambda_att=0.0))
    assert len(plain.train_dataset) == 5


def test_attention_dataset_matching_no_record_is_an_error(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d", ids_offset=10)  # records r10..r13, maps for r0..r3
    with pytest.raises(LavenderError, match="none of the 4 records"):
        build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run"))


def test_non_finite_loss_stops_before_the_update_naming_step_and_records(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d")
    trainer = build_trainer(*_cfg(tiny_vlm, data, attn, tmp_path / "run"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["lavender"].targets[:] = float("nan")  # poison that got past every check
    with pytest.raises(LavenderError, match=r"step 1 \(records r0, r1\)"):
        trainer.compute_loss(trainer.model, batch)


def test_decompression_bomb_is_a_clear_value_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64×64 > 2× the limit: Pillow's bomb error
    with pytest.raises(ValueError, match="decompression-bomb"):
        load_image(path)


def test_resume_skips_a_checkpoint_cut_off_mid_save_and_a_torn_metrics_line(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d")
    out = tmp_path / "run"
    run_training(*_cfg(tiny_vlm, data, attn, out, max_steps=2, save_steps=1), quiet=True)
    # a kill during the save of step 3: weights written, trainer_state.json never
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    os.remove(out / "checkpoint-3" / "trainer_state.json")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # torn
    assert last_checkpoint(str(out)).endswith("checkpoint-2")
    run_training(*_cfg(tiny_vlm, data, attn, out, max_steps=4, save_steps=1, resume=True), quiet=True)
    steps = [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_resume_of_a_finished_run_trains_no_further_step(tiny_vlm, tmp_path) -> None:
    data, attn = _data(tmp_path / "d")
    out = tmp_path / "run"
    run_training(*_cfg(tiny_vlm, data, attn, out, max_steps=2, save_steps=1), quiet=True)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    for _ in range(2):
        run_training(*_cfg(tiny_vlm, data, attn, out, max_steps=2, save_steps=1, resume=True), quiet=True)
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == [1, 2]
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert not (out / "checkpoint-3").exists()


def test_one_non_utf8_byte_costs_one_record_not_the_file(tmp_path) -> None:
    from lavender.records import iter_records

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    good = json.dumps({"id": "ok", "images": ["a.png"], "messages": [
        {"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]}).encode()
    (tmp_path / "r.jsonl").write_bytes(good + b"\n" + good.replace(b'"ok"', b'"b\xff"') + b"\n"
                                       + good.replace(b'"ok"', b'"ok2"') + b"\n")
    out = list(iter_records(tmp_path / "r.jsonl"))
    assert [getattr(r, "id", None) for r in out] == ["ok", None, "ok2"]
    assert isinstance(out[1], RecordError) and "line 2" in str(out[1]) and "UTF-8" in str(out[1])


def test_exif_orientation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "p.jpg", exif=exif.tobytes(), quality=95)
    got = load_image(tmp_path / "p.jpg")
    assert got.size == (20, 40)
    top = np.asarray(got)[:8].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[0] < 60  # the blue strip is now on top


def test_inspect_reports_an_id_stored_twice(tmp_path) -> None:
    from lavender.commands.inspect import inspect_store

    for rank in (0, 1):  # two runs (or ranks) that both stored example "x"
        with AttentionWriter(tmp_path / "attn", {"map_size": 8, "frame": "squash"}, rank=rank) as w:
            w.add("x", ["a"], [(0, 1)], np.full((1, 8, 8), 0.5, dtype=np.float32))
    report = inspect_store(str(tmp_path / "attn"))
    assert any("stored twice" in p for p in report["problems"]), report["problems"]


def test_a_second_job_on_one_folder_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from lavender.locks import hold_folder

    folder = tmp_path / "out"
    with hold_folder(folder, 0):
        with pytest.raises(LavenderError, match="in use by another"):
            with hold_folder(folder, 0):
                pass
        with hold_folder(folder, 1):  # another rank of the same launch
            pass
    code = ("import sys, time; from lavender.locks import hold_folder\n"
            f"with hold_folder({str(folder)!r}, 0):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LavenderError, match=f"pid {holder.pid}"):
        with hold_folder(folder, 0):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    time.sleep(0.1)
    with hold_folder(folder, 0):  # the kernel released the dead holder's lock
        pass


def test_extract_refuses_a_folder_another_extraction_holds(tmp_path, capsys) -> None:
    from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records

    from lavender.cli import main as cli
    from lavender.locks import hold_folder

    data = write_images_and_records(tmp_path / "d", 2)
    args = ["extract", "--dm", tiny_dm_path(), "--data", str(data), "--out", str(tmp_path / "attn"),
            "--steps", "2", "--inversion-steps", "1", "--map-size", "16", "--no-progress", *TEST_RESOLUTIONS]
    with hold_folder(tmp_path / "attn", 0):
        assert cli(args) == 1
    assert "in use by another extraction" in capsys.readouterr().err
    assert cli(args) == 0  # released: the same command now runs


# ------------------------------------------------------------------ content-addressed resume (Stage 1)
def test_resume_recomputes_changed_records_and_keys_id_less_rows_by_content(tmp_path, capsys):
    """An edited record (same id) and a rewritten image are recomputed, never reused; a row
    prepended to a file WITHOUT ids shifts nothing; the same DM under another path resumes."""
    import shutil

    from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records

    from lavender.attnstore import AttentionStore
    from lavender.cli import main
    from lavender.commands.inspect import inspect_store

    fast = ["--steps", "2", "--inversion-steps", "1", "--map-size", "8", "--no-progress", *TEST_RESOLUTIONS]
    data = write_images_and_records(tmp_path / "d", 3)
    out = tmp_path / "attn"

    def extract(dm: str = tiny_dm_path()) -> str:
        assert main(["extract", "--dm", dm, "--data", str(data), "--out", str(out), *fast]) == 0
        return capsys.readouterr().out

    extract()
    before = {i: e["words"] for i, e in ((i, AttentionStore(out).entry(i)) for i in AttentionStore(out).ids())}
    rows = [json.loads(ln) for ln in open(data)]
    rows[1]["caption"] = "a green cross"  # edited under the same id
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "d" / rows[2]["image"])  # image rewritten
    log = extract()
    assert "1 done" not in log and "2 done (2 of them recomputed" in log and "1 skipped" in log
    store = AttentionStore(out)
    assert store.entry(rows[1]["id"])["words"] == ["a", "green", "cross"] != before[rows[1]["id"]]
    assert inspect_store(str(out))["superseded"] == 2 and inspect_store(str(out))["problems"] == []
    # the same DM copied elsewhere: same weights, so the folder resumes (nothing to do)
    copy = shutil.copytree(tiny_dm_path(), tmp_path / "dm_copy")
    assert "0 done, 3 skipped" in extract(str(copy))

    # rows without ids: keyed by content, so prepending a row recomputes only the new one
    for r in rows:
        del r["id"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "attn2"
    extract()
    data.write_text(json.dumps({**rows[0], "caption": "a new first row"}) + "\n" + data.read_text())
    assert "1 done, 3 skipped" in extract()


def test_a_different_dm_at_the_same_path_is_refused(tmp_path, capsys):
    import shutil

    from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records

    from lavender.cli import main
    from lavender.diffusion.tiny import make_tiny_dm

    fast = ["--steps", "2", "--inversion-steps", "1", "--map-size", "8", "--no-progress", *TEST_RESOLUTIONS]
    data = write_images_and_records(tmp_path / "d", 2)
    dm = shutil.copytree(tiny_dm_path(), tmp_path / "dm")
    args = ["extract", "--dm", str(dm), "--data", str(data), "--out", str(tmp_path / "attn"), *fast]
    assert main(args) == 0
    shutil.rmtree(dm)
    make_tiny_dm(dm, seed=1, image_size=32)  # other weights, same path
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "different settings (dm)" in err and "Traceback" not in err


def test_a_worker_dies_with_its_killed_launcher(tmp_path) -> None:
    """PR_SET_PDEATHSIG: a child that called die_with_parent() is gone once its parent is SIGKILLed
    (an `accelerate launch` killed with SIGKILL no longer leaves workers writing)."""
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    launcher = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import os, time; from lavender.locks import die_with_parent; assert die_with_parent(); "
        f"open(r\"{pidfile}\", \"w\").write(str(os.getpid())); time.sleep(60)'])\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the worker outlived its SIGKILLed launcher")


def test_a_full_disk_mid_extraction_is_one_line_and_the_resume_completes(tmp_path, capsys, monkeypatch) -> None:
    """ENOSPC while writing the second shard (injected: CI runs as root, where permissions stop
    nothing): exit with one line naming the error; once there is room, the same command finishes with
    every record exactly once; a read-only folder (EROFS at the first write) is one line too."""
    import errno

    from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records

    import lavender.attnstore as store_mod
    from lavender.attnstore import AttentionStore
    from lavender.cli import main
    from lavender.commands.inspect import inspect_store

    data = write_images_and_records(tmp_path / "d", 6)
    args = ["extract", "--dm", tiny_dm_path(), "--data", str(data), "--out", str(tmp_path / "a"), "--steps", "1",
            "--inversion-steps", "1", "--map-size", "8", "--no-progress", "--batch-size", "2", "--shard-size", "2",
            *TEST_RESOLUTIONS]
    real, calls = store_mod._atomic_write, []

    def full_disk(path, data):
        calls.append(path)
        if path.name.endswith(".safetensors") and len([p for p in calls if p.name.endswith(".safetensors")]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "_atomic_write", full_disk)
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(store_mod, "_atomic_write", real)
    assert main(args) == 0
    assert len(AttentionStore(tmp_path / "a")) == 6 and inspect_store(str(tmp_path / "a"))["problems"] == []

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(store_mod, "_atomic_write", read_only)
    capsys.readouterr()
    assert main([*args[:6], str(tmp_path / "ro"), *args[7:]]) != 0
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_resume_continues(tiny_vlm, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """ENOSPC while saving the second checkpoint: one line, non-zero exit; the resume continues from the
    newest COMPLETE checkpoint and logs every step once."""
    import errno

    import transformers

    from lavender.cli import main

    data, attn = _data(tmp_path / "d")
    args = ["train", "--model", tiny_vlm("mllama"), "--data", data, "--attention", attn, "--output_dir",
            str(tmp_path / "run"), "--max_steps", "4", "--save_steps", "1", "--per_device_train_batch_size", "2",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0"]
    real, saves = transformers.Trainer._save_checkpoint, []

    def full_disk(self, *a, **k):
        saves.append(self.state.global_step)
        if len(saves) == 2:
            os.makedirs(os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}"), exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")  # a half-made checkpoint folder stays
        return real(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", full_disk)
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real)
    assert main([*args, "--resume"]) == 0
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in ln]
    assert steps == [1, 2, 3, 4]


def test_resumes_list_a_bad_record_once(tmp_path) -> None:
    """The errors file does not grow on every resume: the same bad record is listed once."""
    from lavender.attnstore import AttentionStore

    for _ in range(3):
        with AttentionWriter(tmp_path / "a", {"map_size": 8}) as w:
            w.add_error(4, "bad", "image 'x.png' not found")
    assert len(AttentionStore(tmp_path / "a").errors()) == 1


def test_a_dead_writers_manifest_temp_file_is_cleaned(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    stale = tmp_path / "a" / ".manifest.json.tmp-999999999"  # no such pid
    stale.write_text("{")
    with AttentionWriter(tmp_path / "a", {"map_size": 8}):
        pass
    assert not stale.exists()
