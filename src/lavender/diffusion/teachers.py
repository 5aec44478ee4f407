"""Stage 1 teachers beyond SD-1.x/2.x: SDXL (UNet), SD3 and Flux (MM-DiT transformers).

Each is detected from the pipeline folder (``model_index.json``'s ``_class_name``, see
:func:`pipeline_class_of`) and offers what :class:`~lavender.diffusion.extract.Extractor` asks of a
teacher (documented on :class:`~lavender.diffusion.extract.DiffusionModel`), so the recipes, the
word merging and the on-disk format are shared with SD-1.x. docs/stage1.md, "Teachers".

One conditioning tensor per text. The recipes treat the text conditioning as ONE tensor
(``torch.cat([uncond, cond])`` under guidance, ``expand``, null-text optimises it), but SDXL and SD3
also condition on a pooled text vector. It is packed as one extra row after the token embeddings
(zero-padded to their width) and unpacked by the denoiser call: ``(B, T + 1, D)``. Nothing else reads
that row; the capture sees only the T token keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lavender.diffusion.capture import AttentionAccumulator, cross_attention_sides
from lavender.diffusion.extract import DiffusionModel


def pipeline_class_of(path: str) -> str | None:
    """The diffusers pipeline class a folder (or hub id) was saved as, from its ``model_index.json``;
    None when that cannot be read (then the SD-1.x loader reports the real problem)."""
    index = Path(path) / "model_index.json"
    try:
        if index.is_file():
            return json.loads(index.read_text()).get("_class_name")
        if Path(path).exists():
            return None
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path).get("_class_name")
    except (OSError, ValueError):
        return None


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, T, D) and a pooled vector (B, P ≤ D) as one (B, T + 1, D) tensor."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"pooled width {pooled.shape[-1]} exceeds the token width {tokens.shape[-1]}")
    row = torch.zeros(tokens.shape[0], 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([tokens, row], dim=1)


def unpack(emb: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: (tokens (B, T, D), pooled (B, pooled_dim))."""
    return emb[:, :-1], emb[:, -1, :pooled_dim]


