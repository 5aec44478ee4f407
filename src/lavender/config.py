"""One config system: a dataclass per command, one parser for flags and YAML, one error path.

Every ``lavender`` command is its dataclasses plus ``main(*configs)``. :class:`LavenderParser`
(built on transformers' public :class:`~transformers.HfArgumentParser`, as TRL's ``TrlParser`` is)
turns a dataclass's fields into flags (``--field_name`` and ``--field-name``, plus the aliases in
the field's metadata), reads ``--config FILE.yaml`` with THE SAME vocabulary (a key may be the
field name, its dashed spelling or any alias: ``out`` and ``output_dir`` are one option), lets
flags override the file, and fails at parse time — before any model or data loads — on an
unknown key or a value outside its choices, naming the valid ones.

Library functions take these objects directly (``run_extract(ExtractConfig(...))``,
``run_training(TrainConfig(...), AlignmentConfig(...))``); the demo and ``experiments/`` build them
in Python. Validation lives in each dataclass's ``__post_init__``, so a config built in code is
checked exactly as one parsed from the command line.

Option groups and the choice tables sit beside the dataclasses that use them; the modules that
implement a choice (``lavender.vlm.aggregate`` for aggregations, …) import the table from here, and
tests check that every listed choice is implemented.

This module imports neither torch nor transformers at import time (``--help`` stays fast); the
training config, a :class:`~transformers.TrainingArguments` subclass, is built on first use of
``lavender.config.TrainConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("lavender")

#: version written into run folders (``lavender_run.json``, ``lavender_alignment.json``)
RUN_FORMAT_VERSION = 1
ALIGNMENT_FILE = "lavender_alignment.json"

# --------------------------------------------------------------------------------- errors
class LavenderError(Exception):
    """An expected failure (missing model, bad path, unreadable dataset): one line, exit 1."""

    exit_code = 1


class UsageError(LavenderError, ValueError):
    """A bad option value or combination: one line, exit 2 (as argparse's own usage errors)."""

    exit_code = 2


# --------------------------------------------------------------------------------- choice tables
Aggregation = Literal["heads", "mean-mean", "mean-max", "max-mean", "max-max", "flow-mult", "flow-sum", "learn"]
RowOwner = Literal["next", "query"]
AlignOn = Literal["answer", "all"]
MatchMode = Literal["exact", "lemma"]
Ambiguity = Literal["occurrence", "first", "skip", "mean"]
AlignerKind = Literal["light", "sim", "deep", "mlp", "identity"]
AlignerNorm = Literal["instance", "batch"]
AttLoss = Literal["mse", "kl", "mass"]
AlignerAct = Literal["relu6", "leakyrelu"]
LambdaSchedule = Literal["constant", "exp-decay", "linear-warmup"]
Recipe = Literal["ddim", "nulltext", "noise"]
Pairing = Literal["word", "phrase"]
Frame = Literal["squash", "pad", "center-crop"]
Normalization = Literal["minmax", "none"]
DType = Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]
QAText = Literal["question+answer", "answer", "question"]

AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)
ROW_OWNERS: tuple[str, ...] = typing.get_args(RowOwner)
ALIGN_ON: tuple[str, ...] = typing.get_args(AlignOn)
MATCH_MODES: tuple[str, ...] = typing.get_args(MatchMode)
AMBIGUITY: tuple[str, ...] = typing.get_args(Ambiguity)
ALIGNERS: tuple[str, ...] = typing.get_args(AlignerKind)
ALIGNER_NORMS: tuple[str, ...] = typing.get_args(AlignerNorm)
ALIGNER_ACTS: tuple[str, ...] = typing.get_args(AlignerAct)
ATT_LOSSES: tuple[str, ...] = typing.get_args(AttLoss)
LAMBDA_SCHEDULES: tuple[str, ...] = typing.get_args(LambdaSchedule)
RECIPES: tuple[str, ...] = typing.get_args(Recipe)
PAIRINGS: tuple[str, ...] = typing.get_args(Pairing)
FRAMES: tuple[str, ...] = typing.get_args(Frame)
NORMALIZATIONS: tuple[str, ...] = typing.get_args(Normalization)
DTYPE_NAMES: tuple[str, ...] = typing.get_args(DType)
QA_MODES: tuple[str, ...] = typing.get_args(QAText)


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
        aliases: Sequence[str] = (), **meta: Any) -> Any:
    """A dataclass field with its ``--help`` text (and flag aliases) in the metadata."""
    metadata = {"help": help, **meta}
    if aliases:
        metadata["aliases"] = list(aliases)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class Checked:
    """Mixin: ``check_choices()`` validates every ``Literal`` field, whatever built the object.

    argparse checks choices of flags, but not of YAML values or of configs built in Python; this
    runs in each config's ``__post_init__`` so all three paths fail the same way.
    """

    def check_choices(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            choices = _literal_choices(hints.get(f.name))
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise UsageError(f"{flag_name(f.name)} {value!r}: choose one of {', '.join(map(str, choices))}")


def _literal_choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):  # Optional[Literal[...]]
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def parse_layers(value: Any, what: str = "--layers") -> list[int] | None:
    """``"1,3"``, ``["1", "3"]``, ``[1, 3]`` or ``"1 3"`` → ``[1, 3]``; ``None``/empty → ``None``."""
    if value is None or value == "" or value == []:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[int] = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise UsageError(f"{what} {value!r}: give layer indices as integers, e.g. {what} 0,3") from None
    if any(i < 0 for i in out):
        raise UsageError(f"{what} {value!r}: layer indices must be >= 0")
    return out or None


