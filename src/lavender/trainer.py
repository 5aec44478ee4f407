"""Stage 2 training: ``L = L_VLM + λ(step) · L_att`` on transformers' :class:`~transformers.Trainer`.

Only ``compute_loss``, ``training_step`` (to clear the capture after ``backward``), ``log`` and the
save/load hooks are overridden, so FSDP, DeepSpeed, gradient accumulation, mixed precision,
schedulers, ``report_to`` and checkpointing all come from the libraries.

Reductions (state them wherever λ is quoted): ``L_VLM`` is the mean token cross-entropy over the
batch's assistant tokens, as HF models return it; ``L_att`` is the mean over the batch's matched
words of the per-pixel mean squared error between the Aligner's map and the DM's map (both
min–max normalised to [0, 1]). With these, the authors' default λ = 10 is meaningful.

The Lavender head (Aligner, and the ``learn`` projections when used) is a submodule of the trained
model, so DDP/FSDP see its parameters, but it is saved beside the adapter in
``lavender_head.safetensors``: the adapter folder stays a plain PEFT folder that
``PeftModel.from_pretrained(base, RUN_DIR)`` loads (inference needs no Aligner), and
:func:`load_head` restores it for resuming and analysis (docs/pitfalls.md #15).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from lavender.aligner import apply_aligner
from lavender.config import (
    LAMBDA_SCHEDULES,
    RUN_FORMAT_VERSION,
    AlignmentConfig,
    LavenderError,
    warn_ignored_alignment,
)
from lavender.loss import attention_loss, kl_loss, mass_loss, softmax_map
from lavender.maps import minmax
from lavender.vlm.aggregate import matched_word_maps, word_grid_mass
from lavender.vlm.load import load_vlm

HEAD_WEIGHTS = "lavender_head.safetensors"
HEAD_CONFIG = "lavender_head.json"
RUN_CONFIG = "lavender_run.json"
METRICS = "metrics.jsonl"
SCHEDULES = LAMBDA_SCHEDULES


def lambda_at(step: int, lam: float, schedule: str = "constant", decay_steps: int = 1000,
              warmup_steps: int = 100) -> float:
    """λ at optimiser step ``step``; always within ``[0, lam]`` (docs/pitfalls.md #18: the authors' inverse decay
    went negative for λ > 1)."""
    if lam <= 0:
        return 0.0
    if schedule == "constant":
        f = 1.0
    elif schedule == "exp-decay":
        f = math.exp(-max(step, 0) / max(decay_steps, 1))
    elif schedule == "linear-warmup":
        f = min(1.0, max(step, 0) / max(warmup_steps, 1))
    else:
        raise ValueError(f"unknown lambda schedule {schedule!r}; choose one of {SCHEDULES}")
    return lam * min(max(f, 0.0), 1.0)


class LavenderHead(nn.Module):
    """The trainable parts Lavender adds: the Aligner and, for ``learn``, the parallel projections."""

    def __init__(self, aligner: nn.Module, learn: nn.Module | None = None, config: dict | None = None) -> None:
        super().__init__()
        self.aligner = aligner
        self.learn = learn
        self.config = dict(config or {})

    def zero_touch(self) -> torch.Tensor:
        """0 connected to every head parameter: keeps DDP happy on a batch where nothing matches."""
        params = list(self.parameters())
        if not params:  # the identity Aligner has none
            return torch.zeros(())
        return sum((p.sum() for p in params[1:]), params[0].sum()) * 0.0


def save_head(state: dict[str, torch.Tensor], config: dict, out_dir: str) -> None:
    """Write the head's weights (``lavender_head.safetensors``) and config beside an adapter."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out_dir, HEAD_WEIGHTS))
    with open(os.path.join(out_dir, HEAD_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_head_state(head: LavenderHead, run_dir: str) -> bool:
    """Load saved head weights into ``head``; False when ``run_dir`` has none."""
    from safetensors.torch import load_file

    path = os.path.join(run_dir, HEAD_WEIGHTS)
    if not os.path.exists(path):
        return False
    state, own = load_file(path), head.state_dict()
    if any(type(t).__name__ == "DTensor" for t in own.values()):
        # FSDP2 sharded the head with the model (resuming inside the wrapped model): each rank takes its
        # shard of the saved full tensors (every rank calls this, in the same key order)
        from torch.distributed.tensor import distribute_tensor

        state = {k: distribute_tensor(v.to(own[k].device, own[k].dtype), own[k].device_mesh, own[k].placements)
                 if type(own.get(k)).__name__ == "DTensor" else v for k, v in state.items()}
    head.load_state_dict(state)
    return True


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``.

    On resume, lines past the resumed step (logged after the last checkpoint by a killed run) are
    dropped first, so the file continues at the next step and never repeats one.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not os.path.exists(self.path):
            return
        lines = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for ln in f:
                try:
                    row = json.loads(ln)
                except ValueError:  # a line torn by a kill mid-write: it was never a complete step
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= state.global_step:
                    lines.append(ln if ln.endswith("\n") else ln + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class LavenderTrainer(Trainer):
    """:class:`~transformers.Trainer` whose loss adds λ·L_att.

    Args:
        head: the :class:`LavenderHead` (``None`` for plain SFT); must already be a submodule of ``model``.
        capture: the armed-per-step :class:`lavender.vlm.backend.AttentionCapture` (``None`` for SFT).
        aggregation: how heads and layers are pooled (:data:`lavender.vlm.aggregate.AGGREGATIONS`).
    """

    def __init__(self, *args: Any, head: LavenderHead | None = None, capture: Any = None,
                 aggregation: str = "heads", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False) and "FULL_STATE_DICT" not in str(
                self.accelerator.state.fsdp_plugin.state_dict_type):
            raise LavenderError("FSDP with fsdp_state_dict_type SHARDED_STATE_DICT: transformers would write no "
                                "adapter to the run folder and no lavender_head to checkpoints (nothing to use, "
                                "no Aligner to resume); set fsdp_state_dict_type: FULL_STATE_DICT as "
                                "examples/accelerate/fsdp2.yaml does")
        self.head = head
        self.capture = capture
        self.aggregation = aggregation
        # L_VLM must be a per-batch mean (like L_att) so that λ means the same under gradient
        # accumulation; the Trainer then divides the sum by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._acc: dict[str, list[float]] = {}
        self._frozen: list[nn.Parameter] = []
        self._step: dict[str, Any] = {}
        if head is not None:
            self.model.register_forward_hook(self._head_hook, with_kwargs=True)

    # --- the loss ---------------------------------------------------------------------------------
    def current_lambda(self) -> float:
        a = self.args
        return lambda_at(self.state.global_step, a.lambda_att, a.lambda_schedule, a.lambda_decay_steps,
                         a.lambda_warmup_steps)

    def in_aligner_pretraining(self) -> bool:
        return self.head is not None and self.state.global_step < self.args.aligner_pretrain_steps

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        align = inputs.pop("lavender", None)
        lam = self.current_lambda()
        pretrain = self.in_aligner_pretraining()
        use_att = self.head is not None and align is not None and (lam > 0 or pretrain)
        self._step = {"align": align if use_att and align.n_matched else None, "lam": lam, "pretrain": pretrain,
                      "measure_grads": self._measure_grads_now() and use_att and model.training}
        if self._step["align"] is not None:
            self.capture.arm(align.plan)
        try:
            outputs = model(**inputs)  # with a head, outputs.loss is already L_VLM + λ·L_att (_head_hook)
        finally:
            parts, diag = self._step.get("parts"), dict(self._step.get("diag") or {})
            if "grad_ratio" in self._step:
                diag["grad_ratio"] = self._step["grad_ratio"]
            self._step = {}
        loss = outputs.loss
        if not torch.isfinite(loss.detach()).all():  # before backward: the weights stay as they were
            ids = ", ".join(align.ids) if align is not None and align.ids else "not tracked without --attention"
            raise LavenderError(f"the loss is not finite at step {self.state.global_step + 1} (records {ids}); "
                                "check their attention maps (`lavender inspect`) and images, or lower "
                                "--learning_rate")
        loss_vlm, loss_att = parts if parts is not None else (loss.detach(), loss.new_zeros(()))
        self._record(loss_vlm=loss_vlm, loss_att=loss_att, lam=lam, align=align, diag=diag)
        return (loss, outputs) if return_outputs else loss

    def _head_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """Forward hook on the trained model: the attention term is added INSIDE its forward.

        DDP/FSDP only synchronise parameters used within the wrapped module's ``forward`` and found
        from its outputs; running the Aligner afterwards in ``compute_loss`` breaks DDP's reducer.
        So the head runs here and ``output.loss`` becomes ``L_VLM + λ·L_att`` (``L_att`` alone during
        Aligner pre-training). Every step touches every head parameter (``zero_touch``), so no rank
        ever sees them unused.
        """
        step = self._step
        if not step:  # a forward outside compute_loss (evaluation, generation): leave it alone
            return output
        loss_att = self.head.zero_touch().to(output.logits.device)
        align = step["align"]
        diag: dict[str, float] = {}
        if align is not None:
            loss_att = loss_att + self._attention_term(align, output.logits.device, diag)
        step["parts"] = (output.loss.detach(), loss_att.detach())
        step["diag"] = diag
        if step.get("measure_grads"):
            step["grad_ratio"] = self._grad_ratio(output.loss, loss_att, step["lam"])
        output.loss = loss_att + 0.0 * output.loss if step["pretrain"] else output.loss + step["lam"] * loss_att
        return output

    def _attention_term(self, align: Any, device: torch.device, diag: dict[str, float]) -> torch.Tensor:
        """L_att of one batch (``args.att_loss``), and the diagnostics logged beside it.

        ``loss_att_raw``: the raw aggregated VLM map (heads averaged, min–max like the targets) against
        the target — what L_att would be with no Aligner, so a user sees whether the VLM or the
        Aligner moved. ``sink_mass``: the share of the aligned rows' attention NOT on the image grid.
        """
        maps = matched_word_maps(self.capture.maps, align, self.aggregation)  # (N, C, S, S)
        target = align.targets.to(maps.device, torch.float32)  # docs/pitfalls.md #11: moved with the batch
        raw = maps.float().mean(dim=1)  # (N, S, S)
        kind = self.args.att_loss
        with torch.set_grad_enabled(kind == "mass" and torch.is_grad_enabled()):  # a diagnostic otherwise
            grid_mass = word_grid_mass(self.capture.maps, align)
        with torch.no_grad():
            diag["loss_att_raw"] = float(attention_loss(minmax(raw), target)[0])
            diag["sink_mass"] = float((1 - grid_mass).mean()) if grid_mass.numel() else 0.0
        if kind == "mass":
            return mass_loss(raw, grid_mass, target, self.args.mass_threshold).to(device)
        pred = apply_aligner(self.head.aligner, maps)  # (N, S, S); recomputed in backward (memory)
        if kind == "kl":
            prob = raw if self.args.aligner == "identity" else softmax_map(pred)
            return kl_loss(prob, target).to(device)
        return attention_loss(pred, target.to(pred.dtype))[0].to(device)

    def _grad_ratio(self, loss_vlm: torch.Tensor, loss_att: torch.Tensor, lam: float) -> float:
        """``‖λ·∇L_att‖ / ‖∇L_VLM‖`` over the trainable VLM weights (not the head): two extra backwards."""
        head = {id(p) for p in self.head.parameters()}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head]
        if not params or not loss_att.requires_grad:
            return 0.0
        g_vlm = torch.autograd.grad(loss_vlm, params, retain_graph=True, allow_unused=True)
        g_att = torch.autograd.grad(loss_att, params, retain_graph=True, allow_unused=True)
        n_vlm = torch.sqrt(sum((g.float().pow(2).sum() for g in g_vlm if g is not None), torch.zeros(())))
        n_att = torch.sqrt(sum((g.float().pow(2).sum() for g in g_att if g is not None), torch.zeros(())))
        return float(lam * n_att / n_vlm.clamp_min(1e-30))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        self._set_pretrain_freeze(self.in_aligner_pretraining())
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self.capture is not None:
                self.capture.clear()  # after backward: checkpoint recomputation needed the plan
        if self.head is not None and self.args.aligner_freeze and not self.in_aligner_pretraining():
            # frozen after pre-training: drop its gradients (after any all-reduce), so the optimiser
            # skips it; requires_grad stays, so DDP's bookkeeping never changes mid-run
            for p in self.head.parameters():
                p.grad = None
        return loss

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            self._set_pretrain_freeze(False)  # a run that ends inside pre-training leaves nothing frozen

    def _set_pretrain_freeze(self, freeze: bool) -> None:
        """During Aligner pre-training only head parameters get gradients (the VLM is frozen)."""
        if freeze and not self._frozen:
            head_params = {id(p) for p in self.head.parameters()}
            self._frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_params]
            for p in self._frozen:
                p.requires_grad_(False)
        elif not freeze and self._frozen:
            for p in self._frozen:
                p.requires_grad_(True)
            self._frozen = []

    # --- logging ----------------------------------------------------------------------------------
    def _measure_grads_now(self) -> bool:
        """grad_ratio at the first logged step and every ``grad_ratio_steps`` optimiser steps after."""
        every = self.args.grad_ratio_steps
        # FSDP2: autograd reaches only the gathered copies of the weights, not the sharded parameters
        # (torch.autograd.grad would return None for all of them), so the ratio is not logged there
        return (bool(every) and self.head is not None and not getattr(self, "is_fsdp_enabled", False)
                and self.state.global_step % every == 0)

    def _record(self, loss_vlm: torch.Tensor, loss_att: torch.Tensor, lam: float, align: Any,
                diag: dict[str, float] | None = None) -> None:
        acc = self._acc
        acc.setdefault("loss_vlm", []).append(float(loss_vlm.detach()))
        acc.setdefault("loss_att", []).append(float(loss_att.detach()))
        acc.setdefault("lambda", []).append(lam)
        for k, v in (diag or {}).items():
            acc.setdefault(k, []).append(v)
        if align is not None:
            acc.setdefault("_matched", []).append(align.n_matched)
            acc.setdefault("_words", []).append(align.n_words + align.n_dropped)
            acc.setdefault("_dropped", []).append(align.n_dropped)
            acc.setdefault("_ambiguous", []).append(align.n_ambiguous)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._acc and "loss" in logs:
            acc, self._acc = self._acc, {}
            for k in ("loss_vlm", "loss_att", "lambda", "loss_att_raw", "sink_mass", "grad_ratio"):
                if acc.get(k):
                    logs[k] = sum(acc[k]) / len(acc[k])
            words = sum(acc.get("_words", []))
            logs["match_rate"] = (sum(acc.get("_matched", [])) / words) if words else 0.0
            logs["ambiguous_rate"] = (sum(acc.get("_ambiguous", [])) / words) if words else 0.0
            logs["words_dropped"] = sum(acc.get("_dropped", []))
            logs["skipped_records"] = len(getattr(self.data_collator, "skipped", []))
        super().log(logs, start_time)

    # --- saving and resuming the head -------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        head_state = None
        if self.head is not None:
            # keep the saved model/adapter plain: the head goes to its own file. Take it from the
            # state dict the Trainer gathered (FSDP/DeepSpeed pass a full one), not from the module.
            if state_dict is None:
                state_dict = self.accelerator.unwrap_model(self.model).state_dict()
            head_state = {k.split("lavender_head.", 1)[1]: v for k, v in state_dict.items() if "lavender_head." in k}
            state_dict = {k: v for k, v in state_dict.items() if "lavender_head." not in k}
        super()._save(output_dir, state_dict=state_dict)
        if head_state is not None and self.args.should_save:
            save_head(head_state, self.head.config, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.head is not None and not load_head_state(self.head, resume_from_checkpoint):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {HEAD_WEIGHTS}; cannot resume the Aligner")


# --- the whole run ----------------------------------------------------------------------------------
class RecordDataset(torch.utils.data.Dataset):
    """The usable records of a file; bad ones are reported (and counted) up front, not mid-run."""

    def __init__(self, source: str, images_root: str | None = None, strict: bool = False) -> None:
        from lavender.records import RecordError, iter_records

        self.records, self.errors = [], []
        for item in iter_records(source, images_root=images_root):
            if isinstance(item, RecordError):
                if strict:
                    raise item
                self.errors.append(item)
            elif not any(m["role"] == "assistant" for m in item.messages):
                err = RecordError(item.index, item.id, "no assistant turn: nothing to train on")
                if strict:
                    raise err
                self.errors.append(err)
            else:
                self.records.append(item)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        return self.records[i]


MIN_ATTENTION_COVERAGE = 0.5  # below this share of records with maps, training warns


def screen_records(dataset: RecordDataset, store: Any, *, strict: bool, attention: str | None = None) -> None:
    """Refuse poison before step 0: drop (and count in ``dataset.errors``) or, with ``strict``, raise
    for each record whose maps would silently corrupt training.

    With an attention dataset: a repeated id (maps are joined by id, so the second copy would take
    the first one's maps), and maps that are not finite or not ``(n_words, S, S)`` with the
    manifest's ``S`` (one NaN map turns every weight into NaN). Without one, a repeated id is harmless
    and kept. Reads every matched record's maps once.
    """
    import numpy as np

    from lavender.records import RecordError

    if store is None:
        return
    size = store.manifest.get("map_size")
    seen: set[str] = set()
    kept = []
    for rec in dataset.records:
        reason = None
        if rec.id in seen:
            reason = (f"id {rec.id!r} repeats an earlier record's: maps are joined by id, so it would train on "
                      "the other record's maps; give every record its own id")
        elif rec.id in store:
            maps = np.asarray(store.get(rec.id)["maps"])
            if maps.ndim != 3 or (size and tuple(maps.shape[1:]) != (size, size)):
                reason = f"its maps in {attention} have shape {tuple(maps.shape)}, not (words, {size}, {size})"
            elif not np.isfinite(maps).all():
                reason = (f"its maps in {attention} hold non-finite values (NaN/inf): re-extract this record "
                          "(`lavender inspect` lists every such map)")
        seen.add(rec.id)
        if reason is None:
            kept.append(rec)
            continue
        err = RecordError(rec.index, rec.id, reason)
        if strict:
            raise err
        dataset.errors.append(err)
    dataset.records = kept


def checkpoint_step(path: str) -> int | None:
    """The step of a COMPLETE checkpoint folder, else None.

    transformers writes ``trainer_state.json`` last (after the weights, optimizer, scheduler and RNG
    states), so a checkpoint whose state file is missing or torn was cut off mid-save.
    """
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def last_checkpoint(run_dir: str) -> str | None:
    """The newest COMPLETE ``checkpoint-N`` of ``run_dir`` (one cut off mid-save is skipped, with a warning)."""
    import logging
    import re

    if not os.path.isdir(run_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(run_dir)
                    if (m := re.fullmatch(r"checkpoint-(\d+)", name))), reverse=True)
    for _, name in found:
        path = os.path.join(run_dir, name)
        if checkpoint_step(path) is not None:
            return path
        logging.getLogger("lavender.train").warning(
            "%s is incomplete (cut off while saving: no readable trainer_state.json); skipping it", path)
    return None


def run_training(args: Any, alignment: AlignmentConfig | None = None, quiet: bool = False) -> LavenderTrainer:
    """Build everything from ``args`` (a :class:`lavender.config.TrainConfig`) and ``alignment``,
    train (resuming if asked) and save to ``args.output_dir`` with the run's config and model card.

    ``quiet``: print nothing per step (the logs still go to ``metrics.jsonl``): for callers that
    show their own progress, such as the demo and the experiments.
    """
    import logging

    log = logging.getLogger("lavender.train")
    from lavender.locks import hold_folder

    alignment = alignment or AlignmentConfig()
    warn_ignored_alignment(args, alignment)
    if args.world_size > 1:  # a worker of a launcher: die with it, never train on as an orphan
        from lavender.locks import die_with_parent

        die_with_parent()
    with hold_folder(args.output_dir, args.process_index, "training run"):
        return _run_training(args, alignment, quiet, log)


def _run_training(args: Any, alignment: AlignmentConfig, quiet: bool, log: Any) -> LavenderTrainer:
    """:func:`run_training` while this process holds the run folder."""
    trainer = build_trainer(args, alignment)
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    resume = last_checkpoint(args.output_dir) if args.resume else None
    if args.resume and resume is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", args.output_dir)
    done = checkpoint_step(resume) if resume else None
    if done is not None and 0 < args.max_steps <= done and os.path.exists(os.path.join(args.output_dir, "README.md")):
        log.warning("--resume: %s already finished at step %d (--max_steps %d): nothing to train; raise "
                    "--max_steps to continue", args.output_dir, done, args.max_steps)
        return trainer
    if args.calibrate_lambda is not None:
        lam, base = calibrate_lambda(trainer, args.calibrate_lambda, args.calibration_batches)
        (log.info if quiet else log.warning)(
            "calibrated λ = %.4g: ‖∇L_att‖/‖∇L_VLM‖ = %.4g at λ = 1 over %d batches, target ratio %g",
            lam, base, args.calibration_batches, args.calibrate_lambda)
        if not quiet:
            print(f"lavender train: calibrated λ = {lam:.4g} (gradient ratio {base:.4g} at λ = 1; "
                  f"target {args.calibrate_lambda})")
        args.lambda_att = lam
    os.makedirs(args.output_dir, exist_ok=True)
    if args.should_save:
        with open(os.path.join(args.output_dir, RUN_CONFIG), "w") as f:
            run = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
            json.dump({"format_version": RUN_FORMAT_VERSION, **run, "world_size": args.world_size}, f,
                      indent=2, default=str)
        alignment.save(args.output_dir, resolved_layers=trainer.data_collator.layers)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    n_bad, n_skipped = len(trainer.train_dataset.errors), len(trainer.data_collator.skipped)
    if n_bad or n_skipped:
        log.warning("%d records skipped before training, %d while loading images", n_bad, n_skipped)
    if args.should_save:
        write_model_card(args, alignment, trainer)
    return trainer


def calibrate_lambda(trainer: LavenderTrainer, ratio: float, batches: int = 4) -> tuple[float, float]:
    """λ such that ``‖λ·∇L_att‖ / ‖∇L_VLM‖ = ratio`` on the trainable VLM weights, at initialisation.

    Measured on the first ``batches`` training batches that match any word (the mean of the
    per-batch ratios at λ = 1; with several processes, over every process's batches, so that all train
    with one λ); returns ``(λ, measured ratio at λ = 1)``. The gradients are discarded: nothing is trained.
    """
    if trainer.head is None:
        raise LavenderError("--calibrate-lambda needs --attention (there is no attention term to weigh)")
    model = trainer.model
    model.train()
    ratios: list[float] = []
    for inputs in trainer.get_train_dataloader():
        if len(ratios) == batches:
            break
        inputs = trainer._prepare_inputs(inputs)
        align = inputs.pop("lavender", None)
        if align is None or not align.n_matched:
            continue
        trainer.capture.arm(align.plan)
        try:
            out = model(**inputs)  # no step armed: the head hook leaves outputs.loss = L_VLM
            loss_att = trainer._attention_term(align, out.logits.device, {})
            ratios.append(trainer._grad_ratio(out.loss, loss_att, 1.0))
        finally:
            trainer.capture.clear()
    model.zero_grad(set_to_none=True)
    usable = [r for r in ratios if r > 0]
    if trainer.args.world_size > 1:  # one λ for every rank: pool the ratios of all ranks' batches, in rank order
        from accelerate.utils import gather_object

        usable = list(gather_object(usable))
    if not usable:
        raise LavenderError("--calibrate-lambda: no batch matched a word (or L_att has no gradient on the "
                            "trainable weights); check --attention and --layers")
    base = sum(usable) / len(usable)
    return ratio / base, base


def write_model_card(args: Any, alignment: AlignmentConfig, trainer: LavenderTrainer) -> str:
    """``RUN_DIR/README.md``: base model, data, the Lavender options and the final metrics (as PEFT/TRL do)."""
    metrics = {}
    path = os.path.join(args.output_dir, METRICS)
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(ln) for ln in f if ln.strip()]
        metrics = lines[-1] if lines else {}
    mode = "LoRA" if args.lora else "full fine-tuning"
    lam = f"λ = {args.lambda_att} ({args.lambda_schedule})" if args.uses_attention else "λ = 0 (plain autoregressive)"
    rows = [("base model", args.model), ("records", args.data), ("attention dataset", args.attention or "—"),
            ("fine-tuning", mode + (f", r = {args.lora_r}, alpha = {args.lora_alpha}" if args.lora else "")),
            ("attention term", lam + (f", Aligner {args.aligner}/{args.aligner_norm}/{args.aligner_act}"
                                      if args.uses_attention else "")),
            *((k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list) else str(v))
              for k, v in {**alignment.to_dict(), "layers": trainer.data_collator.layers}.items()),
            ("steps", str(trainer.state.global_step)), ("learning rate", str(args.learning_rate)),
            ("seed", str(args.seed)),
            ("records skipped", str(len(trainer.train_dataset.errors) + len(trainer.data_collator.skipped)))]
    final = [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in metrics.items()
             if k in ("step", "loss", "loss_vlm", "loss_att", "lambda", "match_rate")]
    lines = ["---", "library_name: peft" if args.lora else "library_name: transformers",
             f"base_model: {args.model}", "tags: [lavender, diffusion-instruction-tuning]", "---", "",
             f"# {os.path.basename(os.path.abspath(args.output_dir))}", "",
             "Fine-tuned with [Lavender](https://arxiv.org/abs/2502.06814) (diffusion instruction tuning): "
             "L = L_VLM + λ·L_att.", "", "| setting | value |", "| --- | --- |",
             *(f"| {k} | {v} |" for k, v in rows), ""]
    if final:
        lines += ["## Final logged metrics", "", "| metric | value |", "| --- | --- |",
                  *(f"| {k} | {v} |" for k, v in final), ""]
    if args.lora:
        lines += ["## Use", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForImageTextToText",
                  f'base = AutoModelForImageTextToText.from_pretrained("{args.model}")',
                  f'model = PeftModel.from_pretrained(base, "{args.output_dir}")', "```", ""]
    card = os.path.join(args.output_dir, "README.md")
    with open(card, "w") as f:
        f.write("\n".join(lines))
    return card


