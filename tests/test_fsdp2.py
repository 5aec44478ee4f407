"""FSDP2 (``examples/accelerate/fsdp2.yaml``) exercised: 2 processes over gloo on CPU, against the DDP run.

accelerate 1.16 never turns FSDP on for CPU processes: ``AcceleratorState.__init__``
(accelerate/state.py, the ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch,
line 947) sets ``DistributedType.FSDP`` and keeps the plugin only for accelerator device types; a
CPU worker stays ``MULTI_CPU`` and the Trainer silently trains with DDP. torch's FSDP2 itself
(``fully_shard`` on a ``cpu`` device mesh over gloo) works on CPU, so this file's worker entry
(``python tests/test_fsdp2.py train ...`` under ``accelerate launch``) sets the state to what
accelerate sets on GPUs (``FSDP`` + the plugin from the config) and nothing else:
accelerate's ``fsdp2_prepare_model``, the Trainer's FSDP checkpointing and Lavender's hooks run
unchanged. The worker also writes a probe (was the model an ``FSDPModule``, was the head sharded)
so the test cannot pass on a silent DDP fallback.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP2_CONFIG = os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml")
PROBE = "LAVENDER_TEST_FSDP_PROBE"  # folder the worker writes its probe files to
# Tolerance. Both runs are fp32; FSDP2 and DDP differ only in the order of fp32 reductions (the
# gradient norm summed over shards, FSDP2's gradient reduction instead of DDP's bucketed all-reduce),
# and training amplifies those last-bit differences a little each step. Measured after 4 steps at lr 1e-3: with the calibrated λ used
# here (~1.5) the two runs came out bit-identical; with λ = 10 the trainable tensors differed by at most
# 7e-5 of the distance they moved from initialisation (1.8e-7 against 2.5e-3). A wrong synchronisation
# (the head not reduced, one rank's gradient, a shard or the Adam state not restored on resume) is of
# the order of that distance itself. So each tensor must satisfy
#     max|w_fsdp - w_ddp| <= REL * max|w_ddp - w_init| + ABS,   REL = 1e-3, ABS = 1e-7,
# 14x above the largest drift measured, 100x or more below a synchronisation error.
# Exception: the Aligner's convolution biases that a normalisation follows (InstanceNorm after each
# hidden convolution, the output min-max after the last) cancel out, so their gradient is 0 in exact
# arithmetic and Adam moves them by +-lr on pure rounding noise, differently in two runs whose last bits
# differ (seen at λ = 10: 1.7e-3 apart). They are left out of the weight comparison; the head is compared
# as a function instead: both heads' maps on the same input agree within HEAD_ATOL (maps are in [0, 1];
# measured at λ = 10: 4.5e-7; the head after step 2 is 0.2 away from the final one).
LR = 1e-3
REL, ABS, HEAD_ATOL = 1e-3, 1e-7, 1e-5


# --- the worker (run by `accelerate launch tests/test_fsdp2.py train ...`) ---------------------------
def _force_fsdp_on_cpu() -> None:
    """Give a CPU worker the FSDP state accelerate gives a GPU worker (see the module docstring)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        wants = fsdp_plugin is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if wants and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = patched


def _install_probe(folder: str) -> None:
    """Record the head before training (rank 0) and, after, how the trained model was wrapped."""
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lavender.trainer import LavenderTrainer

    train = LavenderTrainer.train

    def probed(self, *args, **kwargs):
        rank = self.args.process_index
        if rank == 0 and self.head is not None and not os.path.exists(os.path.join(folder, "init.safetensors")):
            from peft import get_peft_model_state_dict

            init = {**{f"adapter/{k}": v for k, v in get_peft_model_state_dict(self.model).items()},
                    **{f"head/{k}": v for k, v in self.head.state_dict().items()}}
            save_file({k: v.detach().clone().contiguous() for k, v in init.items()},
                      os.path.join(folder, "init.safetensors"))
        out = train(self, *args, **kwargs)
        wrapped = self.model_wrapped
        head = {n: p for n, p in wrapped.named_parameters() if "lavender_head." in n}
        info = {"lambda_att": self.args.lambda_att,  # after --calibrate_lambda: must be the same on every rank
                "wrapper": type(wrapped).__name__, "fsdp_root": isinstance(wrapped, FSDPModule),
                "fsdp_units": sum(isinstance(m, FSDPModule) for m in wrapped.modules()),
                "head": {n: {"dtensor": isinstance(p, DTensor), "shape": list(p.shape),
                             "local": list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape)}
                         for n, p in head.items()}}
        with open(os.path.join(folder, f"probe_{rank}.json"), "w") as f:
            json.dump(info, f)
        return out

    LavenderTrainer.train = probed


