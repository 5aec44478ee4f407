"""Words ↔ attention rows on the VLM side: which query rows hold each aligned word's attention.

The words come from the text's character offsets (:mod:`lavender.words`), never from the model's
predictions. Two readings of "the row of a word" (``--row-owner``):

* ``next`` (default, the paper's "predicted words"): the row at position ``t`` is the attention the
  model used to PREDICT token ``t + 1``, so a word whose tokens sit at positions ``t0..t1`` owns rows
  ``t0 - 1 .. t1 - 1``. docs/pitfalls.md #3: the authors' code named the row after the model's argmax at
  ``t``, which is wrong whenever the model's guess is wrong; here the word is read from the LABEL
  tokens (``labels != -100``) and the row is the one before each of its tokens. With HF's
  unshifted ``labels`` (the model shifts internally) the label token at ``t`` is ``input_ids[t]``,
  so the off-by-one is exactly ``row = t - 1`` — tested both ways in ``tests/test_rows.py``.
* ``query``: the word's own token rows ``t0..t1``.

Which tokens can be words (``--align-on``): ``answer`` = the assistant label tokens; ``all`` = every
text token after the sample's first image token. Image placeholders and special tokens are never
words, and rows before ``family.first_text_row`` (Mllama: before the first ``<|image|>``, rows that
attend uniformly by design) are dropped.

A word's map is the mean over its rows (:func:`lavender.vlm.aggregate.average_word_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lavender.config import ALIGN_ON, ROW_OWNERS
from lavender.words import Word, split_words, word_token_spans


@dataclass
class WordRows:
    """One aligned word of one sample: its text, character span and query rows (token positions)."""

    text: str
    start: int
    end: int
    rows: list[int]


@dataclass
class RowBatch:
    """The rows of a batch, padded for the capture backend.

    Attributes:
        words: per sample, its aligned words (:class:`WordRows`), in text order.
        rows: ``(B, R)`` long, the distinct rows of each sample (padded with 0).
        row_valid: ``(B, R)`` bool.
        word_columns: per sample, per word, the columns of ``rows`` to average for that word.
    """

    words: list[list[WordRows]]
    rows: torch.Tensor
    row_valid: torch.Tensor
    word_columns: list[list[list[int]]]


def candidate_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                     image_mask: torch.Tensor, align_on: str = "answer") -> torch.Tensor:
    """``(B, T)`` bool: the tokens whose words are aligned.

    Args:
        input_ids: ``(B, T)``.
        attention_mask: ``(B, T)`` (0 = padding) or None.
        labels: ``(B, T)`` with -100 on non-targets (unshifted, HF convention); needed for ``answer``.
        image_mask: ``(B, T)`` bool, image placeholder positions (``family.image_token_mask``).
        align_on: ``answer`` or ``all``.
    """
    valid = ~image_mask
    if attention_mask is not None:
        valid &= attention_mask.bool()
    if align_on == "answer":
        if labels is None:
            raise ValueError("--align-on answer needs the batch's labels (assistant tokens); "
                             "pass labels or use --align-on all")
        return valid & (labels != -100)
    if align_on == "all":
        # every text token after the first image token (a sample without images aligns nothing)
        seen_image = torch.cumsum(image_mask.long(), dim=1) > 0
        return valid & seen_image
    raise ValueError(f"unknown --align-on {align_on!r}; choose one of {ALIGN_ON}")


def sample_word_rows(text: str, offsets: Sequence[tuple[int, int]], candidate: Sequence[bool],
                     row_owner: str = "next", first_row: int = 0) -> list[WordRows]:
    """The aligned words of one sample and their rows.

    Args:
        text: the string the tokenizer saw (``offsets`` index into it).
        offsets: per token ``(start, end)`` characters (``return_offsets_mapping``).
        candidate: per token, whether it may belong to an aligned word (:func:`candidate_tokens`).
        row_owner: ``next`` (row before each token) or ``query`` (the token's own row).
        first_row: rows below it are dropped (``family.first_text_row``).

    A word is kept when at least one of its tokens is a candidate and one of its rows survives.
    """
    if row_owner not in ROW_OWNERS:
        raise ValueError(f"unknown --row-owner {row_owner!r}; choose one of {ROW_OWNERS}")
    if len(offsets) != len(candidate):
        raise ValueError(f"{len(offsets)} offsets but {len(candidate)} tokens; offsets must come from the "
                         "same tokenisation as input_ids")
    words: list[Word] = split_words(text)
    spans = word_token_spans(words, offsets, special=[not c for c in candidate])
    shift = 1 if row_owner == "next" else 0
    out: list[WordRows] = []
    for word, tokens in zip(words, spans):
        rows = sorted({t - shift for t in tokens if t - shift >= max(first_row, 0)})
        if rows:
            out.append(WordRows(word.text, word.start, word.end, rows))
    return out


def batch_rows(words: Sequence[Sequence[WordRows]], device: torch.device | str | None = None) -> RowBatch:
    """Pad the per-sample rows into the ``(B, R)`` index the backend gathers (each row once)."""
    distinct = [sorted({r for w in ws for r in w.rows}) for ws in words]
    n_rows = max((len(d) for d in distinct), default=0)
    n_rows = max(n_rows, 1)  # a (B, 0) gather is legal but a 1-wide padded plan keeps shapes simple
    rows = torch.zeros(len(words), n_rows, dtype=torch.long)
    valid = torch.zeros(len(words), n_rows, dtype=torch.bool)
    columns: list[list[list[int]]] = []
    for b, (ws, d) in enumerate(zip(words, distinct)):
        rows[b, : len(d)] = torch.tensor(d, dtype=torch.long)
        valid[b, : len(d)] = True
        where = {r: i for i, r in enumerate(d)}
        columns.append([[where[r] for r in w.rows] for w in ws])
    return RowBatch([list(ws) for ws in words], rows.to(device), valid.to(device), columns)


def rows_for_batch(texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]], input_ids: torch.Tensor,
                   family: object, config: object = None, *, attention_mask: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, align_on: str = "answer",
                   row_owner: str = "next") -> RowBatch:
    """Words and rows of a processed batch (the one call the trainer and ``lavender attend`` make).

    Args:
        texts: per sample, the string its ``offsets`` refer to.
        offsets: per sample, ``T`` ``(start, end)`` pairs aligned with ``input_ids`` (padding: ``(0, 0)``).
        input_ids: ``(B, T)``.
        family: the model's family (``image_token_mask``, ``first_text_row``).
        config: the model's config (image token id), passed to the family.
    """
    image_mask = family.image_token_mask(input_ids, config)
    cand = candidate_tokens(input_ids, attention_mask, labels, image_mask, align_on)
    first = family.first_text_row(input_ids, config)
    per_sample = [
        sample_word_rows(texts[b], offsets[b], cand[b].tolist(), row_owner, int(first[b]))
        for b in range(input_ids.shape[0])
    ]
    return batch_rows(per_sample, device=input_ids.device)