# ------------------------------------------------------------------------------------------ SDXL
class SDXLModel(DiffusionModel):
    """SDXL base: a UNet conditioned on two CLIP encoders' penultimate hidden states (concatenated per
    token) plus a pooled text vector and six size/crop ids ("text_time" added conditioning).

    Words are defined by the FIRST tokenizer (CLIP ViT-L). Both tokenizers are the same CLIP BPE (the
    second pads with ``!`` instead of ``<|endoftext|>``), so token i covers the same characters in both
    and key i of the UNet's cross-attention is one position of the text; :meth:`tokenize` checks that
    per text (every non-special token's character span equal) and refuses a checkpoint where it fails.

    The six ids are (original H, W, crop top, crop left, target H, W) = (S, S, 0, 0, S, S) for the
    teacher's square image side S: Stage 1 frames every image into that square itself, uncropped.
    """

    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, add_watermarker=False)
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ValueError(f"{path}: an SDXL pipeline without its first text encoder (a refiner?) is not a "
                             "Stage 1 teacher; use the base model")
        pipe.set_progress_bar_config(disable=True)
        self._setup(pipe, path, device, dtype)
        self.text_encoder_2 = pipe.text_encoder_2.to(self.device).eval().requires_grad_(False)
        self.tokenizer_2 = pipe.tokenizer_2
        # SDXL's fp16 VAE overflows (its config says force_upcast): encode in float32 then
        if dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)
        self.force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        self.pooled_dim = int(self.text_encoder_2.config.projection_dim)
        s = self.image_size
        self.time_ids = torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=self.device)
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * 6 + self.pooled_dim
        if expected != given:
            raise ValueError(f"{path}: the UNet's added conditioning takes {expected} numbers but 6 time ids and "
                             f"a pooled text of {self.pooled_dim} give {given}; not an SDXL base layout")

    def _added(self, pooled: torch.Tensor, n: int) -> dict:
        return {"text_embeds": pooled.to(self.dtype), "time_ids": self.time_ids.expand(n, -1).to(self.dtype)}

    def _unet(self, x: torch.Tensor, tt: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        ctx, pooled = unpack(emb, self.pooled_dim)
        return self.unet(x.to(self.dtype), tt, ctx.to(self.dtype),
                         added_cond_kwargs=self._added(pooled, x.shape[0])).sample.float()

    def attention_sides(self) -> dict[str, int]:
        pooled = torch.zeros(1, self.pooled_dim, device=self.device)
        return cross_attention_sides(self.unet, self.latent_side, added_cond_kwargs=self._added(pooled, 1))

    def default_resolutions(self, sides: dict[str, int]) -> list[int]:
        """Every side SDXL has cross-attention at (1024 px: 64 and 32; none at the 128 level)."""
        return sorted({s for s in sides.values() if s > 0})

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float() * self.vae.config.scaling_factor

    def tokenize(self, texts: list[str]) -> dict:
        """The first tokenizer's ids, offsets and special flags (they define the words), plus
        ``input_ids_2`` of the second; raises ``ValueError`` where the two split a text differently."""
        enc = super().tokenize(texts)
        enc2 = self.tokenizer_2(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        words_1 = enc["special_tokens_mask"] == 0
        same = (enc2["special_tokens_mask"] == 0) == words_1
        same &= (enc2["offset_mapping"] == enc["offset_mapping"]).all(-1) | ~words_1
        if not bool(same.all()):
            bad = texts[int((~same).any(-1).nonzero()[0, 0])]
            raise ValueError(f"SDXL's two tokenizers split {bad[:60]!r} differently; a key position of the "
                             "UNet's cross-attention would not be one piece of text")
        enc["input_ids_2"] = enc2["input_ids"]
        return enc

    @torch.inference_mode()
    def encode_prompts(self, enc: dict) -> torch.Tensor:
        """Both encoders' penultimate hidden states, concatenated per token (B, 77, 768 + 1280 for SDXL),
        and the second encoder's projected pooled output (B, 1280), packed (:func:`pack`)."""
        o1 = self.text_encoder(enc["input_ids"].to(self.device), output_hidden_states=True)
        o2 = self.text_encoder_2(enc["input_ids_2"].to(self.device), output_hidden_states=True)
        tokens = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1).float()
        return pack(tokens, o2.text_embeds.float())

    def null_embedding(self) -> torch.Tensor:
        """All zeros when the pipeline sets ``force_zeros_for_empty_prompt`` (SDXL base does), as its
        own guidance does; else the encoded empty text."""
        if self.force_zeros:
            return torch.zeros(1, self.max_length + 1, self.unet.config.cross_attention_dim, device=self.device)
        return self.encode_prompts(self.tokenize([""]))


# ------------------------------------------------------------------------------- flow matching
class FlowSchedule:
    """A flow-matching (rectified-flow) schedule: x_σ = (1 − σ)·x_0 + σ·ε for σ ∈ [0, 1], the model
    predicting the velocity v = dx/dσ = ε − x_0 at timestep σ·N (N = ``num_train_timesteps``, 1000).

    ``--timesteps t`` of the ``noise`` recipe means σ = t / N (no shift: t is where the image is read),
    so t = 400 is x = 0.6·x_0 + 0.4·ε. The ``ddim`` recipe's denoising grid is the checkpoint
    scheduler's own n-step sigmas (``set_timesteps``: SD3's shift 3, Flux's resolution-dependent shift).
    """

    def __init__(self, scheduler, image_seq_len: int):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.image_seq_len = image_seq_len

    def sigmas(self, steps: int) -> list[float]:
        """The scheduler's ``steps``-step grid, descending, ending at 0 (clean)."""
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            # Flux: as FluxPipeline sets them, σ = linspace(1, 1/n, n) shifted by mu, which grows linearly
            # with the number of image tokens from base_shift (base_image_seq_len) to max_shift
            lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
            b0, b1 = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
            mu = b0 + (b1 - b0) * (self.image_seq_len - lo) / (hi - lo)
            self.scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / steps, steps)), device="cpu", mu=mu)
        else:  # SD3: as StableDiffusion3Pipeline sets them
            self.scheduler.set_timesteps(steps, device="cpu")
        return [float(x) for x in self.scheduler.sigmas]


