"""A tiny, randomly initialised Stable-Diffusion-architecture pipeline, built offline.

Used by tests and benchmarks so Stage 1 runs through the real diffusers code paths without a download.
The layout mirrors SD-1.x at a miniature scale:

- images are 64×64 px; the VAE downsamples by 2, so the latent is 4×32×32;
- the UNet (widths 16/32, 2 heads) has two ``CrossAttn`` down blocks and two ``CrossAttn`` up blocks, so cross-attention
  (``attn2``) exists at two resolutions, **32×32 and 16×16 attention maps** (the mid block is also at
  16×16) — the same side lengths as ``--resolutions``' default (16 and 32), which for SD-1.x at 512 px
  are the 32×32 and 16×16 levels of its 64/32/16/8 pyramid;
- the text encoder is a 2-layer CLIP of width 32, and the tokenizer a byte-level CLIP BPE whose
  vocabulary/merges are written here (whole-word merges for a few hundred common words, everything
  else falls back to characters — which gives the multi-token words the word-merging code must handle).

``make_tiny_dm(..., architecture="sd14")`` builds the same kind of pipeline at the real size of
Stable Diffusion 1.4 (random weights, float16), for GPU speed benchmarks and real-shape smoke tests
without hub access; see ``ARCHITECTURES``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

IMAGE_SIZE = 64

# Words that become single tokens; anything else is split into characters (multi-token words).
_WORDS = (
    "a an the of and in on at to with is are was be this that it there what which where how many "
    "red green blue yellow black white orange purple pink grey gray brown "
    "circle square triangle star cross shape shapes object objects left right above below top bottom "
    "big small large tiny dog cat photo picture image man woman person sitting standing next near "
    "car tree house table chair one two three four five yes no color colour"
).split()


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte→printable-character table (so every byte has a vocab entry)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE: all bytes (with and without ``</w>``), then left-to-right merges of ``_WORDS``."""
    chars = list(byte_alphabet().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(tokens)
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{cur} {nxt}"
            cur = cur + nxt
            if cur not in seen:
                merges.append(merge)
                tokens.append(cur)
                seen.add(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out: str | Path, vocab: dict[str, int], merges: list[str]):
    """Write a CLIP BPE (``vocab.json``, ``merges.txt``) to ``out`` and return the ``CLIPTokenizer`` it loads as.

    Loading from the written files is the same path a hub checkpoint's tokenizer takes.
    """
    from transformers import CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=77)
    tok.save_pretrained(out)
    return tok


def make_tokenizer(out: str | Path):
    """The tiny DM's CLIP tokenizer (:func:`build_vocab_and_merges`), written to ``out``."""
    return write_clip_tokenizer(out, *build_vocab_and_merges())


# Sizes per architecture: keyword arguments of UNet2DConditionModel, AutoencoderKL and CLIPTextConfig
# (on top of the shared ones set in make_tiny_dm), the image side (None: the caller's ``image_size``)
# and the dtype the weights are saved in.
# The real-size parts several released pipelines share: SD's VAE shape (latent channels and scaling
# differ per model, set beside each use), CLIP ViT-L/14 and OpenCLIP bigG text encoders, T5-XXL's encoder.
_SD_VAE: dict = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                 "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
_CLIP_L: dict = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768}
_CLIP_BIGG: dict = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                    "projection_dim": 1280, "hidden_act": "gelu"}
_T5_XXL: dict = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
                 "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}

