"""The miniature world's text-to-image diffusion model: a real diffusers Stable Diffusion pipeline,
trained from scratch on scene captions, and the score that says whether its Stage-1 maps localise.

Why these sizes (docs/world_dm.md has the measurements):

- 64×64 scenes → a trained ``AutoencoderKL`` that downsamples by 4 → a 4×16×16 latent. A 32×32 latent
  made every UNet step ~4× dearer on the 2-core CPU (2.5–5 s vs ~1.3 s at batch 16), i.e. a quarter of
  the training steps in the same budget, and the feasibility probe found the 16×16 layers localise
  best anyway. A VAE is kept (rather than pixel space) because Stage 1 runs ``vae.encode`` like SD.
- UNet: two levels (64, 96 channels), cross-attention at **16×16** (down block 0, up block 1) and
  **8×8** (down block 1, the mid block, up block 0). So ``lavender extract --resolutions`` chooses
  from {16, 8} for this DM (not SD's default {16, 32}, which does not exist here).
- Text: a ``CLIPTextModel`` with **no transformer layers** (token + position embeddings and the final
  layer norm), trained jointly with the UNet, over a CLIP BPE tokenizer whose merges make every world
  word one token. With 2 causal layers (the first recipe) the word maps stayed near uniform from 1,000
  to 4,800 steps; our reading is that every padding token held the whole caption, so the UNet could
  read it from them. With no layers, a token holds only its own word, and the measured maps localise.
- Training conditions exactly as Stage 1 encodes (77 tokens padded with EOS, no attention mask), so
  the maps Stage 1 reads come from the regime the model was trained in; captions are dropped 10% of
  the time so the null text means something (the ``nulltext`` recipe's guidance).
- Two to four objects per training scene: with several objects the UNet must bind each word to one
  object, which is what per-word localisation needs.

Training is two phases in one resumable loop: ``vae_steps`` of VAE reconstruction, then ``steps`` of
ε-prediction for UNet + text encoder. Every chunk saves ``train_state.pt`` (weights, optimiser, step,
loss log) and exports the pipeline; the data and noise of step ``i`` are drawn from generators seeded by
``(seed, phase, i)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavender.analysis import iou, mass_ratio
from lavender.maps import minmax_np
from lavender.world.scenes import SIZE, downsample_masks, sample_batch
from lavender.world.write import load_state

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints" / "dm"
# Stage 1's --resolutions for this DM, chosen by score_dm (docs/world_dm.md): the 16×16 layers localise,
# the 8×8 layers do not (their mean is at or below uniform), so adding 8 only dilutes the maps.
RESOLUTIONS: tuple[int, ...] = (16,)
STATE_FILE = "train_state.pt"
PIPELINE_SUBDIR = "pipeline"
WORD_KINDS = ("colour", "shape")


# ------------------------------------------------------------------------------------------ config
@dataclass
class DMConfig:
    """Sizes and optimisation of the world DM (the ``train-dm`` flags override the first block)."""

    steps: int = 3000  # UNet + text-encoder steps (the committed checkpoint's recipe)
    vae_steps: int = 80  # VAE reconstruction steps (run first)
    batch_size: int = 16
    vae_batch_size: int = 8  # flat-colour scenes reconstruct from few examples; the VAE is the dear part
    seed: int = 0
    lr: float = 2e-3
    vae_lr: float = 2e-3
    warmup: int = 100
    uncond_prob: float = 0.1
    min_objects: int = 2
    max_objects: int = 4
    # model sizes
    unet_channels: tuple[int, ...] = (48, 64)
    heads: int = 2
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks → downsample 4 → latent 16×16
    latent_channels: int = 4
    text_width: int = 64
    # 0 = token + position embeddings only: no token carries the rest of the caption, so the UNet must
    # attend to each word where its object is (with 2 causal layers the word maps stayed flat at every
    # length tried; docs/world_dm.md, "What was tried")
    text_layers: int = 0
    kl_weight: float = 1e-6
    extra: dict = field(default_factory=dict)

    @property
    def latent_side(self) -> int:
        return SIZE // 2 ** (len(self.vae_channels) - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["unet_channels"], d["vae_channels"] = list(self.unet_channels), list(self.vae_channels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> DMConfig:
        d = dict(d)
        d["unet_channels"], d["vae_channels"] = tuple(d["unet_channels"]), tuple(d["vae_channels"])
        return cls(**d)


# ------------------------------------------------------------------------------------------ parts
def make_world_tokenizer(out: str | Path):
    """A ``CLIPTokenizer`` over every byte plus one merged token per world word, written to ``out``.

    Built offline: the byte alphabet is CLIP's reversible table, so any text still tokenises (unknown
    words fall back to characters), while every caption word is exactly one token.
    """
    from lavender.diffusion.tiny import byte_alphabet, write_clip_tokenizer
    from lavender.world.questions import vocabulary

    chars = list(byte_alphabet().values())
    tokens = chars + [c + "</w>" for c in chars]
    words = [w for w in vocabulary() if w.isalpha() and len(w) > 1]
    merges: list[tuple[str, str]] = []
    # BPE applies the lowest-ranked merge anywhere in a word, so another word's merge ("a n" of "and")
    # can split a later word ("or|an|g|e"). Append merges that join whatever pieces BPE currently
    # makes, and repeat until every word is one token.
    for _ in range(10):
        bad = [(w, p) for w in words if len(p := _bpe(w, merges)) > 1]
        if not bad:
            break
        for _, pieces in bad:
            cur = pieces[0]
            for nxt in pieces[1:]:
                if (cur, nxt) not in merges:
                    merges.append((cur, nxt))
                cur += nxt
    else:
        raise RuntimeError(f"could not make {[w for w, _ in bad]} single tokens")
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return write_clip_tokenizer(out, {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges])


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: repeatedly join the adjacent pair with the lowest merge rank."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        r, i = min(pairs)
        if r == math.inf:
            break
        pieces[i: i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_parts(cfg: DMConfig, tokenizer) -> dict:
    """Fresh VAE, UNet, text encoder (weights from ``cfg.seed``) and the DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
                        up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=cfg.vae_channels,
                        latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=SIZE,
                        mid_block_add_attention=False)
    n_unet = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_side, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=1, block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n_unet, up_block_types=("CrossAttnUpBlock2D",) * n_unet,
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.heads,  # legacy name: number of heads
        norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=cfg.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # SD-1.x's schedule, so DDIM inversion in Stage 1 behaves as with a real SD checkpoint
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}


