"""Records → a training batch: processor inputs, assistant-only labels, and the alignment plan.

One collator serves every family: the chat template comes from the family's processor, image
tokens and their grid from the family (:meth:`Family.image_grids`), and the DM maps from the
attention dataset, joined by example id (never by position in a list: docs/pitfalls.md #12). A record
without maps, or whose words match nothing, still trains ``L_VLM``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError

from lavender.chat import Layout, adds_special_tokens, label_positions, labels_for_batch
from lavender.config import AlignmentConfig
from lavender.records import Record, load_image
from lavender.vlm.aggregate import keys_from_grids
from lavender.vlm.backend import CapturePlan
from lavender.vlm.rows import RowBatch, batch_rows, rows_for_batch
from lavender.words import match_words, normalize, split_words

logger = logging.getLogger(__name__)



@dataclass
class AlignmentBatch:
    """What the attention term of one batch needs, beside the model inputs.

    Attributes:
        plan: rows and image keys to capture (:class:`lavender.vlm.backend.CapturePlan`).
        rows: the MATCHED words of each sample and their rows (:class:`lavender.vlm.rows.RowBatch`);
            unmatched words are not captured at all.
        grids: per sample, the :class:`ImageGrid` of its first image (the one the DM map describes).
        targets: ``(N, S, S)`` DM maps of the matched words, in sample then word order (moved to
            the model's device by the trainer: docs/pitfalls.md #11).
        attention_mask: the batch's mask (row weights r_t of the flow aggregations).
        n_words: words considered in the batch (matched or not), for the match rate.
        frame: the attention dataset's frame (squash / pad / center-crop).
        target_index: per matched word, the index of its DM word in the example's attention entry.
        n_ambiguous: words whose text named several DM words (resolved by ``ambiguous``).
        n_dropped: words of the text to align (the answers, or every message's text after the first
            image) that reached no row: in a turn before the last image, or cut by truncation. They
            count in the match rate's denominator, so it never hides them.
        ids: the batch's record ids (to name them when a loss is not finite).
    """

    plan: CapturePlan
    rows: RowBatch
    grids: list[Any]
    targets: torch.Tensor
    attention_mask: torch.Tensor
    n_words: int
    frame: str = "squash"
    target_index: list[int] = field(default_factory=list)
    n_ambiguous: int = 0  # words whose text names several DM words (text matching only)
    ids: list[str] = field(default_factory=list)
    n_dropped: int = 0  # words of the aligned text that reached no row (before the last image, truncated)

    @property
    def n_matched(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class LavenderCollator:
    """Callable collator for :class:`transformers.Trainer` (``remove_unused_columns=False``).

    Args:
        processor: the family's processor.
        family: the model's :class:`lavender.vlm.families.Family`.
        config: the model's config (image token id etc.).
        store: the attention dataset (:class:`lavender.attnstore.AttentionStore`) or ``None`` (plain SFT).
        layers: watched layers put into each plan (resolved: the family's default when the
            alignment names none).
        alignment: which rows and words are read and how they are paired with the DM's words
            (:class:`lavender.config.AlignmentConfig`: ``row_owner``, ``align_on``, ``match``).
    """

    processor: Any
    family: Any
    config: Any
    store: Any = None
    layers: Sequence[int] = ()
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = list(self.layers)

    # ------------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Record]) -> dict[str, Any]:
        kept, images, layouts = [], [], []
        for rec in records:
            try:
                # the template too: a released one may refuse a record (Llama-3.2-Vision raises for a
                # system message together with images); that record is skipped, not the run
                # and the family's own checks (PaliGemma: an image and an answer per record)
                lay = self.family.record_layout(self.processor, rec.messages, len(rec.images))
                images.append([load_image(p) for p in rec.images])
                layouts.append(lay)
                kept.append(rec)
            except (OSError, ValueError, TemplateError) as e:  # reported and skipped, never a crash mid-run
                self.skipped.append((rec.id, str(e)))
                logger.warning("skipping record %s: %s", rec.id, e)
        if not kept:
            raise ValueError("every record of this batch is unusable: " + "; ".join(r for _, r in self.skipped[-3:]))
        # the family runs the processor: a prefix-LM (PaliGemma) needs the answer apart from the prompt
        batch = self.family.encode(self.processor, [lay.text for lay in layouts], images,
                                   [lay.label_spans[0][0] if lay.label_spans else None for lay in layouts],
                                   padding=True, return_tensors="pt",
                                   add_special_tokens=adds_special_tokens(self.processor.tokenizer, layouts[0].text))
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        lengths = mask.sum(1).tolist()
        # where each sample's tokens start, from the mask: a processor may pad on its own side
        # (InternVL's always pads left, whatever the tokenizer's padding_side)
        offsets = [int(mask[b].nonzero()[0]) if n else 0 for b, n in enumerate(lengths)]
        for b, lay in enumerate(layouts):
            if lay.align_to(input_ids[b, offsets[b]: offsets[b] + lengths[b]].tolist()):
                logger.warning("record %s: text before an image was not found in the processor's tokens; "
                               "its labels are dropped", kept[b].id)
            self._check_tail(input_ids[b], offsets[b], lengths[b], lay, kept[b].id)
        batch["labels"] = labels_for_batch(
            input_ids, [[p + off for p in label_positions(lay)] for lay, off in zip(layouts, offsets)])
        if self.store is not None:
            sizes = [[im.size for im in ims] for ims in images]
            batch["lavender"] = self._alignment(kept, layouts, offsets, batch, sizes)
        return dict(batch)

    @staticmethod
    def _check_tail(ids: torch.Tensor, off: int, length: int, lay: Layout, rec_id: str) -> None:
        """The processor's ids after the last image must equal the tokenizer's: else labels would shift."""
        tail = lay.token_ids[lay.first_tail_token:]
        got = ids[off + length - len(tail): off + length].tolist()
        if got != tail:
            raise ValueError(f"record {rec_id!r}: the processor's tokens after the image differ from the "
                             "tokenizer's; this processor/chat template is not supported for labelling")

    # ------------------------------------------------------------------------------------------
    def _alignment(self, recs: Sequence[Record], layouts: Sequence[Layout], offsets: Sequence[int],
                   batch: Any, sizes: Sequence[Sequence[tuple[int, int]]]) -> AlignmentBatch:
        input_ids = batch["input_ids"]
        keys, key_valid, grids = keys_from_grids(
            self.family.image_grids(batch, sizes, config=self.config, processor=self.processor), len(recs))
        all_rows = rows_for_batch(
            [lay.text for lay in layouts],
            [_word_offsets(lay, off, input_ids.shape[1]) for lay, off in zip(layouts, offsets)],
            input_ids, self.family, self.config, attention_mask=batch["attention_mask"],
            labels=batch["labels"], align_on=self.alignment.align_on,
            row_owner=self.alignment.row_owner)
        matched: list[list[Any]] = [[] for _ in recs]
        targets, target_index = [], []
        n_words = n_ambiguous = 0
        n_dropped = 0
        for b, rec in enumerate(recs):
            words = all_rows.words[b]
            n_words += len(words)
            n_dropped += max(0, _words_to_align(layouts[b], self.alignment.align_on) - len(words))
            entry = self.store.get(rec.id) if (grids[b] is not None and words and rec.id in self.store) else None
            if entry is None:
                continue
            if rec.align_pairs is not None:
                picks = _paired(words, rec.align_pairs, layouts[b], entry["offsets"])
            else:
                picks = match_words([w.text for w in words], entry["words"], self.alignment.match,
                                    self.alignment.ambiguous)
                dm_keys = [normalize(t, self.alignment.match) for t in entry["words"]]
                n_ambiguous += sum(dm_keys.count(normalize(w.text, self.alignment.match)) > 1 for w in words)
            for w, js in zip(words, picks):
                if js:
                    matched[b].append(w)
                    target_index.append(js[0])
                    maps = torch.as_tensor(np.asarray(entry["maps"][js]), dtype=torch.float32)
                    targets.append(maps.mean(0))
        rows = batch_rows(matched)
        size = int(self.store.manifest.get("map_size", 32))
        return AlignmentBatch(
            plan=CapturePlan(list(self.layers), rows.rows, rows.row_valid, keys, key_valid),
            rows=rows, grids=grids,
            targets=torch.stack(targets) if targets else torch.zeros(0, size, size),
            attention_mask=batch["attention_mask"], n_words=n_words,
            frame=manifest_frame(self.store.manifest), target_index=target_index, n_ambiguous=n_ambiguous,
            ids=[r.id for r in recs], n_dropped=n_dropped)


def _paired(words: Sequence[Any], pairs: Sequence[dict], lay: Layout,
            dm_offsets: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per VLM word, the DM word its record's explicit ``align_pairs`` name (empty: not paired).

    A pair's message span is located in the rendered text through the message's regions; a word
    is paired when it lies inside that span, and its target is the mean of the maps of the DM words
    inside ``[dm_start, dm_end)`` (one word, or a phrase such as "red circle").
    """
    spans = []
    for p in pairs:
        for r in lay.regions:
            if r.message != p["message"]:
                continue
            s, e = r.text_offset(p["start"]), r.text_offset(p["end"])
            if s is not None and e is not None:
                js = [k for k, o in enumerate(dm_offsets) if p["dm_start"] <= o[0] and o[1] <= p["dm_end"]]
                if js:
                    spans.append((s, e, js))
                break
    return [next((js for s, e, js in spans if s <= w.start and w.end <= e), []) for w in words]


def _words_to_align(lay: Layout, align_on: str) -> int:
    """How many words the record asks to align: its answers' (``answer``) or, for ``all``, every
    message's text after the first image."""
    if align_on == "answer":
        regions = [r for r in lay.regions if r.role == "assistant"]
    else:
        first = lay.offsets[lay.image_tokens[0]][1] if lay.image_tokens else len(lay.text)
        regions = [r for r in lay.regions if r.start >= first]
    return sum(len(split_words(lay.text[r.start:r.end])) for r in regions)


def manifest_frame(manifest: dict) -> str:
    """The frame (squash / pad / center-crop) an attention dataset's maps are drawn in."""
    frame = manifest.get("frame", "squash")
    return frame["mode"] if isinstance(frame, dict) else str(frame)


def _word_offsets(lay: Layout, off: int, length: int) -> list[tuple[int, int]]:
    """Per processed position, the character span of its token if it can be part of a word, else (0, 0).

    Only tokens after the last image placeholder that overlap a message's own text and are not
    special keep a span — clipped to that text — so template markup (role headers, end-of-turn
    markers) never becomes a word, while a token that carries the space before a word (``' Red'``,
    ``'▁Red'``: real tokenizers' offsets include it) still belongs to the word.
    """
    out = [(0, 0)] * length
    for j in range(lay.first_tail_token, len(lay.token_ids)):
        s, e = lay.offsets[j]
        if lay.special[j]:
            continue
        for r in lay.regions:
            lo, hi = max(s, r.start), min(e, r.end)
            if lo < hi:
                out[off + j + lay.shift] = (lo, hi)
                break
    return out