ARCHITECTURES: dict[str, dict] = {
    "tiny": {
        "image_size": None,
        "dtype": torch.float32,
        "unet": {
            "layers_per_block": 1,
            "block_out_channels": (16, 32),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 2,  # diffusers' legacy name: this is the number of heads
            "norm_num_groups": 8,
        },
        "vae": {
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (16, 32),
            "norm_num_groups": 8,
        },
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 32},
    },
    # the shapes of CompVis/stable-diffusion-v1-4 (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder parameters)
    "sd14": {
        "image_size": 512,
        "dtype": torch.float16,  # halves the ~4 GB of float32 weights
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            **_SD_VAE,
            "scaling_factor": 0.18215,
        },
        "text": _CLIP_L,
    },
    # SDXL: no cross-attention at the highest UNet resolution (its first block is a plain DownBlock2D),
    # cross_attention_dim = the two text encoders' widths concatenated, "text_time" added conditioning
    # (pooled text of the second encoder + 6 size/crop ids, each embedded in addition_time_embed_dim).
    "sdxl": {
        "pipeline": "sdxl",
        "image_size": None,
        "dtype": torch.float32,
        "unet": {
            "layers_per_block": 1,
            "block_out_channels": (16, 32, 32),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (2, 2, 2),
            "cross_attention_dim": 64,  # 32 (text_encoder) + 32 (text_encoder_2)
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * 6 + 32,  # 6 time ids + pooled text (projection_dim)
            "norm_num_groups": 8,
        },
        "vae": {
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (16, 32),
            "norm_num_groups": 8,
        },
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 32},
        "text_2": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "projection_dim": 32, "hidden_act": "gelu"},
    },
    # the shapes of stabilityai/stable-diffusion-xl-base-1.0 (UNet 2.57B, CLIP ViT-L + OpenCLIP bigG encoders)
    "sdxl-base": {
        "pipeline": "sdxl",
        "image_size": 1024,
        "dtype": torch.float16,
        "unet": {
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        },
        "vae": {
            **_SD_VAE,
            "scaling_factor": 0.13025,
        },
        "text": _CLIP_L,
        "text_2": _CLIP_BIGG,
    },
    # SD3 (MM-DiT): 16-channel VAE latents cut into 2×2 patches; the text is two CLIP encoders' tokens
    # (widths concatenated, zero-padded to T5's) followed by T5's tokens, and both CLIPs' pooled outputs.
    "sd3": {
        "pipeline": "sd3",
        "image_size": None,
        "dtype": torch.float32,
        "transformer": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "caption_projection_dim": 16, "pooled_projection_dim": 24, "pos_embed_max_size": 32,
                        "qk_norm": "rms_norm"},  # SD3.5's q/k norms, so the capture's norm path is exercised
        "vae": {
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (16, 32),
            "norm_num_groups": 8,
            "latent_channels": 16,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "projection_dim": 8},
        "text_2": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "projection_dim": 16, "hidden_act": "gelu"},
        "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
               "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
        "shift": 3.0,
    },
    # the shapes of stabilityai/stable-diffusion-3-medium-diffusers (MM-DiT 24 blocks of width 1536,
    # CLIP ViT-L + OpenCLIP bigG + T5-XXL encoder)
    "sd3-medium": {
        "pipeline": "sd3",
        "image_size": 1024,
        "dtype": torch.float16,
        "transformer": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
        "vae": {
            **_SD_VAE,
            "latent_channels": 16,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text": _CLIP_L,
        "text_2": _CLIP_BIGG,
        "t5": _T5_XXL,
        "shift": 3.0,
    },
    # FLUX.1 (MM-DiT, flow matching): 16-channel latents packed 2×2 into 64-wide tokens, double-stream
    # blocks (text first) then single-stream blocks, 3-axis rotary positions, T5 tokens + CLIP pooled
    # vector, distilled guidance embedding (as FLUX.1-dev), resolution-dependent scheduler shift.
    "flux": {
        "pipeline": "flux",
        "image_size": None,
        "dtype": torch.float32,
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 1,
                        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 16, "guidance_embeds": True, "axes_dims_rope": (2, 2, 4)},
        "vae": {
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (16, 32),
            "norm_num_groups": 8,
            "latent_channels": 16,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "projection_dim": 16},
        "t5": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
               "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
    },
    # the shapes of black-forest-labs/FLUX.1-dev (MM-DiT 19 double + 38 single blocks of width 3072,
    # CLIP ViT-L + T5-XXL encoder)
    "flux-dev": {
        "pipeline": "flux",
        "image_size": 1024,
        "dtype": torch.bfloat16,
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
        "vae": {
            **_SD_VAE,
            "latent_channels": 16,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        "text": _CLIP_L,
        "t5": _T5_XXL,
    },
}


def _make_flux(out: Path, arch: dict, seed: int, image_size: int) -> Path:
    """A random ``FluxPipeline`` with ``arch``'s sizes, saved to ``out``. The image side is recorded as
    the VAE's ``sample_size`` (Stage 1 reads it from there: Flux's transformer has no sample size), and
    the scheduler is FLUX.1-dev's (flow-matching Euler, shift 3, dynamic resolution shift)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = make_tokenizer(out / "tokenizer")
    tokenizer_2 = make_t5_tokenizer(out / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**arch["transformer"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=image_size, **arch["vae"])
    text_encoder = CLIPTextModel(_clip_config(tokenizer, arch["text"]))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id, **arch["t5"]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    if arch["dtype"] != torch.float32:
        pipe.to(arch["dtype"])
    pipe.save_pretrained(out)
    return out


def make_t5_tokenizer(out: str | Path):
    """A small offline T5 tokenizer (SentencePiece-style Unigram with ``▁`` word starts): whole-word
    pieces for ``_WORDS``, single characters for everything else (multi-token words, as with CLIP's
    BPE), ``</s>`` appended, ``<pad>`` padding; written to ``out`` and loaded back from there."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in _WORDS] + [("▁", -3.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(out)
    return T5TokenizerFast.from_pretrained(out)