def _worker(argv: list[str]) -> int:
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _force_fsdp_on_cpu()
    if os.environ.get(PROBE):
        _install_probe(os.environ[PROBE])
    from lavender.cli import main

    return main(argv)


# --- the test -------------------------------------------------------------------------------------
def _fsdp2_on_cpu_missing() -> str | None:
    import shutil

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return "accelerate is not installed"
    if shutil.which("accelerate") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                                "accelerate")):
        return "accelerate launcher not installed"
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from _train_data import write_train_world

    return write_train_world(tmp_path_factory.mktemp("fsdp2_data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, model: str, world: dict, out, probe, max_steps: int, *extra: str,
            launcher: list[str] | None = None) -> subprocess.Popen:
    # accelerate 1.16: `--cpu --num_processes 2` (and examples/accelerate/cpu_2proc.yaml) starts ONE process;
    # `--multi_gpu` / an FSDP config spawn 2 through torch.distributed.run, gloo on a CPU machine
    how = (["--config_file", FSDP2_CONFIG] if kind == "fsdp2"
           else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, *(launcher or []), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), os.path.abspath(__file__),
           "train", "--model", model, "--data", world["data"], "--attention", world["attention"],
           "--out", str(out), "--max_steps", str(max_steps), "--save_steps", "2", "--learning_rate", str(LR),
           "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "1", "--seed", "0",
           "--calibrate_lambda", "1", "--calibration_batches", "2",
           "--disable_tqdm", "true", "--use_cpu", "true", *extra]
    probe.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", PROBE: str(probe)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finish(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"


def _cancelled_biases(aligner) -> list[str]:
    """Biases of the Aligner's convolutions that a normalisation cancels (their gradient is exactly 0)."""
    from torch import nn

    net, names = list(aligner.net), []
    for i, m in enumerate(net):
        after = net[i + 1] if i + 1 < len(net) else None
        if isinstance(m, nn.Conv2d) and m.bias is not None and (
                isinstance(after, (nn.InstanceNorm2d, nn.BatchNorm2d))
                or (after is None and aligner.out_norm == "minmax")):
            names.append(f"net.{i}.bias")
    return names


def _metrics(run) -> list[dict]:
    return [json.loads(ln) for ln in open(run / "metrics.jsonl")]


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return {**{f"adapter/{k}": v for k, v in load_file(str(run / "adapter_model.safetensors")).items()},
            **{f"head/{k}": v for k, v in load_file(str(run / "lavender_head.safetensors")).items()}}


