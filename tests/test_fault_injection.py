"""Fault injection: real SIGKILLs of real `lavender extract` / `lavender train` processes, then resume.

Each test runs the command as a subprocess (the tiny DM / tiny Mllama), kills it with SIGKILL a
seeded random moment after it wrote something new (a shard, a checkpoint), reruns the same command
(resuming), and repeats; the last run finishes. Then it checks
what the issue asks: no record lost, none stored twice, maps equal to an uninterrupted run (within
one float16 step), `inspect` clean; for training, the final weights equal an uninterrupted run's and
every step's metrics line appears once. The figures (kills, how many landed mid-run) are printed, so
`pytest -s tests/test_fault_injection.py` reproduces the closing note's table.

"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _stage1_fixtures import TEST_RESOLUTIONS, tiny_dm_path, write_images_and_records

from lavender.attnstore import AttentionStore
from lavender.commands.inspect import inspect_store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run_killed(cmd: list[str], progressed, extra: float, timeout: float = 240.0) -> bool:
    """Start ``cmd``; once ``progressed()`` (it wrote something new), wait ``extra`` s more and SIGKILL it.
    True if it was killed while running; False if it ended first."""
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True)
    t0 = time.monotonic()
    while proc.poll() is None and not progressed() and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    time.sleep(extra)  # somewhere in the middle of the next write or step
    if proc.poll() is not None:
        err = proc.stderr.read()
        assert proc.returncode == 0, f"a resumed run failed: {err[-2000:]}"  # ended on its own: it must succeed
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _shards(folder: Path) -> int:
    return len(list((folder / "shards").glob("*.safetensors"))) if (folder / "shards").is_dir() else 0


@pytest.mark.slow
def test_extract_survives_sigkills(tmp_path) -> None:
    data = write_images_and_records(tmp_path / "d", 60)  # 30 shards: an idle machine writes one in ~0.1 s
    base = [sys.executable, "-m", "lavender", "extract", "--dm", tiny_dm_path(), "--data", str(data),
            "--steps", "2", "--inversion-steps", "1", "--map-size", "8", "--no-progress", "--batch-size", "2",
            "--shard-size", "2", *TEST_RESOLUTIONS]
    ref = tmp_path / "ref"
    subprocess.run([*base, "--out", str(ref)], check=True, env=ENV, capture_output=True)
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    kills = mid_run = 0
    for _ in range(6):
        before = _shards(out)
        if _run_killed([*base, "--out", str(out)], lambda b=before: _shards(out) > b, float(rng.uniform(0, 0.1))):
            kills += 1
            mid_run += _shards(out) > before
    final = subprocess.run([*base, "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    got, want = AttentionStore(out), AttentionStore(ref)
    report = inspect_store(str(out))
    lost = len(set(want.ids()) - set(got.ids()))
    twice = sum("stored twice" in p for p in report["problems"])
    print(f"\nextract: {kills} SIGKILLs ({mid_run} after shards were written), {lost} records lost, "
          f"{twice} stored twice, {report['problems']}")
    assert kills >= 4 and mid_run >= 4 and lost == 0 and twice == 0 and not report["problems"]
    for i in want.ids():
        np.testing.assert_allclose(got.get(i)["maps"].astype(np.float32), want.get(i)["maps"].astype(np.float32),
                                   atol=1e-3)
    assert not list(out.glob("*.tmp*")) and not list((out / "shards").glob(".*tmp*"))


@pytest.mark.slow
def test_train_survives_sigkills(tiny_vlm, tmp_path) -> None:
    from PIL import Image
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": f"a red circle {i}"}]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 40
    base = [sys.executable, "-m", "lavender", "train", "--model", tiny_vlm("mllama"), "--data",
            str(tmp_path / "d.jsonl"), "--max_steps", str(steps), "--save_steps", "4", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "0", "--use_cpu",
            "--report_to", "none", "--disable_tqdm", "true"]
    subprocess.run([*base, "--output_dir", str(tmp_path / "ref")], check=True, env=ENV, capture_output=True)
    out = tmp_path / "killed"
    delays = np.random.default_rng(1)
    kills = mid_run = 0
    def n_ckpts() -> int:  # the newest checkpoint's step (old ones are rotated away)
        return max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)

    for k in range(4):
        ckpts = n_ckpts()
        resume = ["--resume"] if k else []
        if _run_killed([*base, "--output_dir", str(out), *resume], lambda c=ckpts: n_ckpts() > c,
                       float(delays.uniform(0, 0.15))):
            kills += 1
            mid_run += n_ckpts() > ckpts
    final = subprocess.run([*base, "--output_dir", str(out), "--resume"], env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    lines = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    step_list = [ln["step"] for ln in lines if "loss" in ln]
    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"\ntrain: {kills} SIGKILLs ({mid_run} after a checkpoint was written), steps logged {step_list}, "
          f"max |adapter − uninterrupted| {worst:.2e}")
    assert kills >= 3 and mid_run >= 3
    assert step_list == list(range(1, steps + 1))  # every step once, none repeated after a resume
    assert sorted(a) == sorted(b) and worst < 1e-5