# --------------------------------------------------------------------------------- alignment
@dataclass
class AlignmentConfig(Checked):
    """Which VLM attention is read for which word and how it is paired with the DM's map.

    One object shared by training (the collator and the attention term), ``analyze``, ``attend``
    and the demo; a run folder saves it (``lavender_alignment.json``) so that analysis reads a run
    exactly as it was trained.

    Reading the VLM:
        layers: watched layer indices (default: the family's; Mllama: every cross-attention layer).
        aggregation: how heads and layers become one map (``heads`` keeps heads as channels for
            the Aligner; ``learn`` adds trained q/k projections; the rest are pools).
        row_owner: ``next`` — a word's map is the row that PREDICTS its token (the paper's
            reading); ``query`` — the word's own rows.
    Pairing with the DM:
        align_on: ``answer`` — the assistant's words; ``all`` — every text word after the image.
        match: ``exact`` (lower-case) or ``lemma`` (English lemma) word comparison.
        ambiguous: what a VLM word does when its text names several DM words ("red" in "a red
            circle and a red square"): ``occurrence`` — the k-th occurrence takes the k-th;
            ``first``; ``skip`` — not aligned; ``mean`` — the average of their maps. Records with
            explicit ``align_pairs`` never use it: their pairs are exact.
    """

    layers: list[str] | None = opt(None, "watched layer indices, e.g. 0,3 or 0 3 (default: the family's)")
    aggregation: Aggregation = opt("heads", "heads→map pooling: " + ", ".join(AGGREGATIONS))
    row_owner: RowOwner = opt("next", "next: the row before a word's token (the paper's); query: its own rows")
    align_on: AlignOn = opt("answer", "align the answer's words, or every text word after the image")
    match: MatchMode = opt("exact", "VLM↔DM word matching: exact (lower-case) or lemma")
    # default chosen by measurement: highest IoU with the true referent on world-v2 records (docs/records.md)
    ambiguous: Ambiguity = opt("mean", "a word naming several DM words: " + ", ".join(AMBIGUITY))

    def __post_init__(self) -> None:
        self.check_choices()
        self.layers = parse_layers(self.layers)

    @property
    def layer_list(self) -> list[int] | None:
        return list(self.layers) if self.layers else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, run_dir: str, resolved_layers: Sequence[int] | None = None) -> str:
        """Write ``run_dir/lavender_alignment.json`` (with the layers actually watched)."""
        data = {"format_version": RUN_FORMAT_VERSION, **self.to_dict()}
        if resolved_layers is not None:
            data["layers"] = [int(i) for i in resolved_layers]
        path = os.path.join(run_dir, ALIGNMENT_FILE)
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
        return path

    @classmethod
    def load(cls, run_dir: str) -> AlignmentConfig | None:
        """The alignment a run folder was trained with, or ``None`` when it has none."""
        saved = saved_alignment(run_dir)
        return None if saved is None else cls(**saved)


def saved_alignment(run_dir: str | None) -> dict[str, Any] | None:
    """The fields of ``run_dir``'s saved :class:`AlignmentConfig` (``None`` when it has none).

    Also reads run folders written before this file existed (``lavender_run.json`` held the same
    fields); a folder from a newer format version is refused with a clear message.
    """
    if not run_dir or not os.path.isdir(run_dir):
        return None
    path = os.path.join(run_dir, ALIGNMENT_FILE)
    legacy = os.path.join(run_dir, "lavender_run.json")
    if os.path.exists(path):
        data = _read_json(path)
    elif os.path.exists(legacy):
        data = _read_json(legacy)
        data.setdefault("format_version", 0)
    else:
        return None
    version = int(data.get("format_version", 0))
    if version > RUN_FORMAT_VERSION:
        raise LavenderError(f"{run_dir}: run folder format {version} is newer than this Lavender "
                            f"({RUN_FORMAT_VERSION}); upgrade lavender-vlm to read it")
    names = {f.name for f in dataclasses.fields(AlignmentConfig)}
    return {k: v for k, v in data.items() if k in names}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LavenderError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise LavenderError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------------- Stage 1
@dataclass
class ExtractConfig(Checked):
    """Options of ``lavender extract`` (Stage 1). Recipes, costs and the format: docs/stage1.md.

    Model and data: ``dm``, ``data``, ``out``, ``images_root``, ``qa_text``.
    Recipe: ``recipe`` (ddim | nulltext | noise), ``steps``, ``inversion_steps`` (ddim), ``inner_steps``
    (nulltext), ``timesteps`` (noise), ``guidance`` (None = 1.0 for ddim and noise, 7.5 for nulltext).
    Maps: ``map_size``, ``resolutions`` (cross-attention sides averaged), ``modules`` (only these
    cross-attention modules; flag ``--modules``, old spelling ``--layers``), ``frame``, ``normalize``.
    Running: ``batch_size``, ``dtype``, ``device``, ``shard_size``, ``strict``, ``limit``.
    """

    dm: str = opt(dataclasses.MISSING, "diffusers pipeline folder or hub id: SD-1.x/2.x, SDXL, SD3 or Flux (e.g. "
                  "from `lavender tiny-dm`)")
    data: str = opt(dataclasses.MISSING, "records JSONL (see docs/records.md)")
    out: str = opt(dataclasses.MISSING, "attention dataset folder (created; reused to resume)")
    recipe: Recipe = opt("ddim", "ddim (default), nulltext (slow) or noise (one noise-and-read pass per timestep)")
    steps: int = opt(10, "denoising / DDIM grid steps")
    inversion_steps: int = opt(5, "ddim: inversion steps")
    inner_steps: int = opt(5, "nulltext: max optimisation steps per DDIM step")
    timesteps: list[int] = opt(help="noise: the timesteps read, one UNet pass each (0 = clean, 999 = pure noise)",
                               factory=lambda: [400])
    guidance: float | None = opt(None, "classifier-free guidance scale (default: 1.0 for ddim, 7.5 for nulltext)")
    map_size: int = opt(32, "side of the stored maps")
    resolutions: list[int] | None = opt(None, "side lengths of the cross-attention maps to average (default: the "
                                        "teacher's: 16 32 for SD-1.x/2.x, every side for SDXL, the token grid "
                                        "for SD3/Flux)")
    modules: list[str] | None = opt(None, "only these cross-attention modules (name prefixes, e.g. down_blocks.0); "
                                    "default: all at --resolutions. Old spelling: --layers", aliases=["--layers"])
    frame: Frame = opt("squash", "how the image fills the DM's square")
    normalize: Normalization = opt("minmax", "per-map normalisation")
    qa_text: QAText = opt("question+answer", "DM text of conversation records without align_text")
    images_root: str | None = opt(None, "folder relative image paths are relative to (default: the JSONL's folder)")
    batch_size: int = opt(4, "images per UNet call")
    dtype: DType = opt("fp32", "compute dtype")
    device: str | None = opt(None, "torch device (default: accelerate's for this process)")
    shard_size: int = opt(256, "examples per shard file")
    strict: bool = opt(False, "stop with exit 1 at the first bad record")
    limit: int | None = opt(None, "only the first N records")
    progress: bool = opt(True, "show a progress bar (--no-progress to hide it)")
    json: bool = opt(False, "print the summary as one JSON object")
    dry_run: bool = opt(False, "print UNet evaluations per image, images still to do and a time estimate "
                        "on this device (one timed batch); write nothing")

    def __post_init__(self) -> None:
        self.check_choices()
        if self.guidance is None:
            self.guidance = 7.5 if self.recipe == "nulltext" else 1.0
        if self.recipe == "noise" and self.guidance != 1.0:
            raise UsageError("--recipe noise reads one conditional pass: --guidance does not apply (leave it out)")
        if min(self.steps, self.inversion_steps, self.batch_size, self.map_size, self.shard_size) < 1 \
                or self.inner_steps < 0:
            raise UsageError("--steps, --inversion-steps, --batch-size, --map-size and --shard-size must be >= 1, "
                             "--inner-steps >= 0")
        if self.limit is not None and self.limit < 0:
            raise UsageError(f"--limit must be >= 0, got {self.limit}")
        self.timesteps = [int(t) for t in self.timesteps]
        if not self.timesteps or min(self.timesteps) < 0:
            raise UsageError(f"--timesteps {self.timesteps}: give one or more timesteps >= 0, e.g. 400")
        if self.resolutions is not None:
            self.resolutions = sorted({int(r) for r in self.resolutions})
        if self.resolutions is not None and (not self.resolutions or min(self.resolutions) < 1):
            raise UsageError(f"--resolutions {self.resolutions}: give positive map sides, e.g. 16 32")
        self.modules = list(self.modules) if self.modules else None

    @property
    def layers(self) -> list[str] | None:  # the old name, kept for one release
        return self.modules