@pytest.mark.slow
def test_fsdp2_two_cpu_processes_train_save_resume_and_match_ddp(tiny_vlm, world, tmp_path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from lavender.aligner import Aligner
    from lavender.trainer import LavenderHead, load_head_state

    missing = _fsdp2_on_cpu_missing()
    if missing:
        pytest.skip(missing)
    model = tiny_vlm("mllama")
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp2"
    # the DDP reference (4 straight steps) and FSDP2's first 2 steps run side by side (each ~0.7 core)
    ref = _launch("ddp", model, world, ddp, tmp_path / "probe_ddp", 4)
    first = _launch("fsdp2", model, world, fsdp, tmp_path / "probe_fsdp", 2)
    _finish(first, "FSDP2 steps 1-2")
    _finish(ref, "DDP reference")
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp.bin").exists()  # the Trainer's FSDP checkpoint path
    ckpt = _weights(fsdp / "checkpoint-2")
    _finish(_launch("fsdp2", model, world, fsdp, tmp_path / "probe_fsdp", 4, "--resume"), "FSDP2 resume")

    # it really was FSDP2: the model an FSDPModule, the head's parameters sharded across the 2 ranks
    for rank in (0, 1):
        probe = json.loads((tmp_path / "probe_fsdp" / f"probe_{rank}.json").read_text())
        assert probe["fsdp_root"] and probe["fsdp_units"] > 1, probe
        assert probe["head"], "the Lavender head is not a parameter of the wrapped model"
        for name, p in probe["head"].items():
            assert p["dtensor"], name
            if p["shape"][0] > 1:
                assert p["local"][0] == math.ceil(p["shape"][0] / 2), (name, p)
    assert json.loads((tmp_path / "probe_ddp" / "probe_0.json").read_text())["wrapper"] == "DistributedDataParallel"
    # --calibrate_lambda pools every rank's batches: one λ on both ranks, the same under DDP and FSDP2
    lams = {json.loads((tmp_path / p / f"probe_{r}.json").read_text())["lambda_att"]
            for p in ("probe_ddp", "probe_fsdp") for r in (0, 1)}
    assert len(lams) == 1, lams
    (lam,) = lams

    # the loss is finite at every step; resume continued at step 3; losses equal DDP's
    rows, ref_rows = _metrics(fsdp), _metrics(ddp)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] == [r["step"] for r in ref_rows]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_att"]) for r in rows)
    assert all(r["lambda"] == pytest.approx(lam) for r in rows + ref_rows)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-5)
    assert "grad_ratio" in ref_rows[0] and not any("grad_ratio" in r for r in rows)  # not measurable under FSDP2

    # the head trained: its weights moved from initialisation, and again after the resume
    from safetensors.torch import load_file

    init = load_file(str(tmp_path / "probe_fsdp" / "init.safetensors"))
    final, ref_final = _weights(fsdp), _weights(ddp)
    assert final.keys() == ref_final.keys() == init.keys()
    heads = [k for k in final if k.startswith("head/")]
    assert max((final[k] - init[k]).abs().max().item() for k in heads) > 1e-4
    assert max((final[k] - ckpt[k]).abs().max().item() for k in heads) > 1e-4

    # the final trainable weights (adapter + head), gathered from the shards, equal DDP's (tolerance above)
    cfg = json.loads((fsdp / "lavender_head.json").read_text())

    def aligner(state: dict) -> Aligner:
        a = Aligner(cfg["in_channels"], cfg["variant"], cfg["norm"], cfg["act"], cfg["hidden"], cfg["out_norm"])
        a.load_state_dict({k[len("head/aligner."):]: v for k, v in state.items() if k.startswith("head/aligner.")})
        return a.eval()

    cancelled = {f"head/aligner.{n}" for n in _cancelled_biases(aligner(init))}
    compared = [k for k in final if k not in cancelled]
    assert len(compared) > len(cancelled) > 0
    for k in compared:
        moved = (ref_final[k] - init[k]).abs().max().item()
        diff = (final[k] - ref_final[k]).abs().max().item()
        assert diff <= REL * moved + ABS, f"{k}: FSDP2 and DDP differ by {diff:.3g}, trained distance {moved:.3g}"
    x = torch.rand(5, cfg["in_channels"], 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(aligner(final)(x), aligner(ref_final)(x), atol=HEAD_ATOL, rtol=0)

    # the saved adapter loads into the base model as plain PEFT, the head through Lavender's loader
    base = AutoModelForImageTextToText.from_pretrained(model)
    loaded = dict(PeftModel.from_pretrained(base, str(fsdp)).named_parameters())
    lora = {k: v for k, v in final.items() if k.startswith("adapter/")}
    for k, v in lora.items():
        name = k.split("/", 1)[1].replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), v), name
    head = LavenderHead(Aligner(cfg["in_channels"], cfg["variant"], cfg["norm"], cfg["act"]), config=cfg)
    assert load_head_state(head, str(fsdp))
    for k, v in head.state_dict().items():
        assert torch.equal(v, final[f"head/{k}"]), k


@pytest.mark.slow
def test_fsdp2_sharded_state_dict_is_refused(tiny_vlm, world, tmp_path) -> None:
    """SHARDED_STATE_DICT would finish with no adapter in RUN_DIR and no head in checkpoints: refused up front."""
    missing = _fsdp2_on_cpu_missing()
    if missing:
        pytest.skip(missing)
    proc = _launch("fsdp2", tiny_vlm("mllama"), world, tmp_path / "run", tmp_path / "probe", 1,
                   launcher=["--fsdp_state_dict_type", "SHARDED_STATE_DICT"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "error: FSDP with fsdp_state_dict_type SHARDED_STATE_DICT" in out, out[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