def build_trainer(args: Any, alignment: AlignmentConfig | None = None) -> LavenderTrainer:
    """Model (+LoRA), head, capture, collator and trainer from ``args`` and ``alignment``, ready to ``train()``."""
    import logging

    from transformers import set_seed

    from lavender.aligner import Aligner
    from lavender.data_collator import LavenderCollator
    from lavender.vlm.aggregate import LearnedProjections
    from lavender.vlm.backend import enable_capture

    log = logging.getLogger("lavender.train")
    alignment = alignment or AlignmentConfig()
    set_seed(args.seed)  # LoRA and the Aligner are initialised before the Trainer seeds anything
    dataset = RecordDataset(args.data, args.images_root, strict=args.strict)
    store = None
    if args.uses_attention:
        from lavender.attnstore import AttentionStore

        store = AttentionStore(args.attention)
    screen_records(dataset, store, strict=args.strict, attention=args.attention)
    for err in dataset.errors:
        log.warning("skipped %s", err)
    if not len(dataset):
        raise LavenderError(f"--data {args.data}: no usable record ({len(dataset.errors)} bad; the first: "
                            f"{dataset.errors[0] if dataset.errors else 'the file is empty'})")
    if store is not None:
        matched = sum(r.id in store for r in dataset.records)
        if matched == 0:
            raise LavenderError(f"--attention {args.attention} has maps for none of the {len(dataset)} records "
                                f"of --data {args.data} (maps are joined by record id): extract it from this "
                                "data, or drop --attention for plain fine-tuning")
        if matched < MIN_ATTENTION_COVERAGE * len(dataset):
            log.warning("--attention %s covers only %d of %d records: the rest train without the attention term",
                        args.attention, matched, len(dataset))
    model, processor, family = load_vlm(args.model)
    layers = alignment.layer_list or family.default_layers(model)
    aggregation = alignment.aggregation

    if args.lora:
        from peft import LoraConfig, get_peft_model

        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        target = args.lora_target or family.lora_target_regex
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout, target_modules=target))

    head = capture = None
    if store is not None:
        learn = None
        if aggregation == "learn":
            modules = family.attention_modules(_unwrap(model))
            learn = LearnedProjections({i: modules[i] for i in layers}).attach()
        in_ch = _heads(model, family, layers) if aggregation == "heads" else 1
        aligner = Aligner(in_ch, args.aligner, args.aligner_norm, args.aligner_act)
        head = LavenderHead(aligner, learn, config={**aligner.config, "aggregation": aggregation,
                                                     "layers": layers})
        model.add_module("lavender_head", head)
        capture = enable_capture(model, family, layers=layers, projector=learn)

    collator = LavenderCollator(processor, family, _unwrap(model).config, store, layers, alignment)
    return LavenderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=processor, head=head, capture=capture, aggregation=aggregation,
                           callbacks=[MetricsCallback(os.path.join(args.output_dir, METRICS))])


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _heads(model: nn.Module, family: Any, layers: list[int]) -> int:
    """Number of query heads of the watched layers (the Aligner's channels under ``heads``)."""
    modules = family.attention_modules(_unwrap(model))
    m = modules[layers[0]]
    n = getattr(m, "num_heads", None) or getattr(getattr(m, "config", None), "num_attention_heads", None)
    if n is None:
        n = m.q_proj.out_features // m.head_dim
    return int(n)
