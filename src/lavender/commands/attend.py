"""A VLM's per-word 32×32 text→image attention maps for one image and text: see where a model looks.

The text is placed as the assistant's answer to ``--prompt`` (the chat template of the model), and
its words are read exactly as training reads them (``--row-owner``, ``--align-on``, ``--layers``,
``--aggregation``, ``--frame``), so the maps are the ones Lavender would align.

Example:
    lavender attend --model runs/llava --image cat.jpg --text "a cat on a red sofa" \\
        --out cat.npz --png cat.png

The ``.npz`` holds ``words`` (str array), ``maps`` (float32, ``(n_words, 32, 32)``; ``heads`` maps
are averaged over heads), ``starts``/``ends`` (each word's character offsets in ``chat_text``, the
rendered chat the model saw) and ``layers``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from lavender.aligner import minmax
from lavender.vlm.aggregate import AGGREGATIONS, aggregate, keys_from_grids
from lavender.vlm.backend import CapturePlan, disable_capture, enable_capture
from lavender.vlm.rows import ALIGN_ON, ROW_OWNERS, offsets_from_plain, rows_for_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="VLM folder or hub id")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--text", required=True, help="the text whose words get maps (the assistant's answer)")
    parser.add_argument("--prompt", default="", help="the user's question before the answer (default: none)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--png", help="also write a figure: the image and one overlay per word")
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                        help="comma-separated layer indices to watch (default: the family's default layers)")
    parser.add_argument("--aggregation", default="mean-mean",
                        choices=[a for a in AGGREGATIONS if a != "learn"],
                        help="how heads and layers are pooled (default mean-mean)")
    parser.add_argument("--frame", default="squash", choices=("squash", "pad", "center-crop"),
                        help="the square frame the maps are drawn in (the attention dataset's frame)")
    parser.add_argument("--row-owner", default="next", choices=ROW_OWNERS,
                        help="next: the row before each word token (the paper's reading); query: its own rows")
    parser.add_argument("--align-on", default="answer", choices=ALIGN_ON,
                        help="answer: the --text words; all: every word after the image (prompt included)")
    parser.add_argument("--normalize", default="minmax", choices=("minmax", "none"),
                        help="per-map normalisation of the saved maps (minmax, like the attention dataset)")


def compute_word_maps(model: Any, processor: Any, family: Any, image: Any, text: str, prompt: str = "", *,
                      layers: list[int] | None = None, aggregation: str = "mean-mean", frame: str = "squash",
                      row_owner: str = "next", align_on: str = "answer") -> tuple[list[Any], torch.Tensor, str]:
    """``(words, maps (n_words, C, 32, 32), chat_text)`` of one image and answer text (library entry point).

    ``words`` are :class:`lavender.vlm.rows.WordRows` with offsets into ``chat_text``.
    """
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    messages = [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": text}]}]
    full = processor.apply_chat_template(messages, tokenize=False)
    start = full.rfind(text)
    if start < 0:
        raise ValueError(f"the chat template changed the text {text!r}; pass it as it would be rendered")
    inputs = processor(images=[[image]], text=[full], return_tensors="pt")
    ids = inputs["input_ids"]
    offsets = offsets_from_plain(processor.tokenizer, [full], ids)
    # labels: the answer's tokens (as a collator marks the assistant turn), from their offsets
    labels = torch.full_like(ids, -100)
    for i, (s, e) in enumerate(offsets[0]):
        if e > s and s >= start and e <= start + len(text):
            labels[0, i] = ids[0, i]
    batch = rows_for_batch([full], offsets, ids, family, model.config, attention_mask=inputs.get("attention_mask"),
                           labels=labels, align_on=align_on, row_owner=row_owner)
    if not batch.words[0]:
        return [], torch.zeros(0, 1, 32, 32), full
    grids = family.image_grids(inputs, [[image.size]], model.config, processor)
    keys, key_valid, chosen = keys_from_grids(grids, 1)
    capture = enable_capture(model, family, layers)
    watched = list(family.default_layers(model) if layers is None else layers)
    try:
        capture.arm(CapturePlan(watched, batch.rows, batch.row_valid, keys, key_valid))
        with torch.no_grad():
            model(**inputs)
        maps = aggregate(capture.maps, batch, chosen, aggregation, attention_mask=inputs.get("attention_mask"),
                         frame=frame)[0]
    finally:
        capture.clear()
        disable_capture(model, family)
    return batch.words[0], maps, full


def _framed_image(image: Any, frame: str, size: int = 256) -> np.ndarray:
    """The image as the frame shows it (what the maps are drawn over)."""
    from PIL import Image

    w, h = image.size
    if frame == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    elif frame == "center-crop":
        side = min(w, h)
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(image.resize((size, size)))


def write_figure(path: str, image: Any, words: list[str], maps: np.ndarray, frame: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _framed_image(image, frame)
    n = len(words) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    axes[0, 0].imshow(shown)
    axes[0, 0].set_title("image")
    for ax, word, m in zip(axes[0, 1:], words, maps):
        ax.imshow(shown)
        ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, shown.shape[1], shown.shape[0], 0), interpolation="bilinear")
        ax.set_title(word)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from lavender.vlm.families import family_for_path

    family = family_for_path(args.model)
    processor = family.load_processor(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        raise SystemExit(f"--image {args.image}: cannot read it as an image ({e})") from None
    words, maps, chat_text = compute_word_maps(model, processor, family, image, args.text, args.prompt, layers=args.layers,
                                    aggregation=args.aggregation, frame=args.frame, row_owner=args.row_owner,
                                    align_on=args.align_on)
    flat = maps.mean(dim=1)  # (n_words, 32, 32): heads averaged for the file
    if args.normalize == "minmax" and len(words):
        flat = minmax(flat)
    arr = flat.float().numpy().astype(np.float32)
    np.savez(args.out, words=np.array([w.text for w in words], dtype=str), maps=arr,
             starts=np.array([w.start for w in words]), ends=np.array([w.end for w in words]),
             chat_text=np.array(chat_text), layers=np.array(args.layers or family.default_layers(model)))
    if args.png:
        write_figure(args.png, image, [w.text for w in words], arr, args.frame)
    print(f"{len(words)} word maps → {args.out}" + (f", figure → {args.png}" if args.png else ""))
    if not words:
        print("no word of --text found among the answer tokens; check --align-on / --row-owner")
    return 0