# --------------------------------------------------------------------------------- Stage 2
_TRAIN_CONFIG: type | None = None


def _train_config() -> type:
    """Build :class:`TrainConfig` (a ``TrainingArguments`` subclass) on first use: it imports torch."""
    global _TRAIN_CONFIG
    if _TRAIN_CONFIG is not None:
        return _TRAIN_CONFIG
    from transformers import TrainingArguments

    @dataclass
    class TrainConfig(TrainingArguments, Checked):
        """Options of ``lavender train``: transformers' ``TrainingArguments`` plus the method's own.

        Data and model: ``model``, ``data``, ``attention``, ``images_root``.
        Fine-tuning: ``lora`` (default; ``--full`` for full fine-tuning), ``lora_r``, ``lora_alpha``,
        ``lora_dropout``, ``lora_target``.
        The attention term: ``lambda_att`` (``--lambda``), ``lambda_schedule``, ``lambda_decay_steps``,
        ``lambda_warmup_steps``, ``aligner_pretrain_steps``, ``aligner``, ``aligner_norm``,
        ``aligner_act``. What is aligned (layers, aggregation, rows, words) is the separate
        :class:`AlignmentConfig`.
        Run control: ``resume``, ``strict``.

        Changed defaults: ``output_dir`` is required (``--out``), ``remove_unused_columns=False`` (the
        collator needs the whole record), ``logging_steps=1``, ``save_total_limit=2``,
        ``dataloader_pin_memory=False``, ``save_steps=100``, ``learning_rate=1e-4`` (the paper's),
        ``lr_scheduler_type="constant"``.
        """

        model: str = opt("", "VLM checkpoint: a local folder or a hub id")
        data: str = opt("", "records (JSONL file or a saved HF dataset)")
        attention: str | None = opt(None, "attention dataset from `lavender extract`; without it training is plain SFT")
        images_root: str | None = opt(None, "folder image paths are relative to")
        lora: bool = opt(True, "train a LoRA adapter (default); --full for full fine-tuning")
        lora_r: int = opt(16, "LoRA rank")
        lora_alpha: int = opt(32, "LoRA alpha")
        lora_dropout: float = opt(0.05, "LoRA dropout")
        lora_target: str | None = opt(None, "regex (re.fullmatch on module names) of LoRA targets; default: the family's")
        lambda_att: float = opt(10.0, "λ, weight of L_att (see docs/training.md for the reductions); "
                                "0 = plain autoregressive fine-tuning", aliases=["--lambda"])
        lambda_schedule: LambdaSchedule = opt("constant", "λ over steps: constant, exp-decay "
                                              "(λ·exp(-step/decay_steps)), linear-warmup")
        lambda_decay_steps: int = opt(1000, "time constant of exp-decay")
        lambda_warmup_steps: int = opt(100, "steps of linear-warmup")
        aligner_pretrain_steps: int = opt(0, "first P steps train only the Aligner (and learn projections) on "
                                          "L_att, the VLM frozen")
        att_loss: AttLoss = opt("mse", "L_att: mse (the paper's, on min–max maps), kl (KL(target‖prediction) "
                                "between distributions) or mass (−log of the row's attention share inside the "
                                "target's region; raw attention, bypasses the Aligner). See docs/training.md")
        mass_threshold: float = opt(0.5, "mass: the target's region is target >= this (min–max maps: half range)")
        aligner: AlignerKind = opt("sim", "Aligner variant; identity = no parameters (cannot absorb L_att)")
        aligner_norm: AlignerNorm = opt("instance", "Aligner normalisation")
        aligner_act: AlignerAct = opt("relu6", "Aligner activation")
        aligner_freeze: bool = opt(False, "freeze the Aligner after --aligner-pretrain-steps (then only the VLM "
                                   "can lower L_att)")
        calibrate_lambda: float | None = opt(None, "set λ so that ‖λ·∇L_att‖ / ‖∇L_VLM‖ on the trainable VLM "
                                             "weights equals this ratio, measured on the first "
                                             "--calibration-batches batches before training (e.g. 0.5)")
        calibration_batches: int = opt(4, "batches the λ calibration averages over")
        grad_ratio_steps: int = opt(50, "log grad_ratio = ‖λ·∇L_att‖ / ‖∇L_VLM‖ at the first logging step and "
                                    "every N steps after (0: never; two extra backward passes each time)")
        resume: bool = opt(False, "continue from the last complete checkpoint in --out")
        strict: bool = opt(False, "stop at the first bad record instead of skipping it")

        # changed defaults of TrainingArguments
        output_dir: str | None = opt(None, "RUN_DIR (alias --out)", aliases=["--out"])
        remove_unused_columns: bool = opt(False, "keep False: the collator needs records")
        logging_steps: float = opt(1, "log every N steps")
        save_steps: float = opt(100, "checkpoint every N steps")
        learning_rate: float = opt(1e-4, "peak learning rate (paper: 1e-4)")
        lr_scheduler_type: str = opt("constant", "transformers scheduler name")
        save_total_limit: int | None = opt(2, "checkpoints kept in RUN_DIR")
        dataloader_pin_memory: bool = opt(False, "pin host memory (GPU runs: true)")

        extra_flags: typing.ClassVar = (
            (("--full",), {"dest": "lora", "action": "store_false", "help": "full fine-tuning instead of LoRA"}),)

        def __post_init__(self) -> None:
            if not self.output_dir:
                raise UsageError("--out RUN_DIR is required")
            if not self.model:
                raise UsageError("--model is required (a VLM folder, hub id or `lavender tiny-vlm` output)")
            if not self.data:
                raise UsageError("--data is required (records JSONL, see docs/records.md)")
            self.check_choices()
            if self.lambda_att < 0:
                raise UsageError(f"--lambda must be >= 0, got {self.lambda_att}")
            if self.aligner_pretrain_steps and not self.attention:
                raise UsageError("--aligner-pretrain-steps needs --attention (there is nothing to pre-train on)")
            if self.aligner_freeze and not self.aligner_pretrain_steps:
                raise UsageError("--aligner-freeze needs --aligner-pretrain-steps P (freeze it after pre-training)")
            if self.calibrate_lambda is not None and (self.calibrate_lambda <= 0 or not self.attention):
                raise UsageError("--calibrate-lambda takes a ratio > 0 and needs --attention")
            if not 0 < self.mass_threshold <= 1:
                raise UsageError(f"--mass-threshold must be in (0, 1], got {self.mass_threshold}")
            if self.calibration_batches < 1 or self.grad_ratio_steps < 0:
                raise UsageError("--calibration-batches must be >= 1 and --grad-ratio-steps >= 0")
            super().__post_init__()

        @property
        def uses_attention(self) -> bool:
            return bool(self.attention) and (self.lambda_att > 0 or self.calibrate_lambda is not None)

    TrainConfig.__module__ = __name__
    TrainConfig.__qualname__ = "TrainConfig"
    _TRAIN_CONFIG = TrainConfig
    return TrainConfig