def save_pipeline(parts: dict, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` a ``StableDiffusionPipeline`` of the parts (safetensors) to ``out``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer,
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


# ------------------------------------------------------------------------------------------ training
def _images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, H, W, 3) uint8 → (n, 3, H, W) float32 in [-1, 1] (Stage 1's pixel range) on ``device``."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batch(cfg: DMConfig, phase: int, step: int):
    """The scenes of ``step`` in ``phase`` (0 = VAE, 1 = UNet): a pure function of (seed, phase, step)."""
    rng = np.random.default_rng([cfg.seed, phase, step])
    n = cfg.vae_batch_size if phase == 0 else cfg.batch_size
    return sample_batch(rng, n, split="train", objects=(cfg.min_objects, cfg.max_objects))


def _lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _save_on_sigterm():
    """Turn SIGTERM (a session ending, ``kill PID``) into SystemExit, so ``run``'s ``finally`` saves the
    chunk's progress. Returns the previous handler (None off the main thread, where nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(f"train-dm: signal {signum}; state saved, continue with --resume")

    return signal.signal(signal.SIGTERM, stop)


class DMTrainer:
    """Resumable two-phase training of the world DM in ``out`` (see the module docstring)."""

    def __init__(self, out: str | Path, cfg: DMConfig, resume: bool = False, device: str = "cpu"):
        self.out = Path(out)
        # every random draw (scenes, noise, timesteps, caption drops) stays on CPU generators and only the
        # tensors move, so a run on a GPU sees the same batches as the CPU recipe
        self.device = torch.device(device)
        self.state_path = self.out / STATE_FILE
        if self.state_path.exists() and not resume:
            raise FileExistsError(f"{self.state_path} exists: pass --resume to continue that run, or choose "
                                  f"another --out")
        if resume and not self.state_path.exists():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.out}; start without --resume")
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer = make_world_tokenizer(self.out / "tokenizer")
        state = load_state(self.state_path) if resume else None
        if state is not None:
            saved = DMConfig.from_json(state["config"])
            # the schedule length and batch may change on resume; sizes and seed may not
            for k in ("seed", "unet_channels", "vae_channels", "latent_channels", "text_width", "text_layers",
                      "heads"):
                if getattr(saved, k) != getattr(cfg, k):
                    raise ValueError(f"--resume: {k}={getattr(cfg, k)!r} differs from the saved run's "
                                     f"{getattr(saved, k)!r}; use the same value")
        self.cfg = cfg
        self.parts = build_parts(cfg, self.tokenizer)
        self.vae, self.unet, self.te = self.parts["vae"], self.parts["unet"], self.parts["text_encoder"]
        for m in (self.vae, self.unet, self.te):
            m.to(self.device)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr)
        self.opt = torch.optim.AdamW(list(self.unet.parameters()) + list(self.te.parameters()), lr=cfg.lr,
                                     weight_decay=1e-2)
        self.vae_step, self.step, self.log = 0, 0, []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        if state is not None:
            self.vae.load_state_dict(state["vae"])
            self.vae_opt.load_state_dict(state["vae_opt"])
            if state["step"] > 0:  # before the UNet phase its parts are still the seed's initialisation
                self.unet.load_state_dict(state["unet"])
                self.te.load_state_dict(state["text_encoder"])
                self.opt.load_state_dict(state["opt"])
            self.vae_step, self.step, self.log = state["vae_step"], state["step"], state["log"]
            self.seconds, self.cpu_seconds = state.get("seconds", 0.0), state.get("cpu_seconds", 0.0)
            self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        alphas = self.parts["scheduler"].alphas_cumprod.float().to(self.device)
        self.sqrt_a, self.sqrt_1ma = alphas.sqrt(), (1 - alphas).sqrt()

    @property
    def done(self) -> bool:
        return self.vae_step >= self.cfg.vae_steps and self.step >= self.cfg.steps

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        # exactly Stage 1's encoding: 77 tokens, EOS-padded, no attention mask
        return self.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt")["input_ids"].to(self.device)

    def vae_train_step(self) -> float:
        cfg, i = self.cfg, self.vae_step
        x = _images_to_tensor(_batch(cfg, 0, i).images, self.device)
        for g in self.vae_opt.param_groups:
            g["lr"] = _lr(cfg.vae_lr, i, cfg.vae_steps, min(cfg.warmup, cfg.vae_steps // 5 + 1))
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(self.device)
        rec = self.vae.decode(z).sample
        loss = F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()
        self.vae_step += 1
        if self.vae_step == cfg.vae_steps:
            self._set_scaling_factor()
        return loss.item()

    @torch.no_grad()
    def _set_scaling_factor(self) -> None:
        """SD's convention: scale latents to unit std (measured on 256 fixed scenes)."""
        x = _images_to_tensor(sample_batch(np.random.default_rng([self.cfg.seed, 9]), 64).images, self.device)
        std = float(self.vae.encode(x).latent_dist.mean.std())
        self.vae.register_to_config(scaling_factor=1.0 / std)

    def unet_train_step(self) -> float:
        cfg, i = self.cfg, self.step
        b = _batch(cfg, 1, i)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_000 + i)
        with torch.no_grad():
            x = _images_to_tensor(b.images, self.device)
            z0 = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        drop = torch.rand(len(b.captions), generator=gen) < cfg.uncond_prob
        ids = self._tokenize(["" if d else c for c, d in zip(b.captions, drop.tolist())])
        t = torch.randint(0, len(self.sqrt_a), (len(ids),), generator=gen).to(self.device)
        noise = torch.randn(z0.shape, generator=gen).to(self.device)
        zt = self.sqrt_a[t].view(-1, 1, 1, 1) * z0 + self.sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        for g in self.opt.param_groups:
            g["lr"] = _lr(cfg.lr, i, cfg.steps, cfg.warmup)
        emb = self.te(ids)[0]  # (B, 77, width)
        loss = F.mse_loss(self.unet(zt, t, emb).sample, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.te.parameters()), 1.0)
        self.opt.step()
        self.step += 1
        return loss.item()

    def run(self, minutes: float | None = None, progress: bool = True, max_steps: int | None = None) -> bool:
        """Train until done, ``minutes`` have passed or ``max_steps`` steps were made (either phase);
        save state and pipeline; return ``done``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0, c0 = time.perf_counter(), time.process_time()
        deadline = t0 + 60 * minutes if minutes else math.inf
        total = cfg.vae_steps + cfg.steps
        bar = tqdm(total=total, initial=min(self.vae_step, cfg.vae_steps) + min(self.step, cfg.steps),
                   disable=not progress, desc="train-dm", unit="step")
        recent: list[float] = []
        made = 0
        previous = _save_on_sigterm()
        try:
            while not self.done and time.perf_counter() < deadline and (max_steps is None or made < max_steps):
                made += 1
                vae_phase = self.vae_step < cfg.vae_steps
                for m, on in ((self.vae, vae_phase), (self.unet, not vae_phase), (self.te, not vae_phase)):
                    m.train(on)
                loss = self.vae_train_step() if vae_phase else self.unet_train_step()
                phase = "vae" if vae_phase else "unet"
                step = self.vae_step if vae_phase else self.step
                recent = (recent if recent and self.log and self.log[-1]["phase"] == phase else []) + [loss]
                recent = recent[-50:]
                self.log.append({"phase": phase, "step": step, "loss": loss})
                bar.update(1)
                bar.set_postfix(phase=phase, loss=f"{np.mean(recent):.4f}")
        finally:
            bar.close()
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            self.save()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self.done

    def save(self) -> None:
        """Write ``train_state.pt`` atomically, then the pipeline (usable even mid-training)."""
        state = {"config": self.cfg.to_json(), "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
                 "text_encoder": self.te.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                 "opt": self.opt.state_dict(), "vae_step": self.vae_step, "step": self.step, "log": self.log,
                 "scaling_factor": float(self.vae.config.scaling_factor), "seconds": self.seconds,
                 "cpu_seconds": self.cpu_seconds}
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)
        if self.vae_step >= self.cfg.vae_steps:
            for m in (self.vae, self.unet, self.te):
                m.eval()
            save_pipeline(self.parts, self.tokenizer, self.out / PIPELINE_SUBDIR)
        info = {"done": self.done, "vae_step": self.vae_step, "step": self.step, "config": self.cfg.to_json(),
                "wall_seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "last_loss": self.log[-1]["loss"] if self.log else None}
        (self.out / "train_info.json").write_text(json.dumps(info, indent=1))


def train_dm(out: str | Path, cfg: DMConfig, resume: bool = False, chunk_minutes: float | None = None,
             progress: bool = True, device: str = "cpu") -> DMTrainer:
    """Train (or continue) the world DM in ``out``; one call runs one chunk of ≤ ``chunk_minutes``.

    The pipeline is written to ``out/pipeline`` at the end of every chunk after the VAE phase; call
    again with ``resume=True`` until ``trainer.done``.
    """
    trainer = DMTrainer(out, cfg, resume=resume, device=device)
    trainer.run(chunk_minutes, progress=progress)
    return trainer


# ------------------------------------------------------------------------------------------ scoring
def thresholded_iou(attn: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of {cells with attention ≥ ``threshold`` of its min–max range} with {mask coverage ≥ 0.5}."""
    return iou(attn, np.asarray(mask) >= 0.5, threshold)


def word_kind(word: str) -> str | None:
    from lavender.world.scenes import COLOURS, SHAPES

    return "colour" if word in COLOURS else "shape" if word in SHAPES else None


class _LayerStore:
    """Per-layer running sums with the accumulator interface ``CaptureCrossAttnProcessor`` calls.

    ``run_ddim`` switches ``active`` on the parent; each layer's view reads it and adds into its own
    buffer, so one denoising pass yields every layer's maps (Stage 1 sums them per resolution).
    """

    class View:
        def __init__(self, parent: _LayerStore, key: str):
            self.parent, self.key = parent, key

        @property
        def active(self) -> bool:
            return self.parent.active

        def add(self, side: int, probs: torch.Tensor) -> None:
            n = self.parent.n_images
            buf = self.parent.sums.get(self.key)
            p = probs[-n:].float()  # conditional rows only, as the accumulator keeps
            self.parent.sums[self.key] = p.clone() if buf is None else buf + p
            self.parent.counts[self.key] = self.parent.counts.get(self.key, 0) + 1

    def __init__(self):
        self.active = False
        self.n_images = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def reset(self, n: int) -> None:
        self.n_images, self.sums, self.counts = n, {}, {}


def _layer_name(key: str) -> str:
    return key.replace(".processor", "").replace("transformer_blocks.0.", "").replace("attentions.", "a")


class LayerMaps:
    """Stage 1's ``ddim`` recipe on a DM, keeping every cross-attention layer's maps apart.

    Uses Stage 1's own model wrapper, framing, tokenisation, DDIM recipe, capture processor and word
    merging (``lavender.diffusion.extract``); only the accumulation is per layer. ``groups`` are the
    single layers (by short name), ``res<side>`` (the mean of that resolution's layers: what
    ``--resolutions <side>`` averages), ``all`` (every layer: ``--resolutions`` = all sides) and each
    of ``combine`` (lists of short layer names, averaged: what ``--layers`` with several prefixes reads).
    """

    def __init__(self, dm: str | Path, steps: int = 10, inversion_steps: int = 5, map_size: int = 32,
                 device: str = "cpu", combine: Sequence[Sequence[str]] = ()):
        from diffusers.models.attention_processor import AttnProcessor2_0

        from lavender.diffusion.capture import CaptureCrossAttnProcessor, cross_attention_sides
        from lavender.diffusion.extract import DiffusionModel

        self.model = DiffusionModel(str(dm), device)
        self.steps, self.inversion_steps, self.map_size = steps, inversion_steps, map_size
        self.sides = {k: s for k, s in cross_attention_sides(self.model.unet, self.model.latent_side).items()
                      if s > 0}
        self.store = _LayerStore()
        unet = self.model.unet
        unet.set_attn_processor({k: CaptureCrossAttnProcessor(_LayerStore.View(self.store, k), self.sides[k])
                                 if k in self.sides else AttnProcessor2_0() for k in unet.attn_processors})
        with torch.inference_mode():
            self.null = self.model.encode_text(self.model.tokenize([""])["input_ids"])  # (1, 77, D)
        self.groups = {_layer_name(k): [k] for k in self.sides}
        for side in sorted(set(self.sides.values()), reverse=True):
            self.groups[f"res{side}"] = [k for k in self.sides if self.sides[k] == side]
        self.groups["all"] = list(self.sides)
        for names in combine:
            unknown = [n for n in names if n not in self.groups or len(self.groups[n]) != 1]
            if unknown:
                raise ValueError(f"combine: {unknown} are not layers of this DM; its layers: "
                                 f"{[_layer_name(k) for k in self.sides]}")
            self.groups["+".join(names)] = [self.groups[n][0] for n in names]

    def maps_by_group(self, images: np.ndarray, captions: list[str], timesteps: Sequence[int] | None = None,
                      ids: Sequence[str] | None = None) -> dict[str, list[dict]]:
        """Raw (``normalize="none"``) word maps per group: ``{group: [{(start, end): (S, S) map}, ...]}``.

        ``images`` (n, H, W, 3) uint8; one dict per caption, keyed by the word's character offsets.
        ``timesteps`` switches from the ``ddim`` recipe to Stage 1's ``noise`` recipe (one noise-and-read
        pass per timestep; the noise is seeded by ``ids``, as Stage 1 seeds it by record id).
        """
        from PIL import Image

        from lavender.diffusion.extract import frame_image, record_noise, to_pixels, words_from_token_maps
        from lavender.diffusion.inversion import run_ddim, run_noise

        m, n, size = self.model, len(captions), self.map_size
        pixels = to_pixels([frame_image(Image.fromarray(im), m.image_size, "squash") for im in images])
        enc = m.tokenize(captions)
        x0 = m.encode_images(pixels)
        cond = m.encode_text(enc["input_ids"])
        self.store.reset(n)
        if timesteps:
            ids = list(ids) if ids is not None else [str(j) for j in range(n)]
            run_noise(m.eps, x0, cond, m.schedule, self.store, list(timesteps), record_noise(ids, x0))
        else:
            run_ddim(m.eps, x0, cond, self.null.expand(n, -1, -1), m.schedule, self.store, self.steps,
                     self.inversion_steps, 1.0)
        layer = {}
        for k, side in self.sides.items():
            # (n, side², 77) sum over steps → (n, 77, side, side) mean → (n, 77, size, size)
            t = (self.store.sums[k] / self.store.counts[k]).transpose(1, 2).reshape(n, -1, side, side)
            layer[k] = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=side > size)
        out: dict[str, list[dict]] = {}
        for g, keys in self.groups.items():
            token_maps = torch.stack([layer[k] for k in keys]).mean(0)  # (n, 77, S, S)
            out[g] = []
            for j, cap in enumerate(captions):
                offsets = [tuple(o) for o in enc["offset_mapping"][j].tolist()]
                special = [bool(x) for x in enc["special_tokens_mask"][j].tolist()]
                _, offs, maps, _ = words_from_token_maps(cap, offsets, special, token_maps[j], "none")
                out[g].append(dict(zip(offs, maps)))
        return out


def score_dm(dm: str | Path, n: int = 100, seed: int = 1234, split: str = "test", steps: int = 10,
             inversion_steps: int = 5, batch_size: int = 10, map_size: int = 32, threshold: float = 0.5,
             progress: bool = True, device: str = "cpu", combine: Sequence[Sequence[str]] = (),
             timesteps: Sequence[int] | None = None) -> dict:
    """Localisation of the DM's Stage-1 ``ddim`` maps on ``n`` held-out scenes, per layer and resolution.

    Scenes come from ``sample_batch(default_rng([seed, 77]), n, split)`` (never the training streams,
    which are seeded ``[seed, phase, step]``). Each colour/shape word map (:class:`LayerMaps`) is
    compared with its own object's mask, area-averaged to ``map_size``: ``ratio`` = mass ratio of the
    raw map (mean token probability), ``ratio_minmax`` = of the min–max normalised map Stage 1 stores,
    ``iou`` = :func:`thresholded_iou` at ``threshold``; ``ratio_other`` = mass ratio of the raw map on the
    scene's other objects (a map that binds the word scores ``ratio`` ≫ ``ratio_other``; a map that
    merely highlights every object scores them alike). Values are means over word occurrences.
    ``combine`` adds rows for layer combinations (:class:`LayerMaps`); ``timesteps`` scores Stage 1's
    one-pass ``noise`` recipe at those timesteps instead of ``ddim``.
    """
    from tqdm.auto import tqdm

    lm = LayerMaps(dm, steps, inversion_steps, map_size, device, combine)
    acc: dict[str, dict[str, list[tuple[float, ...]]]] = {g: {k: [] for k in WORD_KINDS}
                                                                    for g in lm.groups}
    batch = sample_batch(np.random.default_rng([seed, 77]), n, split=split)
    bar = tqdm(total=n, disable=not progress, desc="score-dm", unit="img")
    for i in range(0, n, batch_size):
        caps, gts = batch.captions[i: i + batch_size], batch.word_masks[i: i + batch_size]
        maps = lm.maps_by_group(batch.images[i: i + batch_size], caps, timesteps=timesteps,
                                ids=[f"score{i + j}" for j in range(len(caps))])
        for j, gt in enumerate(gts):
            masks = downsample_masks(gt.masks, map_size)  # (n_words, S, S) coverage
            for k, (w, off, mask) in enumerate(zip(gt.words, gt.offsets, masks)):
                kind = word_kind(w)
                # the scene's OTHER objects: a word map that binds ranks its own object above them
                others = [m for m in gt.masks if not np.array_equal(m, gt.masks[k])]
                other = downsample_masks(np.any(others, axis=0), map_size) if others else None
                for g in lm.groups:
                    a = maps[g][j].get(tuple(off))
                    if kind is None or a is None:
                        continue
                    mm = minmax_np(a)
                    acc[g][kind].append((mass_ratio(a, mask), mass_ratio(mm, mask),
                                         thresholded_iou(a, mask, threshold),
                                         mass_ratio(a, other) if other is not None else float("nan")))
        bar.update(len(caps))
    bar.close()
    table = {}
    for g, keys in lm.groups.items():
        row: dict = {"sides": sorted({lm.sides[k] for k in keys}), "layers": len(keys)}
        for kind in WORD_KINDS:
            arr = np.array(acc[g][kind], dtype=np.float64).reshape(-1, 4)
            row[kind] = {"ratio": float(np.nanmean(arr[:, 0])), "ratio_minmax": float(np.nanmean(arr[:, 1])),
                         "iou": float(np.nanmean(arr[:, 2])), "ratio_other": float(np.nanmean(arr[:, 3])),
                         "n": int(len(arr))}
        table[g] = row
    return {"dm": str(dm), "n_scenes": n, "seed": seed, "split": split,
            "recipe": ({"name": "noise", "timesteps": list(timesteps)} if timesteps else
                       {"name": "ddim", "steps": steps, "inversion_steps": inversion_steps}),
            "map_size": map_size, "threshold": threshold,
            "layers": {_layer_name(k): k for k in lm.sides}, "table": table}


def format_table(result: dict) -> str:
    """The score table as Markdown (one row per layer / resolution group)."""
    lines = ["| maps | sides | colour ratio | (minmax) | (other objects) | colour IoU | shape ratio | (minmax) | "
             "(other objects) | shape IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, row in result["table"].items():
        cells = []
        for kind in WORD_KINDS:
            r = row[kind]
            cells += [f"{r['ratio']:.2f}", f"{r['ratio_minmax']:.2f}", f"{r['ratio_other']:.2f}", f"{r['iou']:.3f}"]
        lines.append(f"| {g} | {','.join(map(str, row['sides']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