def flow_move(x: torch.Tensor, v: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """One Euler step of the flow ODE dx/dσ = v from σ = ``s_from`` to ``s_to`` (either direction)."""
    return x + (s_to - s_from) * v


class FlowTeacher:
    """What the flow-matching teachers (SD3, Flux) share: the recipes on the flow ODE, capture of the
    image-query × text-key block of joint attention, and the Extractor's teacher interface.

    Recipes (UNet/transformer evaluations per image as for SD-1.x):

    - ``noise``: x_σ = (1 − σ)·x_0 + σ·ε at each σ = t/N of ``--timesteps``, one conditional
      evaluation each (ε seeded by the record id); returns x_0 predicted at the first: x_σ − σ·v.
    - ``ddim``: Euler INVERSION of the flow ODE with the text over m = ``--inversion-steps`` even steps
      σ_top·k/m up to the top σ_top of the scheduler's n-step grid (the velocity evaluated at the
      TARGET σ from the current latent, as DDIM inversion does), then Euler integration back down the
      n-step grid with guidance g (``[uncond, cond]`` in one call), capturing: m + n·(1 or 2) evaluations.
    - ``nulltext``: refused — null-text inversion optimises against DDIM's ε-parameterised steps.
    """

    flow = True
    default_modules: list[str] | None = None

    def check_recipe(self, recipe: str) -> None:
        if recipe == "nulltext":
            raise ValueError(f"--recipe nulltext is not defined for {self.pipeline_class} (a flow-matching model: "
                             "null-text inversion optimises DDIM's ε steps); use --recipe ddim (Euler inversion of "
                             "the flow) or noise")

    def velocity(self, x: torch.Tensor, t: float, emb: torch.Tensor) -> torch.Tensor:
        """The predicted velocity (float32) for float32 latents ``x`` at timestep ``t`` = σ·N."""
        self.unet_calls += x.shape[0]
        return self._forward(x, float(t), emb)

    def run_recipe(self, cfg, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                   store: AttentionAccumulator, ids: list[str]) -> torch.Tensor:
        from lavender.diffusion.extract import record_noise

        self.check_recipe(cfg.recipe)
        if cfg.recipe == "noise":
            return self._run_noise(x0, cond, store, cfg.timesteps, record_noise(ids, x0))
        return self._run_euler(x0, cond, uncond, store, cfg.steps, cfg.inversion_steps, cfg.guidance)

    @torch.inference_mode()
    def _run_noise(self, x0, cond, store, timesteps, noise) -> torch.Tensor:
        n_train = self.schedule.num_train_timesteps
        store.active = True
        first = None
        try:
            for t in timesteps:
                s = int(t) / n_train
                x = (1 - s) * x0 + s * noise
                v = self.velocity(x, s * n_train, cond)
                if first is None:
                    first = x - s * v
        finally:
            store.active = False
        return first

    @torch.inference_mode()
    def _run_euler(self, x0, cond, uncond, store, steps: int, inversion_steps: int, guidance: float) -> torch.Tensor:
        n_train = self.schedule.num_train_timesteps
        grid = self.schedule.sigmas(steps)  # descending, ends at 0
        up = [0.0] + [grid[0] * (k + 1) / inversion_steps for k in range(inversion_steps)]
        x = x0
        for s_from, s_to in zip(up[:-1], up[1:]):
            x = flow_move(x, self.velocity(x, s_to * n_train, cond), s_from, s_to)
        store.active = True
        try:
            for s, s_next in zip(grid[:-1], grid[1:]):
                if guidance == 1.0:
                    v = self.velocity(x, s * n_train, cond)
                else:
                    v_u, v_c = self.velocity(torch.cat([x, x]), s * n_train, torch.cat([uncond, cond])).chunk(2)
                    v = v_u + guidance * (v_c - v_u)
                x = flow_move(x, v, s, s_next)
        finally:
            store.active = False
        return x

    # --- capture
    def attention_sides(self) -> dict[str, int]:
        """Every joint (double-stream) block's attention → the image token grid's side (one resolution)."""
        return {k: self.grid for k in self.transformer.attn_processors if self._is_joint(k)}

    def default_resolutions(self, sides: dict[str, int]) -> list[int]:
        return [self.grid]

    def install_capture(self, store: AttentionAccumulator, sides: dict[str, int],
                        modules: list[str] | None) -> list[str]:
        """Wrap the chosen joint blocks' processors with :class:`JointCaptureProcessor`; every other
        attention keeps the processor the model came with. Raises ``ValueError`` like the UNet capture
        does for a side or a module that matches nothing."""
        missing = [s for s in store.sides if s != self.grid]
        if missing:
            raise ValueError(f"--resolutions {missing} not in this {self.pipeline_class}: its joint attention reads "
                             f"one image-token grid of side {self.grid} at this image size")
        chosen = sorted(sides)
        if modules:
            chosen = [k for k in chosen if any(k.startswith(p) for p in modules)]
            if not chosen:
                raise ValueError(f"--layers {modules} match no joint attention block; blocks: "
                                 f"{sorted(k.rsplit('.processor', 1)[0] for k in sides)}")
        procs = dict(self.transformer.attn_processors)
        for k in chosen:
            procs[k] = JointCaptureProcessor(procs[k], store, self.grid, self.text_keys, self.text_first,
                                             self._queries_keys, self._single_text_len(k))
        self.transformer.set_attn_processor(procs)
        return chosen


class JointCaptureProcessor:
    """Records, while ``store.active``, the image-query × word-token-key block of a joint attention's
    probabilities, then lets the model's own processor compute the output (unchanged by capture).

    The probabilities are softmax(QKᵀ/√d) over ALL keys of the joint sequence (image and text), as the
    model computes them, in float32, one head at a time (the full (B, H, N, N) tensor of SD3 at 1024 px
    would be gigabytes); only the columns of ``text_keys`` (positions within the text part) are kept,
    averaged over heads: (B, N_img, T_words). ``queries_keys(attn, hidden, encoder_hidden, rotary,
    n_text)`` gives the image queries and all keys, (B, H, ·, d), as the model forms them. A
    single-stream block (Flux) gets the text already in ``hidden`` (first ``n_text`` tokens) and no
    encoder states.
    """

    def __init__(self, inner, store: AttentionAccumulator, side: int, text_keys: slice, text_first: bool,
                 queries_keys, n_text: int | None = None):
        self.inner, self.store, self.side = inner, store, side
        self.text_keys, self.text_first, self.queries_keys = text_keys, text_first, queries_keys
        self.n_text = n_text

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None, **kwargs):
        # named parameters, not only **kwargs: diffusers passes a processor only the keywords its
        # signature names (Flux's rotary embedding included)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if self.store.active and (encoder_hidden_states is not None or self.n_text):
            if attention_mask is not None:
                raise ValueError("joint-attention capture does not apply attention masks; run without one")
            self.store.add(self.side, self.image_text_probs(attn, hidden_states, encoder_hidden_states,
                                                            image_rotary_emb))
        return self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)

    def image_text_probs(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb=None) -> torch.Tensor:
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.n_text
        # (B, H, N_img, d) image queries, (B, H, S, d) all keys of the joint sequence
        q, k = self.queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb, n_txt)
        start = 0 if self.text_first else k.shape[2] - n_txt
        cols = slice(start + self.text_keys.start, start + self.text_keys.stop)
        scale = q.shape[-1] ** -0.5
        out = None
        for h in range(q.shape[1]):
            p = (torch.matmul(q[:, h], k[:, h].transpose(-1, -2)).float() * scale).softmax(-1)[..., cols]
            out = p if out is None else out + p
        return out / q.shape[1]


