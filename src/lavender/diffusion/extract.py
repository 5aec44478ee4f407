"""Stage 1 end to end: records → per-word DM attention maps in an attention dataset.

The loop is batched (``batch_size`` images per UNet call), resumable (ids already in complete shards
are skipped) and sharded across ``accelerate launch`` processes (record i goes to process
``i % num_processes``; each writes its own shards; the folder is one dataset). Bad records are written
to the errors file and skipped (``strict`` stops at the first). See docs/stage1.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lavender.attnstore import AttentionWriter, stored_fingerprints, update_counts
from lavender.config import DTYPE_NAMES, FRAMES, NORMALIZATIONS, RECIPES, ExtractConfig, LavenderError  # noqa: F401
from lavender.diffusion.capture import AttentionAccumulator, cross_attention_sides, install_capture
from lavender.diffusion.inversion import NoiseSchedule, run_ddim, run_noise, run_nulltext
from lavender.frames import PAD_FILL, frame_image  # noqa: F401  (Stage 1's frame, re-exported)
from lavender.maps import minmax
from lavender.records import Record, RecordError, dm_text, iter_records, load_image
from lavender.versions import software_versions
from lavender.words import split_words, word_token_spans

log = logging.getLogger("lavender.extract")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}



# --------------------------------------------------------------------------------------- the model
class DiffusionModel:
    """The parts of a diffusers Stable Diffusion pipeline Stage 1 uses, with a UNet-call counter.

    The SD-1.x/2.x teacher; the others (SDXL, SD3, Flux) are in :mod:`lavender.diffusion.teachers` and
    :func:`load_teacher` picks one from the pipeline folder. What the Extractor asks of any teacher:
    ``attention_sides``, ``default_resolutions``, ``default_modules``, ``install_capture``, ``tokenize``,
    ``encode_prompts``, ``null_embedding``, ``encode_images`` and a denoiser call (``eps`` here).
    """

    pipeline_class = "StableDiffusionPipeline"
    flow = False  # a DDPM-style (ε / v) model, not a flow-matching one
    default_modules: list[str] | None = None  # every cross-attention module at the chosen sides

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False,
                                                       feature_extractor=None, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self._setup(pipe, path, device, dtype)

    def _setup(self, pipe, path: str, device: str | torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = pipe.unet.to(self.device).eval().requires_grad_(False)
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False)
        self.text_encoder = pipe.text_encoder.to(self.device).eval().requires_grad_(False)
        self.tokenizer = pipe.tokenizer
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{path}: scheduler prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon or v_prediction)")
        self.vae_scale = pipe.vae_scale_factor
        self.image_size = int(pipe.unet.config.sample_size) * self.vae_scale
        self.latent_side = int(pipe.unet.config.sample_size)
        self.max_length = int(self.tokenizer.model_max_length)
        self.unet_calls = 0  # UNet evaluations, counted per image in the summary

    def eps(self, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
        """Predicted noise in float32 for float32 latents ``x`` (B, C, h, w) and text ``emb`` (B, 77, D)."""
        self.unet_calls += x.shape[0]
        tt = torch.full((x.shape[0],), max(t, 0), device=x.device, dtype=torch.long)
        out = self._unet(x, tt, emb)
        if self.prediction_type == "v_prediction":  # SD-2.x 768: v = sqrt(a)·eps - sqrt(1-a)·x0  →  eps
            a = self.schedule.alpha(max(t, 0))
            out = a**0.5 * out + (1 - a) ** 0.5 * x
        return out

    def _unet(self, x: torch.Tensor, tt: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The UNet's raw prediction in float32 (SDXL overrides this to unpack its added conditioning)."""
        return self.unet(x.to(self.dtype), tt, emb.to(self.dtype)).sample.float()

    def attention_sides(self) -> dict[str, int]:
        """Processor key → attention-map side of every cross-attention module (one probe UNet call)."""
        return cross_attention_sides(self.unet, self.latent_side)

    def default_resolutions(self, sides: dict[str, int]) -> list[int]:
        """``--resolutions`` when none is given: SD-1.x's 16 and 32 (the 512-px pyramid's middle levels)."""
        return [16, 32]

    def install_capture(self, store: AttentionAccumulator, sides: dict[str, int],
                        modules: list[str] | None) -> list[str]:
        return install_capture(self.unet, store, sides, modules)

    def encode_prompts(self, enc: dict) -> torch.Tensor:
        """The conditioning tensor the denoiser call takes, for :meth:`tokenize`'s output."""
        return self.encode_text(enc["input_ids"])

    def null_embedding(self) -> torch.Tensor:
        """The unconditional ("") conditioning, batch 1."""
        return self.encode_prompts(self.tokenize([""]))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → latent means × scaling factor, float32 (B, 4, h, w)."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float() * self.vae.config.scaling_factor

    def tokenize(self, texts: list[str]) -> dict:
        """Token ids (B, 77), per-token offsets and special flags, and which texts were truncated."""
        full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        enc["truncated"] = [len(ids) > self.max_length for ids in full]
        return enc

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # SD-1.x/2.x condition on the last hidden state; no attention mask unless the encoder asks for one
        return self.text_encoder(input_ids.to(self.device))[0].float()


