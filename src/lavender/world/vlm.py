"""The world's VLM: a small Mllama (cross-attention) or LLaVA (self-attention) pre-trained on scenes.

Real Llama-3.2-Vision weights cannot be downloaded here, so the demo needs a VLM that has learnt to
SEE the miniature world before Stage 2 fine-tunes it. This module builds one of the real transformers
architectures at world size, pre-trains it from scratch on in-memory scenes (no disk I/O), saves it
with ``save_pretrained`` + the family's processor (so :func:`lavender.trainer.load_vlm` and
``AutoModelForImageTextToText`` load it like a hub checkpoint), and evaluates greedy VQA answers.

Sizes (see :class:`WorldVLMConfig`): a 64-px image is ONE tile of 8×8-px patches, an 8×8 grid of
image tokens. Objects are 14–28 px, so even a small one covers about 2×2 cells and every object has
at least one cell of its own colour; the 32×32 DM maps are pooled 4×4 onto it. A 16×16 grid (4-px
patches) quadruples the vision tower's tokens (and 16× its attention cost) for no gain in telling
objects apart at this density (≤ 4 objects, ≥ 2 px apart).

What pre-training sees (docs/world_vlm.md): every step draws a fresh batch of train-split scenes
from ``numpy.random.default_rng([seed, 0x564C4D, step])`` — a stream disjoint from the written
records (``record_rng`` seeds with four numbers) — and trains on ``"<image>Describe the image."`` →
its caption, the caption rows' shape. With ``vqa_fraction > 0`` that share of each batch instead
asks one question of the SEEN templates about the scene (the OOD paraphrases are never used).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

ARCHS = ("mllama", "llava")
_DATA_STREAM = 0x564C4D  # "VLM": the pre-training stream's tag in the seed sequence
_EVAL_STREAM = 0x564C45  # held-out caption scenes for token accuracy
STATE_DIR = "training_state"  # resumable state inside OUT; removed when the run completes
METRICS = "pretrain_metrics.jsonl"
RECIPE = "pretrain_recipe.json"


@dataclass(frozen=True)
class WorldVLMConfig:
    """Shape of the world VLM. Defaults: 2.4 M parameters, ~0.55 CPU-seconds per 32-scene Mllama step.

    Attributes:
        patch_size: pixels per patch side; 64 / patch_size image tokens per side (8 → an 8×8 grid).
        vision_hidden, vision_layers: the vision tower (Mllama: ``vision_layers`` local layers plus
            ``vision_global_layers`` gated global ones; LLaVA: a CLIP encoder of that depth).
        text_hidden, text_layers, heads, kv_heads: the Llama text model.
        cross_layers: Mllama's cross-attention layers (indices into ``text_layers``; they replace
            self-attention there, as in Llama-3.2-Vision). Unused by LLaVA.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_global_layers: int = 1
    text_hidden: int = 160
    text_layers: int = 6
    cross_layers: tuple[int, ...] = (1, 4)
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: int = 3


def _tokenizer(image_token: str, specials: Sequence[str]) -> Any:
    """The tiny word-level tokenizer with every world word (and the caption prompt's) kept whole."""
    from lavender.records import CAPTION_PROMPT
    from lavender.vlm.tiny import build_tokenizer, simple_chat_template
    from lavender.words import split_words
    from lavender.world.questions import vocabulary

    words = [*vocabulary(), *(w.text.lower() for w in split_words(CAPTION_PROMPT))]
    return build_tokenizer(list(specials), simple_chat_template(image_token),
                           extra_words=[w for w in words if w.isalnum()])


