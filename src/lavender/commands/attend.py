"""A VLM's per-word 32×32 text→image attention maps for one image and text: see where a model looks.

The text is placed as the assistant's answer to ``--prompt`` (the chat template of the model), and
its words are read by training's own code path — the collator (chat layout, labels, word rows) and
the capture — with ``--row-owner``, ``--align-on``, ``--layers``, ``--aggregation``, ``--frame``, so
the maps are the ones Lavender would align. ``--model`` may be a `lavender train` RUN_DIR: the
adapter is applied and the run's saved alignment is the default (flags override it).

Example:
    lavender attend --model runs/llava --image cat.jpg --text "a cat on a red sofa" \\
        --out cat.npz --png cat.png

The ``.npz`` holds ``words`` (str array), ``maps`` (float32, ``(n_words, 32, 32)``; ``heads`` maps
are averaged over heads), ``starts``/``ends`` (each word's character offsets in ``chat_text``, the
rendered chat the model saw) and ``layers``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lavender.config import AlignmentConfig, AttendConfig, saved_alignment

CONFIGS = (AttendConfig, AlignmentConfig)


def defaults(namespace: Any) -> dict[str, Any] | None:
    """A run folder's saved alignment is the default reading of its maps."""
    return saved_alignment(getattr(namespace, "model", None))


class _AllWords:
    """A one-example attention dataset whose words are every word of the texts (maps empty).

    Given to the collator instead of a real dataset, it makes the collator keep every word that
    training WOULD align (after ``align_on``/``row_owner``), with no DM involved.
    """

    def __init__(self, rec_id: str, texts: list[str], frame: str, size: int = 32) -> None:
        from lavender.words import split_words

        self.rec_id = rec_id
        self.words = [w.text for t in texts for w in split_words(t)]
        self.manifest = {"map_size": size, "frame": frame}
        self.size = size

    def __contains__(self, rec_id: str) -> bool:
        return rec_id == self.rec_id

    def get(self, rec_id: str) -> dict[str, Any]:
        return {"words": self.words, "maps": np.zeros((len(self.words), self.size, self.size), np.float32)}


def compute_word_maps(model: Any, processor: Any, family: Any, image_path: str, text: str, prompt: str = "",
                      alignment: AlignmentConfig | None = None, frame: str = "squash",
                      ) -> tuple[list[Any], torch.Tensor, str]:
    """``(words, maps (n_words, C, 32, 32), chat_text)`` of one image and answer text (library entry point).

    ``words`` are :class:`lavender.vlm.rows.WordRows` with offsets into ``chat_text``, the chat the
    model saw; the maps are read through :class:`lavender.data_collator.LavenderCollator`.
    """
    from lavender.chat import layout
    from lavender.data_collator import LavenderCollator
    from lavender.records import IMAGE_TAG, Record
    from lavender.vlm.aggregate import matched_word_maps
    from lavender.vlm.backend import disable_capture, enable_capture

    alignment = alignment or AlignmentConfig(aggregation="mean-mean")
    rec = Record(id="attend", index=0, images=[image_path],
                 messages=[{"role": "user", "content": IMAGE_TAG + prompt}, {"role": "assistant", "content": text}])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(alignment.layer_list or family.default_layers(base))
    chat_text = layout(processor, rec.messages).text
    collator = LavenderCollator(processor, family, base.config, _AllWords(rec.id, [prompt, text], frame),
                                layers, alignment)
    batch = collator([rec])
    align = batch.pop("lavender")
    if not align.n_matched:
        return [], torch.zeros(0, 1, 32, 32), chat_text
    capture = enable_capture(model, family, layers)
    try:
        capture.arm(align.plan)
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        maps = matched_word_maps(capture.maps, align, alignment.aggregation)
    finally:
        capture.clear()
        disable_capture(model, family)
    return align.rows.words[0], maps, chat_text


def write_figure(path: str, image: Any, words: list[str], maps: np.ndarray, frame: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lavender.frames import frame_image

    shown = np.asarray(frame_image(image, 256, frame))
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


def main(args: AttendConfig, alignment: AlignmentConfig) -> int:
    from PIL import Image

    from lavender.maps import minmax
    from lavender.vlm.load import load_vlm

    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except OSError as e:
        raise OSError(f"--image {args.image}: cannot read it as an image ({e})") from None
    model, processor, family = load_vlm(args.model)
    model.eval()
    words, maps, chat_text = compute_word_maps(model, processor, family, args.image, args.text, args.prompt,
                                               alignment, frame=args.frame)
    flat = maps.mean(dim=1)  # (n_words, 32, 32): heads averaged for the file
    if args.normalize == "minmax" and len(words):
        flat = minmax(flat)
    arr = flat.float().numpy().astype(np.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    np.savez(args.out, words=np.array([w.text for w in words], dtype=str), maps=arr,
             starts=np.array([w.start for w in words]), ends=np.array([w.end for w in words]),
             chat_text=np.array(chat_text), layers=np.array(alignment.layer_list or family.default_layers(base)))
    if args.png:
        write_figure(args.png, image, [w.text for w in words], arr, args.frame)
    print(f"{len(words)} word maps → {args.out}" + (f", figure → {args.png}" if args.png else ""))
    if not words:
        print("no word of --text found among the answer tokens; check --align-on / --row-owner")
    return 0