# ------------------------------------------------------------------------------------------ SD3
class SD3Model(FlowTeacher):
    """Stable Diffusion 3 (MM-DiT): every ``transformer_blocks.i.attn`` is joint attention over
    [image tokens (N), CLIP tokens (77), T5 tokens (L = 256)], image first.

    Words are defined by the T5 tokenizer (``tokenizer_3``): its L keys are the ones read, so the
    stored map of a word is the image-query attention to its T5 tokens, normalised by the softmax over
    ALL N + 77 + L keys as the model computes it (the 77 CLIP keys' share is part of the denominator,
    not of any word). A pipeline saved without T5 is refused (its words would have no keys).
    The conditioning is the pipeline's: both CLIPs' penultimate states concatenated and zero-padded
    to T5's width, then T5's last hidden state, along the sequence; pooled = both CLIPs' projections.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    text_first = False

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype)
        if pipe.text_encoder_3 is None or pipe.tokenizer_3 is None:
            raise ValueError(f"{path}: an SD3 pipeline without its T5 encoder: Stage 1's words are T5's tokens")
        self.device, self.dtype = torch.device(device), dtype
        mods = {}
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            mods[name] = getattr(pipe, name).to(self.device).eval().requires_grad_(False)
        self.transformer, self.vae = mods["transformer"], mods["vae"]
        self.unet = self.transformer  # the denoiser, under the name the dry run and summaries use
        self.encoders = [mods["text_encoder"], mods["text_encoder_2"]]
        self.t5 = mods["text_encoder_3"]
        self.clip_tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.tokenizer = pipe.tokenizer_3
        self.max_length = 256  # the pipeline's default max_sequence_length
        self.clip_length = int(pipe.tokenizer.model_max_length)
        self.text_keys = slice(self.clip_length, self.clip_length + self.max_length)
        cfg = self.transformer.config
        self.latent_side = int(cfg.sample_size)
        self.image_size = self.latent_side * pipe.vae_scale_factor
        self.grid = self.latent_side // int(cfg.patch_size)
        self.pooled_dim = int(cfg.pooled_projection_dim)
        self.joint_dim = int(cfg.joint_attention_dim)
        self.schedule = FlowSchedule(pipe.scheduler, self.grid * self.grid)
        self.unet_calls = 0

    @staticmethod
    def _is_joint(key: str) -> bool:
        parts = key.split(".")
        return len(parts) == 4 and parts[0] == "transformer_blocks" and parts[2] == "attn"

    @staticmethod
    def _single_text_len(key: str) -> None:
        return None  # SD3 has no single-stream blocks

    @staticmethod
    def _queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None, n_text=None):
        """Image queries and all keys of SD3's joint attention, (B, H, ·, d), q/k norms applied."""
        b, h = hidden_states.shape[0], attn.heads

        def heads(t):
            return t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)

        q, k = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        ek = heads(attn.add_k_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        return q, torch.cat([k, ek], dim=2)

    def _forward(self, x: torch.Tensor, t: float, emb: torch.Tensor) -> torch.Tensor:
        tokens, pooled = unpack(emb, self.pooled_dim)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=self.dtype)
        return self.transformer(hidden_states=x.to(self.dtype), timestep=tt, encoder_hidden_states=tokens.to(self.dtype),
                                pooled_projections=pooled.to(self.dtype)).sample.float()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (latent mean − shift_factor) × scaling_factor, float32."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        shift = self.vae.config.get("shift_factor") or 0.0
        return (dist.mean.float() - shift) * self.vae.config.scaling_factor

    def tokenize(self, texts: list[str]) -> dict:
        """T5's ids, offsets and special flags (the words; ``truncated`` beyond 256 tokens), plus both
        CLIP tokenizers' ids (``clip_ids``), which only condition."""
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        enc["truncated"] = [len(ids) > self.max_length for ids in full]
        enc["clip_ids"] = [tok(texts, padding="max_length", max_length=self.clip_length, truncation=True,
                               return_tensors="pt")["input_ids"] for tok in self.clip_tokenizers]
        return enc

    @torch.inference_mode()
    def encode_prompts(self, enc: dict) -> torch.Tensor:
        states, pooled = [], []
        for ids, encoder in zip(enc["clip_ids"], self.encoders):
            o = encoder(ids.to(self.device), output_hidden_states=True)
            states.append(o.hidden_states[-2])
            pooled.append(o.text_embeds)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        t5 = self.t5(enc["input_ids"].to(self.device))[0]
        return pack(torch.cat([clip, t5.to(clip.dtype)], dim=1).float(), torch.cat(pooled, dim=-1).float())

    def null_embedding(self) -> torch.Tensor:
        """The encoded empty text, as SD3's pipeline guides with."""
        return self.encode_prompts(self.tokenize([""]))