def build_world_vlm(arch: str = "mllama", config: WorldVLMConfig | None = None, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised world VLM and its processor: ``(model, processor)``.

    Built offline (no hub): the family's real transformers classes with the world's tokenizer.
    """
    cfg = config or WorldVLMConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"patch_size={cfg.patch_size} must divide image_size={cfg.image_size}")
    if arch == "mllama":
        return _build_mllama(cfg, seed)
    if arch == "llava":
        return _build_llava(cfg, seed)
    raise ValueError(f"unknown arch {arch!r}; the world VLM is one of {ARCHS}")


def _build_mllama(cfg: WorldVLMConfig, seed: int) -> tuple[Any, Any]:
    from lavender.vlm.families import families
    from lavender.vlm.tiny import TinySizes

    # transformers' Mllama requires max_num_tiles = 4 and pads every image to 4 tiles, so a 64-px
    # image is cut into 2×2 tiles of 32 px (no resize, no padding tile): 4 × (4×4 patches + CLS)
    sizes = TinySizes(image_size=cfg.image_size // 2, patch_size=cfg.patch_size, vision_hidden=cfg.vision_hidden,
                      vision_layers=cfg.vision_layers, vision_global_layers=cfg.vision_global_layers,
                      vision_heads=cfg.heads, vision_mlp=cfg.mlp_ratio * cfg.vision_hidden,
                      vision_intermediate=tuple(range(0, cfg.vision_layers, 2)), text_hidden=cfg.text_hidden,
                      text_layers=cfg.text_layers, text_heads=cfg.heads, kv_heads=cfg.kv_heads,
                      text_mlp=cfg.mlp_ratio * cfg.text_hidden, cross_layers=tuple(cfg.cross_layers),
                      max_positions=256)
    model, processor = families()["mllama"].build_tiny(
        sizes, tokenizer=_tokenizer("<|image|>", ["<|image|>", "<|python_tag|>"]), seed=seed)
    open_gates(model)
    return model, processor


GATE_INIT = 1.0  # tanh(1) ≈ 0.76: the image pathway is mostly open from step 0


@torch.no_grad()
def open_gates(model: Any, value: float = GATE_INIT) -> list[str]:
    """Set Mllama's scalar tanh gates (cross-attention, tile embeddings, global vision layers) to ``value``.

    Llama-3.2-Vision initialises them at 0 because it grafts vision onto a TRAINED language model
    that must be unchanged at step 0. Trained from scratch there is nothing to protect, and closed
    gates starve the image pathway: with them at 0, after 250 steps the cross-attention gates were
    still ≈ 0.02–0.06 and held-out caption token accuracy sat at 0.72 (the blind model's plateau);
    the tile-embedding gates at 0 also hide WHICH of the 2×2 tiles a patch is in. Returns the names set.
    """
    names = []
    for name, p in model.named_parameters():
        if p.numel() == 1 and name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate",
                                                          "cross_attn_mlp_gate"):
            if name.endswith("gated_positional_embedding.gate"):
                continue  # (1 - tanh(gate)) weighs the per-patch positions: keep them fully on
            p.fill_(value)
            names.append(name)
    return names


def _build_llava(cfg: WorldVLMConfig, seed: int) -> tuple[Any, Any]:
    from lavender.vlm.families import families
    from lavender.vlm.tiny import TinySizes

    # +1 vision layer: LLaVA reads the penultimate one, so the last is unused
    sizes = TinySizes(image_size=cfg.image_size, patch_size=cfg.patch_size, vision_hidden=cfg.vision_hidden,
                      vision_layers=cfg.vision_layers + 1, vision_heads=cfg.heads,
                      vision_mlp=cfg.mlp_ratio * cfg.vision_hidden, text_hidden=cfg.text_hidden,
                      text_layers=cfg.text_layers, text_heads=cfg.heads, kv_heads=cfg.kv_heads,
                      text_mlp=cfg.mlp_ratio * cfg.text_hidden, max_positions=256)
    return families()["llava"].build_tiny(sizes, tokenizer=_tokenizer("<image>", ["<image>"]), seed=seed)


# --- pre-training data ------------------------------------------------------------------------------
def pretrain_examples(rng: np.random.Generator, n: int, vqa_fraction: float = 0.0) -> tuple[list[Any], list[list[dict]]]:
    """``n`` train-split scenes as ``(PIL images, chat messages)``: captions, or a seen-template question.

    A caption example is the caption row's shape (``"<image>" + CAPTION_PROMPT`` → caption). With
    probability ``vqa_fraction`` an example asks one question of a random kind with a SEEN template
    instead; a scene that cannot support the kind falls back to its caption.
    """
    from PIL import Image

    from lavender.records import CAPTION_PROMPT, IMAGE_TAG
    from lavender.world.questions import KINDS, make_question
    from lavender.world.scenes import make_scene

    images, conversations = [], []
    for _ in range(n):
        scene = make_scene(rng, "train")
        prompt, answer = CAPTION_PROMPT, scene.caption
        if vqa_fraction > 0 and rng.random() < vqa_fraction:
            q = make_question(rng, KINDS[int(rng.integers(len(KINDS)))], scene.objects, False, False)
            if q is not None:
                prompt, answer = q.text, q.answer
        images.append(Image.fromarray(scene.image, mode="RGB"))
        conversations.append([{"role": "user", "content": IMAGE_TAG + prompt},
                              {"role": "assistant", "content": answer}])
    return images, conversations


def encode(processor: Any, images: Sequence[Any], conversations: Sequence[list[dict]]) -> dict[str, torch.Tensor]:
    """Processor inputs plus assistant-only ``labels``: the same layout and labels Stage 2 trains with.

    Uses :mod:`lavender.chat` (as :class:`lavender.data_collator.LavenderCollator` does), so what the
    model is pre-trained to continue is exactly the prompt ``lavender train`` and generation show it.
    Right padding (the tokenizer's default).
    """
    from lavender.chat import adds_special_tokens, label_positions, labels_for_batch, layout

    lays = [layout(processor, m) for m in conversations]
    batch = processor(text=[lay.text for lay in lays], images=[[im] for im in images], padding=True,
                      return_tensors="pt", add_special_tokens=adds_special_tokens(processor.tokenizer, lays[0].text))
    lengths = batch["attention_mask"].sum(1).tolist()
    for b, (lay, n) in enumerate(zip(lays, lengths)):
        lay.align_to(batch["input_ids"][b, :n].tolist())  # image-token expansion (LLaVA); right padding
    batch["labels"] = labels_for_batch(batch["input_ids"], [label_positions(lay) for lay in lays])
    return dict(batch)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` argmax next-token predictions over labelled positions (shifted by one)."""
    pred = logits[:, :-1].argmax(-1)  # (B, T-1): prediction for position t+1
    gold = labels[:, 1:]
    keep = gold != -100
    return int((pred[keep] == gold[keep]).sum()), int(keep.sum())


# --- the recipe -------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """Everything that determines a pre-training run (saved as ``OUT/pretrain_recipe.json``).

    Attributes:
        steps: optimiser steps in total (a resumed run continues to this number).
        batch_size: scenes per step (fresh ones every step: the world is unlimited, nothing repeats).
        lr, warmup, min_lr_ratio: AdamW peak rate, linear warm-up steps, cosine floor (× lr).
        vqa_fraction: share of examples that are seen-template questions instead of captions.
        save_every: steps between resumable checkpoints; eval_every: steps between held-out evals.
        eval_n: held-out caption scenes (validation split, own seed stream) for token accuracy.
    """

    arch: str = "mllama"
    seed: int = 0
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vqa_fraction: float = 0.0
    save_every: int = 50
    eval_every: int = 250
    eval_n: int = 128
    model: WorldVLMConfig = field(default_factory=WorldVLMConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"]["cross_layers"] = list(self.model.cross_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = dict(d)
        m = dict(d.pop("model"))
        m["cross_layers"] = tuple(m["cross_layers"])
        return cls(**d, model=WorldVLMConfig(**m))


#: A unit-test-sized model: seconds per hundred steps.
TINY = WorldVLMConfig(patch_size=16, vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=3,
                      cross_layers=(1,), heads=2, kv_heads=1, mlp_ratio=2)


def _lr_lambda(r: Recipe) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < r.warmup:
            return (step + 1) / r.warmup
        t = (step - r.warmup) / max(1, r.steps - r.warmup)
        return r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def heldout_caption_batch(r: Recipe, processor: Any) -> dict[str, torch.Tensor]:
    """The fixed held-out caption batch: validation-split scenes of the recipe's own eval stream."""
    from PIL import Image

    from lavender.records import CAPTION_PROMPT, IMAGE_TAG
    from lavender.world.scenes import sample_batch

    b = sample_batch(np.random.default_rng([r.seed, _EVAL_STREAM]), r.eval_n, split="validation")
    convs = [[{"role": "user", "content": IMAGE_TAG + CAPTION_PROMPT}, {"role": "assistant", "content": c}]
             for c in b.captions]
    return encode(processor, [Image.fromarray(im) for im in b.images], convs)


@torch.no_grad()
def caption_token_accuracy(model: Any, batch: dict[str, torch.Tensor], chunk: int = 64) -> float:
    """Teacher-forced next-token accuracy on a caption batch's labelled (caption + EOS) tokens."""
    was = model.training
    model.eval()
    correct = total = 0
    n = batch["input_ids"].shape[0]
    for s in range(0, n, chunk):
        part = {k: v[s:s + chunk] for k, v in batch.items()}
        labels = part.pop("labels")
        c, t = token_accuracy(model(**part).logits, labels)
        correct, total = correct + c, total + t
    model.train(was)
    return correct / max(total, 1)


def _save_state(out: str, model: Any, opt: Any, sched: Any, step: int, r: Recipe) -> None:
    """Resumable state, written atomically (a killed job never leaves a torn file)."""
    d = os.path.join(out, STATE_DIR)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "state.pt.tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "recipe": r.to_dict()}, tmp)
    os.replace(tmp, os.path.join(d, "state.pt"))


def _save_model(out: str, model: Any, processor: Any) -> None:
    from lavender.vlm.tiny import save_tiny

    was = model.training
    save_tiny(model, processor, out)  # eval mode, generation ids set, save_pretrained for both
    model.train(was)


def _log(out: str, row: dict) -> None:
    with open(os.path.join(out, METRICS), "a") as f:
        f.write(json.dumps(row) + "\n")


def train_vlm(out: str, recipe: Recipe, resume: bool = False, max_minutes: float | None = None,
              progress: Callable[[str], None] = print) -> dict:
    """Pre-train a world VLM into ``out``; returns ``{"step", "done", "caption_token_accuracy", ...}``.

    Resumable: state (weights, optimiser, schedule, step) is saved every ``save_every`` steps and
    when ``max_minutes`` runs out; ``resume=True`` continues from it. Batches are drawn from
    ``default_rng([seed, stream, step])``, so a resumed run sees exactly the batches an uninterrupted
    one would. When all ``steps`` are done the folder holds the final model + processor
    (``save_pretrained``) and the resumable state is deleted (nothing big left to commit).
    """
    t0, cpu0 = time.monotonic(), time.process_time()
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, STATE_DIR, "state.pt")
    state = None
    if os.path.exists(state_path):
        if not resume:
            raise FileExistsError(f"{out} holds an unfinished run ({state_path}); pass --resume to continue it "
                                  "or choose another --out")
        from lavender.world.write import load_state

        state = load_state(state_path)
        saved = Recipe.from_dict(state["recipe"])
        if saved != recipe:
            diff = {k: (v, getattr(recipe, k)) for k, v in vars(saved).items() if getattr(recipe, k) != v}
            raise ValueError(f"--resume with a different recipe than the saved run's: {diff} (saved, given)")
    elif resume and os.path.exists(os.path.join(out, RECIPE)):
        progress(f"{out}: run already complete (no {STATE_DIR}/); nothing to resume")
        with open(os.path.join(out, RECIPE)) as f:
            return {**json.load(f).get("result", {}), "done": True}
    model, processor = build_world_vlm(recipe.arch, recipe.model, recipe.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        progress(f"resuming {out} at step {step}/{recipe.steps}")
    else:
        with open(os.path.join(out, METRICS), "w"):
            pass
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"world VLM ({recipe.arch}, {n_params / 1e6:.2f} M parameters): {recipe.steps} steps of "
             f"{recipe.batch_size} scenes, seed {recipe.seed}")
    heldout = heldout_caption_batch(recipe, processor)
    acc_sum = loss_sum = 0.0
    n_win, t_win = 0, time.monotonic()
    stopped = False
    while step < recipe.steps:
        rng = np.random.default_rng([recipe.seed, _DATA_STREAM, step])
        batch = encode(processor, *pretrain_examples(rng, recipe.batch_size, recipe.vqa_fraction))
        out_ = model(**batch)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        c, t = token_accuracy(out_.logits.detach(), batch["labels"])
        loss_sum, acc_sum, n_win = loss_sum + float(out_.loss.detach()), acc_sum + c / max(t, 1), n_win + 1
        row: dict[str, Any] = {}
        if step % 10 == 0 or step == recipe.steps:
            dt = (time.monotonic() - t_win) / n_win
            row = {"step": step, "loss": loss_sum / n_win, "train_token_acc": acc_sum / n_win,
                   "lr": sched.get_last_lr()[0], "s_per_step": dt}
            acc_sum = loss_sum = 0.0
            n_win, t_win = 0, time.monotonic()
        if step % recipe.eval_every == 0 or step == recipe.steps:
            row = {**row, "step": step, "heldout_token_acc": caption_token_accuracy(model, heldout)}
        if row:
            _log(out, row)
            eta = (recipe.steps - step) * row.get("s_per_step", 0.0) / 60
            progress(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                     + (f" eta {eta:.1f} min" if "s_per_step" in row else ""))
        timeout = max_minutes is not None and (time.monotonic() - t0) / 60 >= max_minutes
        if step % recipe.save_every == 0 or timeout:
            _save_state(out, model, opt, sched, step, recipe)
        if timeout and step < recipe.steps:
            stopped = True
            break
    _save_model(out, model, processor)
    result = {"step": step, "done": not stopped, "parameters": n_params,
              "minutes_this_chunk": (time.monotonic() - t0) / 60,
              "cpu_minutes_this_chunk": (time.process_time() - cpu0) / 60}
    if stopped:
        progress(f"stopped after {max_minutes} min at step {step}/{recipe.steps}; continue with --resume")
        return result
    result["caption_token_accuracy"] = caption_token_accuracy(model, heldout)
    with open(os.path.join(out, RECIPE), "w") as f:
        json.dump({"recipe": recipe.to_dict(), "result": result}, f, indent=2)
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)
    progress(f"done: {step} steps; held-out caption token accuracy {result['caption_token_accuracy']:.3f}; "
             f"model and processor saved to {out}")
    return result