def __getattr__(name: str) -> Any:  # PEP 562: ``lavender.config.TrainConfig`` without importing torch early
    if name == "TrainConfig":
        return _train_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warn_ignored_alignment(train: Any, align: AlignmentConfig) -> None:
    """Warn once when alignment options were set but the attention term will not run."""
    defaults = AlignmentConfig()
    changed = [f.name for f in dataclasses.fields(align) if getattr(align, f.name) != getattr(defaults, f.name)]
    if changed and not train.uses_attention:
        why = "no --attention was given" if not train.attention else "--lambda is 0"
        warnings.warn(f"{', '.join(flag_name(c) for c in changed)} will be ignored: {why}", stacklevel=2)


# --------------------------------------------------------------------------------- analysis and tools
@dataclass
class AnalyzeConfig(Checked):
    """Options of ``lavender analyze``; the alignment comes from the run folder unless given."""

    attention: str = opt(dataclasses.MISSING, "attention dataset (lavender extract)")
    out: str = opt(dataclasses.MISSING, "output folder")
    data: str | None = opt(None, "records the maps belong to (needed with --model)")
    model: str | None = opt(None, "a VLM or RUN_DIR whose attention is compared with the DM's")
    limit: int = opt(200, "records to analyse")
    figures: int = opt(8, "words shown in word_maps.png")
    batch_size: int = opt(8, "records per forward pass")

    def __post_init__(self) -> None:
        self.check_choices()
        if self.model and not self.data:
            raise UsageError("--model needs --data (the records the maps belong to)")
        if self.limit < 1 or self.batch_size < 1:
            raise UsageError("--limit and --batch-size must be >= 1")


@dataclass
class AttendConfig(Checked):
    """Options of ``lavender attend``: one image and text, the maps training would align."""

    model: str = opt(dataclasses.MISSING, "VLM folder, hub id or a `lavender train` RUN_DIR")
    image: str = opt(dataclasses.MISSING, "image file")
    text: str = opt(dataclasses.MISSING, "the text whose words get maps (the assistant's answer)")
    out: str = opt(dataclasses.MISSING, "output .npz")
    prompt: str = opt("", "the user's question before the answer (default: none)")
    png: str | None = opt(None, "also write a figure: the image and one overlay per word")
    frame: Frame = opt("squash", "the square frame the maps are drawn in (the attention dataset's frame)")
    normalize: Normalization = opt("minmax", "per-map normalisation of the saved maps")

    def __post_init__(self) -> None:
        self.check_choices()


@dataclass
class DemoConfig(Checked):
    """Options of ``lavender demo``: world v2, four arms over paired seeds (``quick`` shrinks it)."""

    out: str = opt("demo_out", "output folder (reused: finished runs are kept)")
    quick: bool = opt(False, "small sets, few steps (for tests; ≤ 3 min)")
    dm: str | None = opt(None, "world diffusion pipeline (default: the committed checkpoint)")
    vlm: str | None = opt(None, "world VLM (default: the committed Mllama checkpoint)")
    seeds: int = opt(3, "paired seeds 0..N-1 (every arm runs at each)")
    data_seed: int = opt(0, "seed of the scenes")
    p: float = opt(1.0, "probability that the decoy shares the answer attribute in training")
    n_train: int = opt(300, "fine-tuning records (quick: 64)")
    n_test: int = opt(300, "records of each test split, iid and shift (quick: 64)")
    n_analysis: int = opt(40, "shift-val records for the attention analysis and figures (quick: 16)")
    steps: int = opt(600, "fine-tuning steps of every arm (AR's recipe, chosen on iid-val; quick: 20)")
    batch_size: int = opt(16, "fine-tuning batch size")
    learning_rate: float = opt(1e-3, "fine-tuning learning rate (full fine-tuning)")
    ratio: float = opt(1.0, "‖λ∇L_att‖/‖∇L_VLM‖ that λ is calibrated to, the same for every attention arm")
    att_loss: AttLoss = opt("mass", "the one attention loss of every attention arm (mass: see docs/experiments.md)")
    teacher: Pairing = opt("phrase", "the DM teacher's target for an answer: the referent's whole phrase "
                           "(\"red circle\", read for binding: the DM's stage1_binding.yaml) or its answer "
                           "word alone (the DM's stage1.yaml)")
    threads: int = opt(2, "torch threads (fixed, so a seed gives the same numbers on any machine)")

    def __post_init__(self) -> None:
        self.check_choices()
        if self.quick:  # shrink what was left at its default (``--quick --steps 60`` keeps 60 steps)
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, small in (("n_train", 64), ("n_test", 64), ("n_analysis", 16), ("steps", 20)):
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, small)
        _positive(seeds=self.seeds, n_train=self.n_train, n_test=self.n_test, n_analysis=self.n_analysis,
                  steps=self.steps, batch_size=self.batch_size, threads=self.threads)
        if not 0.0 <= self.p <= 1.0:
            raise UsageError(f"--p {self.p}: a probability in [0, 1]")
        if self.ratio <= 0:
            raise UsageError(f"--ratio must be > 0, got {self.ratio}")