def load_teacher(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The teacher for the pipeline at ``path``, chosen by the class its ``model_index.json`` names:
    SD-1.x/2.x (:class:`DiffusionModel`), SDXL, SD3 or Flux (:mod:`lavender.diffusion.teachers`)."""
    from lavender.diffusion.teachers import TEACHERS, pipeline_class_of

    name = pipeline_class_of(path)
    if name is None or name == DiffusionModel.pipeline_class:
        return DiffusionModel(path, device, dtype)
    if name not in TEACHERS:
        raise LavenderError(f"--dm {path}: its pipeline is a {name}; Stage 1 reads "
                            f"{', '.join([DiffusionModel.pipeline_class, *TEACHERS])}")
    return TEACHERS[name](path, device, dtype)


# ---------------------------------------------------------------------------------------- frames
def to_pixels(images: list) -> torch.Tensor:
    """PIL RGB images of one size → (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------- words
def words_from_token_maps(text: str, offsets: list[tuple[int, int]], special: list[bool], token_maps: torch.Tensor,
              normalize: str = "minmax") -> tuple[list[str], list[tuple[int, int]], np.ndarray, int]:
    """One map per word occurrence: mean of its tokens' maps, then normalised.

    Args:
        token_maps: (T, S, S) maps of the text's tokens (index = token position).
    Returns (words, offsets, maps (n_words, S, S) float32, n_words_lost_to_truncation). BOS/EOS/padding
    (special or empty-span tokens) belong to no word. ``minmax`` scales each map to [0, 1] (a constant
    map becomes all zeros); ``none`` keeps mean attention probabilities.
    """
    words = split_words(text)
    spans = word_token_spans(words, offsets, special)
    kept_w, kept_o, maps = [], [], []
    lost = 0
    for w, toks in zip(words, spans):
        if not toks:
            lost += 1  # every token of the word fell beyond the 77-token window
            continue
        m = token_maps[toks].mean(0)  # (S, S)
        if normalize == "minmax":
            m = minmax(m, eps=0.0)
        kept_w.append(w.text)
        kept_o.append((w.start, w.end))
        maps.append(m)
    side = token_maps.shape[-1]
    arr = torch.stack(maps).cpu().numpy() if maps else np.zeros((0, side, side), np.float32)
    return kept_w, kept_o, arr, lost


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def record_fingerprint(rec: Record, qa_text: str) -> dict:
    """What an example's maps were computed from: its DM text and image CONTENT (hashes), plus the
    image file's (size, mtime) so a resume re-reads only images whose file changed. Folder-wide
    inputs (the DM's weights, the recipe, the frame, preprocessing) are in the manifest instead."""
    path = Path(rec.images[0])
    st = path.stat()
    return {"fp": {"text": _sha(dm_text(rec, qa_text).encode("utf-8")), "image": _sha(path.read_bytes()),
                   "image_stat": [st.st_size, st.st_mtime_ns]}}


def fingerprint_matches(stored: dict | None, rec: Record, qa_text: str) -> bool:
    """Whether ``rec`` is what the stored maps were computed from. An example stored without a
    fingerprint (an older Lavender) is trusted, as before; a missing image file is not a match."""
    if stored is None:
        return True
    if stored.get("text") != _sha(dm_text(rec, qa_text).encode("utf-8")):
        return False
    try:
        path = Path(rec.images[0])
        st = path.stat()
        if [st.st_size, st.st_mtime_ns] == stored.get("image_stat"):
            return True
        return stored.get("image") == _sha(path.read_bytes())
    except OSError:
        return False


def records_to_do(records: list[Record], stored: dict[str, dict | None], qa_text: str
                  ) -> tuple[list[Record], set[str]]:
    """The records a (resumed) run must compute — not stored yet, or stored from a text or image that
    has changed since (recomputed, never reused) — and the ids of the latter."""
    todo, redo = [], set()
    for r in records:
        if r.id not in stored:
            todo.append(r)
        elif not fingerprint_matches(stored[r.id], r, qa_text):
            todo.append(r)
            redo.add(r.id)
    return todo, redo


def dm_weights_fingerprint(path: str) -> str:
    """The DM's identity by CONTENT, not by path: for a local folder, a hash over every weights file's
    name, size and 16 chunks of 64 KiB spread through it (a retrained or fine-tuned model differs
    everywhere; hashing whole multi-GB files at every start would not pay); a hub id is itself."""
    root = Path(path)
    if not root.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


# Changes to how images are read before the DM sees them (EXIF orientation, mode conversion, framing
# code) bump this, so a folder extracted before a change is never resumed with maps of both kinds.
PREPROCESSING_VERSION = 2


def record_noise(ids: list[str], like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise shaped like ``like`` (B, C, h, w), image ``j``'s drawn from a generator seeded by
    ``crc32(ids[j])``: a record gets the same noise whatever its batch, process or resume point."""
    gens = [torch.Generator().manual_seed(zlib.crc32(i.encode("utf-8"))) for i in ids]
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like.device, like.dtype)


# ---------------------------------------------------------------------------------------- the loop
class Extractor:
    """A loaded DM with capture installed; ``extract_batch`` turns records into word maps."""

    def __init__(self, cfg: ExtractConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.dm = load_teacher(cfg.dm, device, DTYPES[cfg.dtype])
        check = getattr(self.dm, "check_recipe", None)
        if check is not None:
            check(cfg.recipe)
        self.sides = self.dm.attention_sides()
        if cfg.resolutions is None:  # the teacher's own default, recorded in the manifest as given
            cfg.resolutions = self.dm.default_resolutions(self.sides)
        self.store = AttentionAccumulator(cfg.resolutions, cfg.batch_size, self.dm.max_length, self.dm.device)
        self.captured = self.dm.install_capture(self.store, self.sides, cfg.modules or self.dm.default_modules)
        top = self.dm.schedule.num_train_timesteps
        if cfg.recipe == "noise" and max(cfg.timesteps) >= top:
            raise LavenderError(f"--timesteps {cfg.timesteps}: this DM's scheduler has {top} timesteps; "
                                f"give values in 0..{top - 1}")
        self.dm.unet_calls = 0
        with torch.inference_mode():
            self.null_emb = self.dm.null_embedding()  # (1, 77, D) for SD-1.x

    def manifest(self) -> dict:
        c = self.cfg
        if c.recipe == "noise":
            recipe = {"name": "noise", "timesteps": c.timesteps, "noise": "per record: torch.Generator(crc32(id))"}
        else:
            recipe = {"name": c.recipe, "steps": c.steps, "guidance": c.guidance}
            recipe.update({"inversion_steps": c.inversion_steps} if c.recipe == "ddim" else {"inner_steps": c.inner_steps})

        return {
            "dm": {"class": self.dm.pipeline_class, "image_size": self.dm.image_size,
                   "weights": dm_weights_fingerprint(str(c.dm))},
            "dm_path": str(c.dm),  # informational: the same weights under another path resume fine
            "preprocessing": PREPROCESSING_VERSION,
            "recipe": recipe,
            "map_size": c.map_size,
            "resolutions": c.resolutions,
            "captured_modules": self.captured,
            "modules_by_resolution": {str(side): [k for k in self.captured if self.sides[k] == side]
                                      for side in c.resolutions},
            "normalization": c.normalize,
            "frame": {"mode": c.frame, **({"fill": list(PAD_FILL), "anchor": "center"} if c.frame == "pad" else {})},
            "text": {"source": "align_text, else caption, else conversation", "qa_text": c.qa_text,
                     "tokenizer": type(self.dm.tokenizer).__name__, "max_length": self.dm.max_length},
            "compute_dtype": c.dtype,
            "dtype": "float16",
            "software": software_versions(),
        }

    def extract_batch(self, records: list[Record], images: list) -> tuple[list[dict], float]:
        """Maps for up to ``batch_size`` records with loaded PIL images; returns per-record results and the
        mean latent reconstruction MSE of the batch (how well the recipe inverted the images)."""
        c, dm = self.cfg, self.dm
        n = len(records)
        texts = [dm_text(r, c.qa_text) for r in records]
        pixels = to_pixels([frame_image(im, dm.image_size, c.frame) for im in images])
        x0 = dm.encode_images(pixels)
        enc = dm.tokenize(texts)
        cond = dm.encode_prompts(enc)
        uncond = self.null_emb.expand(n, -1, -1)
        self.store.reset(n)
        if dm.flow:
            x_rec = dm.run_recipe(c, x0, cond, uncond, self.store, [r.id for r in records])
        elif c.recipe == "noise":
            x_rec = run_noise(dm.eps, x0, cond, dm.schedule, self.store, c.timesteps,
                              record_noise([r.id for r in records], x0))
        elif c.recipe == "ddim":
            x_rec = run_ddim(dm.eps, x0, cond, uncond, dm.schedule, self.store, c.steps, c.inversion_steps, c.guidance)
        else:
            x_rec = run_nulltext(dm.eps, x0, cond, uncond, dm.schedule, self.store, c.steps, c.inner_steps,
                                 c.guidance)
        mse = float(((x_rec - x0) ** 2).mean())
        token_maps = self.store.token_maps(c.map_size)  # (n, 77, S, S)
        out = []
        for j, (rec, text, im) in enumerate(zip(records, texts, images)):
            offsets = [tuple(o) for o in enc["offset_mapping"][j].tolist()]
            special = [bool(s) for s in enc["special_tokens_mask"][j].tolist()]
            words, offs, maps, lost = words_from_token_maps(text, offsets, special, token_maps[j], c.normalize)
            out.append({"id": rec.id, "words": words, "offsets": offs, "maps": maps, "truncated": enc["truncated"][j],
                        "words_lost": lost, "image_size": list(im.size)})
        return out, mse


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def run_extract(cfg: ExtractConfig, progress: bool | None = None) -> dict:
    """Run Stage 1 for this process's share of the records; returns the summary (all processes merged).

    Raises :class:`RecordError` on the first bad record when ``cfg.strict``. ``progress`` overrides
    ``cfg.progress`` (the bar).
    """
    progress = cfg.progress if progress is None else progress
    from accelerate import PartialState

    # accelerate only treats a multi-process launch without an accelerator as MULTI_CPU (gloo) when told cpu=True
    on_cpu = (cfg.device or "").startswith("cpu") or not torch.accelerator.is_available()
    state = PartialState(cpu=on_cpu)
    rank, world = state.process_index, state.num_processes
    if world > 1:  # a worker of a launcher: die with it, never write on as an orphan
        from lavender.locks import die_with_parent

        die_with_parent()
    device = cfg.device or ("cpu" if state.device.type == "mps" else str(state.device))
    # First pass over the file, before any model is loaded (so --strict fails fast): every process reads
    # all rows (cheap) so duplicate ids are found globally, and keeps row i iff i % world == rank.
    mine_ok: list[Record] = []
    bad: list[tuple[int, str | None, str]] = []
    seen: set[str] = set()
    for i, r in enumerate(iter_records(cfg.data, cfg.images_root)):
        if cfg.limit is not None and i >= cfg.limit:
            break
        mine = i % world == rank
        if isinstance(r, RecordError):
            if mine:
                bad.append((r.index, r.record_id, r.reason))
        elif r.id in seen:
            if mine:
                bad.append((r.index, r.id, f"duplicate id {r.id!r}; ids must be unique (maps are keyed by id)"))
        else:
            seen.add(r.id)
            if mine:
                mine_ok.append(r)
    if cfg.strict and bad:
        raise RecordError(*bad[0])
    if not mine_ok and not bad and rank == 0 and world == 1:
        raise LavenderError(f"--data {cfg.data}: no records in the file (it is empty); nothing to extract")

    if cfg.dry_run:
        return dry_run(cfg, device, mine_ok, bad)
    from lavender.locks import hold_folder

    with hold_folder(cfg.out, rank, "extraction"):
        return _extract(cfg, state, rank, world, device, mine_ok, bad, progress)


def evals_per_image(cfg: ExtractConfig) -> float:
    """UNet evaluations per image of the recipe (``nulltext``: its upper bound, before early stops)."""
    if cfg.recipe == "noise":
        return float(len(cfg.timesteps))
    if cfg.recipe == "ddim":
        return float(cfg.inversion_steps + cfg.steps * (1 if cfg.guidance == 1.0 else 2))
    return float(cfg.steps + cfg.steps * (cfg.inner_steps + 2))


def dry_run(cfg: ExtractConfig, device: str, mine_ok: list[Record], bad: list) -> dict:
    """What ``extract`` would do, without writing: records still to do (after resume, fingerprints
    checked), evaluations per image, and a time estimate from one timed batch of UNet calls on
    ``device`` (VAE encode included; capture, word merging and I/O not).

    The teacher is set up as a real run sets it up (:class:`Extractor`: recipe, resolutions, modules
    and timesteps checked, capture installed but idle), so a choice a real run refuses is refused
    here with the same line, never estimated."""
    import json as _json

    out = Path(cfg.out)
    todo, _ = records_to_do(mine_ok, stored_fingerprints(out), cfg.qa_text)
    dm = Extractor(cfg, device).dm
    n = min(cfg.batch_size, max(1, len(todo)))
    pixels = torch.zeros(n, 3, dm.image_size, dm.image_size, device=dm.device)
    with torch.inference_mode():
        emb = dm.encode_prompts(dm.tokenize(["a photo"] * n))
        x = torch.randn_like(dm.encode_images(pixels))
        forward = dm.velocity if dm.flow else dm.eps
        forward(x, 500, emb)  # warm-up
        if dm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dm.encode_images(pixels)
        t_vae = time.perf_counter() - t0
        t0 = time.perf_counter()
        forward(x, 500, emb)
        if dm.device.type == "cuda":
            torch.cuda.synchronize()
        t_unet = time.perf_counter() - t0
    per_image = (t_vae + evals_per_image(cfg) * t_unet) / n
    summary = {"dry_run": True, "records": len(mine_ok), "to_do": len(todo), "already_stored": len(mine_ok) - len(todo),
               "bad_records": len(bad), "recipe": cfg.recipe, "unet_evals_per_image": evals_per_image(cfg),
               "seconds_per_image": per_image, "estimated_seconds": per_image * len(todo), "device": str(dm.device),
               "batch_size": n}
    line = (f"extract --dry-run: {len(todo)} of {len(mine_ok)} records to do ({len(mine_ok) - len(todo)} already "
            f"stored, {len(bad)} bad); recipe {cfg.recipe}: {evals_per_image(cfg):g} UNet evaluations/image; "
            f"≈ {per_image:.3g} s/image on {dm.device} at batch {n} → ≈ {per_image * len(todo) / 60:.1f} min")
    print(_json.dumps(summary) if cfg.json else line)
    return summary


def _extract(cfg: ExtractConfig, state: Any, rank: int, world: int, device: str, mine_ok: list[Record],
             bad: list[tuple[int, str | None, str]], progress: bool) -> dict:
    """The extraction loop of :func:`run_extract`, run while this process holds the output folder."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    ext = Extractor(cfg, device)
    writer = AttentionWriter(cfg.out, ext.manifest(), rank=rank, shard_size=cfg.shard_size)
    stats = {"done": 0, "skipped": 0, "failed": 0, "truncated": 0, "words": 0, "seconds": 0.0, "unet_evals": 0,
             "recon_mse_sum": 0.0}

    def fail(index: int, rid: str | None, reason: str) -> None:
        stats["failed"] += 1
        writer.add_error(index, rid, reason)
        if cfg.strict:
            writer.close()
            raise RecordError(index, rid, reason)

    for b in bad:
        fail(*b)
    todo, redo = records_to_do(mine_ok, writer.done_fingerprints(), cfg.qa_text)
    stats["skipped"] = len(mine_ok) - len(todo)
    stats["redone"] = len(redo)
    if redo:
        log.warning("%d record(s) changed since their maps were stored (text or image); recomputing them", len(redo))

    bar = tqdm(total=len(todo), disable=not progress or rank != 0, desc="extract", unit="img")
    t0 = time.perf_counter()
    try:
        pending: list[tuple[Record, object]] = []

        def run(batch: list[tuple[Record, object]]) -> None:
            calls0 = ext.dm.unet_calls
            results, mse = ext.extract_batch([r for r, _ in batch], [im for _, im in batch])
            stats["unet_evals"] += ext.dm.unet_calls - calls0
            stats["recon_mse_sum"] += mse * len(batch)
            for (rec, _), res in zip(batch, results):
                if not res["words"]:
                    text = dm_text(rec, cfg.qa_text)
                    where = "inside the DM's 77-token window" if res["truncated"] else "(only punctuation/spaces)"
                    fail(rec.index, rec.id, f"the DM text {text[:40]!r} has no words {where}; fix the text")
                    continue
                if res["truncated"]:
                    stats["truncated"] += 1
                    log.warning("record %d (id %r): text longer than %d DM tokens was truncated; %d word(s) "
                                "beyond it got no map", rec.index, rec.id, ext.dm.max_length, res["words_lost"])
                writer.add(rec.id, res["words"], res["offsets"], res["maps"],
                           extra={"image_size": res["image_size"], "truncated": res["truncated"],
                                  "words_lost": res["words_lost"], **record_fingerprint(rec, cfg.qa_text),
                                  **({"redo": True} if rec.id in redo else {})})
                stats["done"] += 1
                stats["words"] += len(res["words"])
            bar.update(len(batch))

        for rec in todo:
            try:
                img = load_image(rec.images[0])
            except ValueError as e:
                fail(rec.index, rec.id, str(e))
                bar.update(1)
                continue
            pending.append((rec, img))
            if len(pending) == cfg.batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    finally:
        writer.close()
        bar.close()
    stats["seconds"] = time.perf_counter() - t0

    merged = gather_object([stats]) if world > 1 else [stats]
    state.wait_for_everyone()
    summary = {k: sum(s[k] for s in merged) for k in stats}
    summary["seconds"] = max(s["seconds"] for s in merged)
    summary["images_per_s"] = summary["done"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    summary["unet_evals_per_image"] = summary["unet_evals"] / summary["done"] if summary["done"] else 0.0
    summary["recon_mse"] = summary.pop("recon_mse_sum") / summary["done"] if summary["done"] else math.nan
    summary["processes"] = world
    summary["config"] = asdict(cfg)
    if rank == 0:
        summary["dataset"] = update_counts(cfg.out)
    state.wait_for_everyone()
    summary["out"] = str(Path(cfg.out))
    return summary