def _make_sd3(out: Path, arch: dict, seed: int, image_size: int) -> Path:
    """A random ``StableDiffusion3Pipeline`` with ``arch``'s sizes, saved to ``out`` (flow-matching Euler
    scheduler with SD3's shift 3)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    tokenizer = make_tokenizer(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer", pad_token="!")
    tokenizer_3 = make_t5_tokenizer(out / "tokenizer_3")
    vae_factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=image_size // vae_factor, **arch["transformer"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=image_size, **arch["vae"])
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, arch["text"]))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, arch["text_2"]))
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), pad_token_id=tokenizer_3.pad_token_id,
                                             eos_token_id=tokenizer_3.eos_token_id, **arch["t5"]))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=arch["shift"]), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    if arch["dtype"] != torch.float32:
        pipe.to(arch["dtype"])
    pipe.save_pretrained(out)
    return out


def _clip_config(tokenizer, sizes: dict):
    """A CLIPTextConfig of ``sizes`` whose vocabulary and special ids are ``tokenizer``'s."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def _make_sdxl(out: Path, arch: dict, seed: int, image_size: int) -> Path:
    """A random ``StableDiffusionXLPipeline`` with ``arch``'s sizes, saved to ``out``.

    Both tokenizers are lavender's small CLIP BPE; the second pads with ``!`` as SDXL's OpenCLIP
    tokenizer does, so its ids differ from the first's only in the padding (as in the real model)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = make_tokenizer(out / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out / "tokenizer", pad_token="!")
    vae_factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=image_size // vae_factor, in_channels=4, out_channels=4, **arch["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, **arch["vae"])
    text_encoder = CLIPTextModel(_clip_config(tokenizer, arch["text"]))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, arch["text_2"]))
    # SDXL base's scheduler config (Euler, leading spacing, offset 1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    if arch["dtype"] != torch.float32:
        pipe.to(arch["dtype"])
    pipe.save_pretrained(out)
    return out


def make_tiny_dm(out: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE,
                 architecture: str = "tiny") -> Path:
    """Build a random pipeline with weights from ``seed`` and ``save_pretrained`` it to ``out``.

    Loadable with ``StableDiffusionPipeline.from_pretrained(out)``, exactly like a hub checkpoint.

    ``architecture="tiny"`` (default) is the miniature described in the module docstring: ``image_size``
    (a multiple of 4) sets the latent side (``image_size / 2``); cross-attention maps have side lengths
    ``image_size / 2`` and ``image_size / 4`` (tests use 32 px: sides 16 and 8, 4× cheaper).

    ``architecture="sd14"`` has the exact shapes of CompVis/stable-diffusion-v1-4 (512 px images, 64×64
    latents, cross-attention maps of side 64/32/16/8, a 12-layer width-768 CLIP text encoder) with random
    weights saved in float16 (~2 GB); ``image_size`` is ignored. It exists for GPU speed benchmarks and
    smoke tests of real-size shapes and memory where no hub checkpoint can be downloaded. Its maps are
    meaningless (random weights) and the tokenizer is still lavender's small offline CLIP BPE.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    image_size = arch["image_size"] or image_size
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch.get("pipeline") == "sdxl":
        return _make_sdxl(out, arch, seed, image_size)
    if arch.get("pipeline") == "sd3":
        return _make_sd3(out, arch, seed, image_size)
    if arch.get("pipeline") == "flux":
        return _make_flux(out, arch, seed, image_size)
    tokenizer = make_tokenizer(out / "tokenizer")
    vae_factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=image_size // vae_factor, in_channels=4, out_channels=4,
                                **arch["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size,
                        **arch["vae"])
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **arch["text"],
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if arch["dtype"] != torch.float32:
        pipe.to(arch["dtype"])
    pipe.save_pretrained(out)
    return out