# --------------------------------------------------------------------------------- the parser
def _flag_view(dtype: type) -> type:
    """``dtype`` as HfArgumentParser should see it: its ``positional`` markers (ours, not argparse's)
    removed from the field metadata. Only configs that have positional fields get a copy."""
    fields = [f for f in dataclasses.fields(dtype) if f.init]
    if not any(f.metadata.get("positional") for f in fields):
        return dtype
    hints = typing.get_type_hints(dtype)
    specs = []
    for f in fields:
        kw: dict[str, Any] = {"metadata": {k: v for k, v in f.metadata.items() if k != "positional"}}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        specs.append((f.name, hints[f.name], field(**kw)))
    return dataclasses.make_dataclass(dtype.__name__, specs, kw_only=True)


class LavenderParser:
    """Flags + ``--config FILE.yaml`` → dataclass instances, validated before anything loads.

    Precedence, lowest first: the dataclass defaults, ``defaults`` (e.g. a run folder's saved
    alignment), the YAML file, the flags.
    """

    def __init__(self, dataclass_types: Sequence[type], prog: str, description: str | None = None) -> None:
        self.dataclass_types = list(dataclass_types)
        self.prog = prog
        from transformers import HfArgumentParser

        self.parser = HfArgumentParser([_flag_view(d) for d in self.dataclass_types], prog=prog,
                                       description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        # fields marked ``positional`` (``lavender inspect ATTN_DIR``) are also accepted bare, in order;
        # their ``--name`` flag and YAML key keep working
        self.positionals: list[tuple[argparse.Action, bool, bool]] = []  # (action, takes many, required)
        for dtype in self.dataclass_types:
            for f in dataclasses.fields(dtype):
                if f.metadata.get("positional"):
                    action = self.parser._option_string_actions[f"--{f.name}"]
                    action.required = False
                    action.metavar = f.metadata.get("metavar", f.name.upper())
                    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                    self.positionals.append((action, action.nargs in ("+", "*"), required))
        if self.positionals:
            names = " ".join(a.metavar + (" ..." if many else "") for a, many, _ in self.positionals)
            self.parser.usage = f"{prog} [options] {names}"
        for dtype in self.dataclass_types:
            for flags, kwargs in getattr(dtype, "extra_flags", ()):
                self.parser.add_argument(*flags, **kwargs)
        self.parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
        if "--debug" not in self.parser._option_string_actions:  # TrainingArguments has its own --debug
            self.parser.add_argument("--debug", action="store_true",
                                     help="show Python tracebacks of errors (also: LAVENDER_DEBUG=1)")
        self._initial = {id(a): (a.default, a.required) for a in self.parser._actions}

    # -- the vocabulary -------------------------------------------------------------------------
    def _action_for(self, key: str) -> argparse.Action | None:
        key = str(key)
        for spelling in (f"--{key}", f"--{key.replace('-', '_')}", f"--{key.replace('_', '-')}"):
            action = self.parser._option_string_actions.get(spelling)
            if action is not None:
                return action
        return None

    def dict_to_defaults(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Map option names (any spelling or alias) to dataclass fields; unknown keys raise."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            action = self._action_for(key)
            if action is None or action.dest in ("help", "config", "debug"):
                raise UsageError(f"{source}: unknown option {key!r} for {self.prog} (see {self.prog} --help)")
            is_bool = isinstance(action, (argparse._StoreFalseAction, argparse._StoreTrueAction)) or \
                getattr(action.type, "__name__", "") == "string_to_bool"
            if is_bool and value is not None and not isinstance(value, bool):
                raise UsageError(f"{source}: option {key!r} takes true or false, got {value!r}")
            if isinstance(action, argparse._StoreFalseAction):
                value = not value  # ``full: true`` → lora = False; ``no_progress: true`` → progress = False
            if action.choices is not None and value is not None and not isinstance(value, list) \
                    and value not in action.choices:
                raise UsageError(f"{source}: {key} {value!r}: choose one of {', '.join(map(str, action.choices))}")
            out[action.dest] = value
        return out

    def read_yaml(self, path: str) -> dict[str, Any]:
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config {path}: a config file must be a mapping of option names to values")
        return self.dict_to_defaults(data, path)

    # -- parsing --------------------------------------------------------------------------------
    def parse(self, argv: Sequence[str], defaults: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
              ) -> tuple[Any, ...]:
        """Parse ``argv``; ``defaults(namespace)`` may add defaults seen only after a first parse."""
        argv = list(argv)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv)
        file_values = self.read_yaml(known.config) if known.config else {}
        namespace = self._parse_with(argv, file_values)
        if defaults is not None:
            extra = defaults(namespace)
            if extra:
                given = self._given_on_command_line(argv)
                merged = {k: v for k, v in extra.items() if k not in given and k not in file_values}
                namespace = self._parse_with(argv, {**merged, **file_values})
        return self.build(vars(namespace))

    def _parse_with(self, argv: Sequence[str], values: dict[str, Any]) -> argparse.Namespace:
        for action in self.parser._actions:  # each parse starts from the dataclass defaults
            action.default, action.required = self._initial[id(action)]
            if action.dest in values:
                action.required = False
                action.default = values[action.dest]
        if not self.positionals:
            return self.parser.parse_args(argv)
        namespace, rest = self.parser.parse_known_args(argv)
        flags = [t for t in rest if t.startswith("-")]
        if flags:
            self.parser.error(f"unrecognized arguments: {' '.join(flags)}")
        for action, many, required in self.positionals:
            if rest:
                value, rest = (rest, []) if many else (rest[0], rest[1:])
                setattr(namespace, action.dest, [action.type(v) for v in value] if many else action.type(value))
            elif required and action.dest not in values and getattr(namespace, action.dest, None) in (None, []):
                self.parser.error(f"the following arguments are required: {action.metavar}")
        if rest:
            self.parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return namespace

    def _given_on_command_line(self, argv: Sequence[str]) -> set[str]:
        given = set()
        for token in argv:
            if token.startswith("--"):
                action = self.parser._option_string_actions.get(token.split("=", 1)[0])
                if action is not None:
                    given.add(action.dest)
        return given

    def build(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """Instantiate each dataclass from ``values`` (unknown keys ignored; errors are usage errors)."""
        out = []
        for dtype in self.dataclass_types:
            names = {f.name for f in dataclasses.fields(dtype) if f.init}
            kwargs = {k: v for k, v in values.items() if k in names}
            try:
                out.append(dtype(**kwargs))
            except UsageError:
                raise
            except (ValueError, TypeError) as e:
                raise UsageError(str(e)) from e
        return tuple(out)

    def error(self, message: str) -> typing.NoReturn:
        self.parser.error(message)


def config_from_file(dtype: type, path: str, **overrides: Any) -> Any:
    """One config from a YAML override file (same vocabulary as the flags), then keyword overrides.

    The demo reads the world DM's recommended Stage-1 settings this way (``stage1.yaml`` beside
    the checkpoint), exactly as ``lavender extract --config stage1.yaml`` would.
    """
    parser = LavenderParser([dtype], prog=f"config {os.path.basename(path)}")
    values = parser.read_yaml(path)
    values.update(overrides)
    return parser.build(values)[0]


# --------------------------------------------------------------------------------- running a command
def debug_requested(argv: Sequence[str]) -> bool:
    """``lavender --debug CMD``, ``CMD --debug`` (not ``train``: TrainingArguments owns that flag) or the env."""
    return "--debug" in argv or os.environ.get("LAVENDER_DEBUG", "") not in ("", "0")


def report_error(prog: str, exc: BaseException, debug: bool) -> int:
    """Print ``<prog>: error: <message>`` (one line; a traceback only when debugging); the exit code."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) and exc.filename \
            and str(exc.filename) not in message:
        message = f"{exc.filename}: {message}"
    if not isinstance(exc, LavenderError) and not debug:
        message += " (--debug for the traceback)"
    print(f"{prog}: error: {message}", file=sys.stderr)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return 2  # a path the user gave does not exist: a usage error, as argparse would say
    return getattr(exc, "exit_code", 1)


# --------------------------------------------------------------------------------- tools
Metric = Literal["vqa", "anls", "relaxed", "mc", "yesno", "exact", "contains", "cider"]
METRIC_NAMES: tuple[str, ...] = typing.get_args(Metric)
DMArchitecture = Literal["tiny", "sd14", "sdxl", "sdxl-base", "sd3", "sd3-medium", "flux", "flux-dev"]


def _check_family(name: str) -> None:
    """Family names come from the registry (a registered plugin family is valid too)."""
    from lavender.vlm.families import families

    if name not in families():
        raise UsageError(f"--arch {name!r}: choose one of {', '.join(sorted(families()))}")


def _positive(**values: int | float | None) -> None:
    bad = [k for k, v in values.items() if v is not None and v < 1]
    if bad:
        raise UsageError(", ".join(f"{flag_name(k)} must be >= 1, got {values[k]}" for k in bad))


@dataclass
class InspectConfig(Checked):
    """Options of ``lavender inspect``: counts and checks of an attention dataset."""

    attn_dir: str = opt(dataclasses.MISSING, "attention dataset folder", positional=True, metavar="ATTN_DIR")
    json: bool = opt(False, "print one JSON object")
    errors: int = opt(5, "show the first N bad records")

    def __post_init__(self) -> None:
        self.check_choices()


@dataclass
class TinyDMConfig(Checked):
    """Options of ``lavender tiny-dm``: a random Stable Diffusion pipeline, built offline."""

    out: str = opt(dataclasses.MISSING, "folder to write the pipeline to", positional=True, metavar="OUT")
    seed: int = opt(0, "weight initialisation seed")
    image_size: int = opt(64, "image side in px, tiny only (64: cross-attention maps of side 32, 16)")
    architecture: DMArchitecture = opt("tiny", "tiny (SD-1.x layout), sdxl, sd3 or flux (tiny layouts of those); "
                                       "sd14 / sdxl-base / sd3-medium / flux-dev: the real models' layer sizes, "
                                       "random 16-bit weights")

    def __post_init__(self) -> None:
        self.check_choices()
        _positive(image_size=self.image_size)


@dataclass
class TinyVLMConfig(Checked):
    """Options of ``lavender tiny-vlm``: a tiny random VLM of a supported family and its processor."""

    arch: str = opt(dataclasses.MISSING, "model family to build (mllama, llava, qwen2_vl, idefics3, …)")
    out: str = opt(dataclasses.MISSING, "output folder (created; existing files are overwritten)", positional=True,
                   metavar="OUT")
    seed: int = opt(0, "seed of the random weights")
    real_format: bool = opt(False, "use a tokenizer and chat template that speak the family's RELEASED format "
                            "(lavender.vlm.formats) instead of the simple word-level one")

    def __post_init__(self) -> None:
        self.check_choices()
        _check_family(self.arch)


@dataclass
class ExportConfig(Checked):
    """Options of ``lavender export``: a run folder as a plain Hugging Face model folder."""

    run_dir: str = opt(dataclasses.MISSING, "a `lavender train` RUN_DIR (LoRA adapter or full model)",
                       positional=True, metavar="RUN_DIR")
    out: str = opt(dataclasses.MISSING, "output folder")
    merge: bool = opt(False, "merge the LoRA adapter into the base weights")

    def __post_init__(self) -> None:
        self.check_choices()


@dataclass
class GenerateConfig(Checked):
    """Options of ``lavender generate``: one image and prompt, or every record of a file."""

    model: str = opt(dataclasses.MISSING, "model folder / hub id, or a `lavender train` RUN_DIR")
    image: str | None = opt(None, "one image (with --prompt)")
    prompt: str | None = opt(None, "the question for --image")
    data: str | None = opt(None, "records (JSONL): answer each record's last user turn")
    out: str | None = opt(None, "with --data: write one JSON line per record (id, prediction)")
    images_root: str | None = opt(None, "folder record image paths are relative to")
    max_new_tokens: int = opt(32, "tokens generated per answer at most")
    batch_size: int = opt(8, "prompts per generate() call")
    device: str = opt("cpu", "cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        self.check_choices()
        if bool(self.image) == bool(self.data):
            raise UsageError("give either --image with --prompt, or --data")
        if self.image and not self.prompt:
            raise UsageError("--image needs --prompt")
        _positive(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


@dataclass
class EvalConfig(Checked):
    """Options of ``lavender eval``: answer records and score the answers."""

    model: str = opt(dataclasses.MISSING, "model folder / hub id, or a RUN_DIR")
    data: str = opt(dataclasses.MISSING, "records (JSONL) with answers")
    out: str = opt(dataclasses.MISSING, "output folder")
    metric: Metric | None = opt(None, "metric for records without a 'metric' field: " + ", ".join(METRIC_NAMES))
    limit: int | None = opt(None, "score only the first N usable records (smoke runs)")
    batch_size: int = opt(16, "prompts per generate() call")
    max_new_tokens: int = opt(16, "tokens generated per answer at most")
    images_root: str | None = opt(None, "folder record image paths are relative to")
    device: str = opt("cpu", "cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        self.check_choices()
        _positive(limit=self.limit, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)


# --------------------------------------------------------------------------------- data
Converter = Literal["flickr30k", "captions", "rlaif-v", "ocrvqa", "llava", "sharegpt", "vqav2", "docvqa",
                    "chartqa", "mmbench", "pope", "authors-attention"]
CONVERTER_NAMES: tuple[str, ...] = typing.get_args(Converter)


@dataclass
class ConvertConfig(Checked):
    """Options of ``lavender data convert``: a public dataset or benchmark file → records JSONL."""

    fmt: Converter = opt(dataclasses.MISSING, "source format: " + ", ".join(CONVERTER_NAMES), aliases=["--from"])
    inputs: list[str] = opt(dataclasses.MISSING, "input file(s) or folder(s) of shards; vqav2 takes questions AND "
                            "annotations", aliases=["--in"], metavar="PATH")
    out: str = opt(dataclasses.MISSING, "output records file", metavar="RECORDS.jsonl")
    images_root: str | None = opt(None, "folder the source's image names are relative to (default: the input's)",
                                  metavar="DIR")
    image_dir: str | None = opt(None, "where embedded images are written (default: <out stem>_images next to --out)",
                                metavar="DIR")
    prompt: str | None = opt(None, "user prompt for captioning/benchmark formats; {question} and {options} are "
                             "filled in")
    split: str | None = opt(None, "Karpathy files only: keep this split (train, val, test, restval)")
    attention_out: str | None = opt(None, "authors-attention only: the attention dataset to build from the "
                                    "per-word maps", metavar="ATTN_DIR")
    strict: bool = opt(False, "stop at the first bad row instead of skipping it")

    def __post_init__(self) -> None:
        self.check_choices()


@dataclass
class MixConfig(Checked):
    """Options of ``lavender data mix``: sample several record files into one, by ratio.

    Without ``--total``, ``A.jsonl:0.5`` takes half of A (a ratio > 1 up-samples); with
    ``--total N`` the ratios are weights of N records.
    """

    sources: list[str] = opt(dataclasses.MISSING, "record files, each optionally :RATIO", positional=True,
                             metavar="RECORDS.jsonl[:RATIO]")
    out: str = opt(dataclasses.MISSING, "the mixture", metavar="MIX.jsonl")
    seed: int = opt(0, "sampling seed")
    total: int | None = opt(None, "exact size of the mixture; ratios become relative weights")

    def __post_init__(self) -> None:
        self.check_choices()
        if not self.sources:
            raise UsageError("give at least one RECORDS.jsonl[:RATIO]")
        _positive(total=self.total)


@dataclass
class SplitConfig(Checked):
    """Options of ``lavender data split``: train/val by image (records sharing an image stay together)."""

    data: str = opt(dataclasses.MISSING, "records to split", metavar="RECORDS.jsonl")
    val: float = opt(dataclasses.MISSING, "fraction of images (image groups) for validation", metavar="FRACTION")
    out: str = opt(dataclasses.MISSING, "folder for train.jsonl and val.jsonl", metavar="DIR")
    seed: int = opt(0, "split seed")

    def __post_init__(self) -> None:
        self.check_choices()


@dataclass
class AttentionIOConfig(Checked):
    """Options of ``lavender data attention-export|attention-import``: an attention dataset to/from a
    parquet folder with typed columns (docs/stage1.md, "Hub-ready attention datasets")."""

    src: str = opt(dataclasses.MISSING, "attention dataset folder (export) or parquet folder (import)",
                   positional=True, metavar="SRC")
    out: str = opt(dataclasses.MISSING, "parquet folder (export) or attention dataset folder (import)", metavar="DIR")

    def __post_init__(self) -> None:
        self.check_choices()


# --------------------------------------------------------------------------------- world
WorldSplit = Literal["train", "validation", "test", "ood", "ood_combo", "ood_template",
                     "iid-val", "shift-val", "iid", "shift", "combo"]
WorldVersion = Literal["v1", "v2"]
V1_SPLITS = ("train", "validation", "test", "ood", "ood_combo", "ood_template")
V2_SPLITS = ("train", "iid-val", "shift-val", "iid", "shift", "combo")
WorldArch = Literal["mllama", "llava"]


@dataclass
class ScenesConfig(Checked):
    """Options of ``lavender world scenes``: VQA records (or caption rows) of one split."""

    out: str = opt(dataclasses.MISSING, "output folder (JSONL, images/, masks/)")
    n: int = opt(dataclasses.MISSING, "number of records (one scene each)")
    split: WorldSplit = opt("train", "v1: train/validation/test; ood = unseen colour–shape pairs AND templates; "
                            "ood_combo / ood_template = one shift each. v2: train, iid-val, shift-val, iid, "
                            "shift (decoy never shares the answer), combo (held-out referent pairs)")
    seed: int = opt(0, "seed; same seed → identical files")
    captions: bool = opt(False, "write caption rows {id, image, caption} to <split>_captions.jsonl instead")
    world: WorldVersion = opt("v1", "v1: five question kinds (docs/world.md); v2: referent/decoy questions "
                              "with explicit align_pairs (docs/world_v2.md)")
    p: float = opt(1.0, "v2: probability that the decoy shares the answer attribute (train, iid-val, iid, combo)")
    pair: Pairing = opt("word", "v2: pair the answer with the referent's answer word, or its whole phrase "
                        "(\"red circle\": the DM target is the mean of both words' maps)")
    binding: bool = opt(False, "v2: binding pressure — the decoy shares the referent's naming attribute and the "
                        "question names the referent's side too (\"the circle on the left\")")

    def __post_init__(self) -> None:
        self.check_choices()
        _positive(n=self.n)
        if self.binding and self.world != "v2":
            raise UsageError("--binding is a world-v2 option; add --world v2")
        allowed = V2_SPLITS if self.world == "v2" else V1_SPLITS
        if self.split not in allowed:
            raise UsageError(f"--split {self.split!r} is not a {self.world} split; choose one of {', '.join(allowed)}")
        if not 0.0 <= self.p <= 1.0:
            raise UsageError(f"--p {self.p}: a probability in [0, 1]")
        if self.world == "v2" and self.captions:
            raise UsageError("--captions writes v1 caption rows; drop --world v2 (v2 reuses v1's captions)")


@dataclass
class TrainDMConfig(Checked):
    """Options of ``lavender world train-dm``; a field left unset takes ``lavender.world.dm.DMConfig``'s
    default (one place for the recipe's numbers)."""

    out: str = opt(dataclasses.MISSING, "run folder (train_state.pt, train_info.json, pipeline/)")
    steps: int | None = opt(None, "UNet + text-encoder steps (default: DMConfig's, 3000)")
    vae_steps: int | None = opt(None, "VAE reconstruction steps, run first (default: DMConfig's)")
    batch_size: int | None = opt(None, "scenes per UNet step (default: DMConfig's)")
    vae_batch_size: int | None = opt(None, "scenes per VAE step (default: DMConfig's)")
    seed: int | None = opt(None, "seed of weights, data and noise (default: DMConfig's, 0)")
    lr: float | None = opt(None, "UNet/text-encoder peak learning rate (default: DMConfig's)")
    unet_channels: list[int] | None = opt(None, "UNet block widths; one level per entry (default: DMConfig's)")
    vae_channels: list[int] | None = opt(None, "VAE block widths; the latent side is 64 / 2^(len-1) (default: "
                                         "DMConfig's)")
    text_width: int | None = opt(None, "text encoder width (default: DMConfig's)")
    text_layers: int | None = opt(None, "text encoder layers; 0 = token + position embeddings only, so no token "
                                  "carries the rest of the caption (default: DMConfig's)")
    chunk_minutes: float | None = opt(None, "stop after this many minutes, saving state (continue with --resume)")
    resume: bool = opt(False, "continue the run saved in --out")
    threads: int = opt(2, "torch CPU threads")
    device: str = opt("cpu", "cpu (the recipe's budget is CPU time) or cuda; the batches are the same")

    def __post_init__(self) -> None:
        self.check_choices()
        if self.steps is not None and self.steps < 0:
            raise UsageError(f"--steps must be >= 0, got {self.steps}")
        _positive(vae_steps=self.vae_steps, batch_size=self.batch_size, vae_batch_size=self.vae_batch_size,
                  threads=self.threads)

    def overrides(self) -> dict[str, Any]:
        """The recipe fields the user set (for ``DMConfig(**overrides)``)."""
        names = ("steps", "vae_steps", "batch_size", "vae_batch_size", "seed", "lr", "unet_channels",
                 "vae_channels", "text_width", "text_layers")
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        for k in ("unet_channels", "vae_channels"):
            if k in out:
                out[k] = tuple(out[k])
        return out


@dataclass
class ScoreDMConfig(Checked):
    """Options of ``lavender world score-dm``: how well a DM's Stage-1 maps localise colour/shape words."""

    dm: str | None = opt(None, "pipeline folder (default: the committed world DM)")
    n: int = opt(100, "held-out scenes")
    seed: int = opt(1234, "scene seed")
    split: WorldSplit = opt("test", "scene split")
    out: str | None = opt(None, "write the result JSON here")
    threads: int = opt(2, "torch CPU threads")
    device: str = opt("cpu", "torch device")
    combine: list[str] = opt(help="also score layer combinations: short layer names joined by '+', e.g. "
                             "up_blocks.1.a0.attn2+up_blocks.0.a0.attn2", factory=list, metavar="L1+L2")
    timesteps: list[int] | None = opt(None, "score Stage 1's noise recipe at these timesteps (one pass each) "
                                      "instead of ddim")

    def __post_init__(self) -> None:
        self.check_choices()
        _positive(n=self.n, threads=self.threads)


@dataclass
class TrainVLMConfig(Checked):
    """Options of ``lavender world train-vlm`` (the defaults are ``lavender.world.vlm.Recipe``'s)."""

    out: str = opt(dataclasses.MISSING, "model folder (+ training_state/ until the run completes)")
    arch: WorldArch = opt("mllama", "architecture")
    steps: int | None = opt(None, "optimiser steps in total (default: the recipe's)")
    batch_size: int | None = opt(None, "scenes per step (default: the recipe's)")
    seed: int = opt(0, "seed of weights and data")
    lr: float | None = opt(None, "AdamW peak learning rate (default: the recipe's)")
    vqa_fraction: float | None = opt(None, "share of examples that are seen-template questions instead of "
                                     "captions (default: the recipe's, captions only)")
    save_every: int | None = opt(None, "steps between resumable checkpoints (default: the recipe's)")
    eval_every: int | None = opt(None, "steps between held-out evaluations (default: the recipe's)")
    tiny: bool = opt(False, "a unit-test-sized model (seconds, learns little)")
    chunk_minutes: float | None = opt(None, "stop after this many minutes, saving state (continue with --resume)")
    resume: bool = opt(False, "continue the run saved in --out")
    threads: int = opt(1, "torch CPU threads")

    def __post_init__(self) -> None:
        self.check_choices()
        _positive(steps=self.steps, batch_size=self.batch_size, threads=self.threads)
        if self.vqa_fraction is not None and not 0 <= self.vqa_fraction <= 1:
            raise UsageError(f"--vqa-fraction must be in [0, 1], got {self.vqa_fraction}")

    def overrides(self) -> dict[str, Any]:
        """The recipe fields the user set (for ``Recipe(**overrides)``)."""
        names = ("arch", "steps", "batch_size", "seed", "lr", "vqa_fraction", "save_every", "eval_every")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}