# ------------------------------------------------------------------------------------------ Flux
class FluxModel(SD3Model):
    """FLUX.1 (MM-DiT, flow matching). The ``transformer_blocks.i`` (double-stream) attention runs over
    [T5 tokens (L = 512), image tokens (N)] — text FIRST — with q/k RMS norms and then the rotary
    position embedding applied to queries and keys before the scores; ``single_transformer_blocks.i``
    (single-stream) attend over the same concatenated sequence inside one stream.

    Words are T5's tokens (``tokenizer_2``, the pipeline's default 512-token window); the CLIP encoder
    only gives the pooled vector. The stored map is the image-query attention to a word's T5 keys, the
    softmax taken over all L + N keys. Default modules: the double-stream blocks (``--layers
    single_transformer_blocks`` reads the single-stream ones, or both with ``--layers transformer_blocks
    single_transformer_blocks``). A guidance-distilled model (``guidance_embeds``: FLUX.1-dev) is given
    the pipeline's default distilled guidance 3.5 in every call; ``--guidance`` is true classifier-free
    guidance with the empty text, as FluxPipeline's ``true_cfg_scale``.
    """

    pipeline_class = "FluxPipeline"
    text_first = True
    default_modules = ["transformer_blocks."]
    distilled_guidance = 3.5

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(path, dtype=dtype)
        if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
            raise ValueError(f"{path}: a Flux pipeline without its T5 encoder: Stage 1's words are T5's tokens")
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = pipe.transformer.to(self.device).eval().requires_grad_(False)
        self.unet = self.transformer
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False)
        self.clip = pipe.text_encoder.to(self.device).eval().requires_grad_(False)
        self.t5 = pipe.text_encoder_2.to(self.device).eval().requires_grad_(False)
        self.clip_tokenizer, self.tokenizer = pipe.tokenizer, pipe.tokenizer_2
        self.max_length = 512  # the pipeline's default max_sequence_length
        self.clip_length = int(pipe.tokenizer.model_max_length)
        self.text_keys = slice(0, self.max_length)
        # the image side: the VAE's configured sample size (1024 for FLUX.1), latents 2×2-packed into tokens
        self.image_size = int(self.vae.config.sample_size)
        self.latent_side = self.image_size // pipe.vae_scale_factor
        self.grid = self.latent_side // 2
        self.latent_channels = int(self.vae.config.latent_channels)
        self.pooled_dim = int(self.transformer.config.pooled_projection_dim)
        self.joint_dim = int(self.transformer.config.joint_attention_dim)
        self.schedule = FlowSchedule(pipe.scheduler, self.grid * self.grid)
        ids = torch.zeros(self.grid, self.grid, 3)
        ids[..., 1] = torch.arange(self.grid)[:, None]
        ids[..., 2] = torch.arange(self.grid)[None, :]
        self.img_ids = ids.reshape(-1, 3).to(self.device, dtype)  # (row, col) of each image token, as FluxPipeline
        self.txt_ids = torch.zeros(self.max_length, 3, device=self.device, dtype=dtype)
        self.unet_calls = 0

    @staticmethod
    def _is_joint(key: str) -> bool:
        parts = key.split(".")
        return len(parts) == 4 and parts[0] in ("transformer_blocks", "single_transformer_blocks") \
            and parts[2] == "attn"

    def _single_text_len(self, key: str) -> int | None:
        return self.max_length if key.startswith("single_transformer_blocks.") else None

    @staticmethod
    def _queries_keys(attn, hidden_states, encoder_hidden_states, image_rotary_emb=None, n_text=None):
        """Flux's image queries and all keys, (B, H, ·, d): projections, q/k RMS norms, text first,
        then the rotary embedding over the whole joint sequence — the order FluxAttnProcessor uses."""
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))  # (B, S, H, d)

        q, k = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        if encoder_hidden_states is not None:  # double-stream: the text's own projections, prepended
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        return q[:, n_text:].transpose(1, 2), k.transpose(1, 2)

    def _forward(self, x: torch.Tensor, t: float, emb: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens, pooled = unpack(emb, self.pooled_dim)
        # 2×2 patches of the (B, C, h, w) latent → (B, h/2 · w/2, 4C) tokens, row-major like img_ids
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        tt = torch.full((b,), t / self.schedule.num_train_timesteps, device=x.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance, device=x.device, dtype=torch.float32)
        v = self.transformer(hidden_states=packed.to(self.dtype), timestep=tt, guidance=guidance,
                             pooled_projections=pooled.to(self.dtype), encoder_hidden_states=tokens.to(self.dtype),
                             txt_ids=self.txt_ids, img_ids=self.img_ids).sample.float()
        return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def tokenize(self, texts: list[str]) -> dict:
        """T5's ids, offsets and special flags (the words; ``truncated`` beyond 512 tokens) and the CLIP
        ids (``clip_ids``, for the pooled vector only)."""
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        enc["truncated"] = [len(ids) > self.max_length for ids in full]
        enc["clip_ids"] = self.clip_tokenizer(texts, padding="max_length", max_length=self.clip_length,
                                              truncation=True, return_tensors="pt")["input_ids"]
        return enc

    @torch.inference_mode()
    def encode_prompts(self, enc: dict) -> torch.Tensor:
        """T5's last hidden state (B, 512, 4096) and CLIP's pooled output (B, 768), packed."""
        pooled = self.clip(enc["clip_ids"].to(self.device), output_hidden_states=False).pooler_output
        t5 = self.t5(enc["input_ids"].to(self.device))[0]
        return pack(t5.float(), pooled.float())


TEACHERS: dict[str, type] = {
    SDXLModel.pipeline_class: SDXLModel,
    SD3Model.pipeline_class: SD3Model,
    FluxModel.pipeline_class: FluxModel,
}
