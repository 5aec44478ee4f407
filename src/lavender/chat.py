"""Records → the family's chat template → token ids, labels and per-turn token ranges.

Every family renders with its processor's own chat template (``processor.apply_chat_template``), so
the text a model is trained on is exactly what it sees at inference. Labels are derived from
*rendered prefixes*: the assistant turn ``i`` occupies tokens ``[len(tok(prefix_i + generation
prompt)), len(tok(messages[: i + 1])))``. Everything else — system prompt, user turns, image tokens,
padding — is −100 (the authors' code compared a list to an int and trained on prompts: docs/pitfalls.md #13).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
_IMAGE_TAG = re.compile(r"<image>")


def to_conversation(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records' ``{"role", "content": "<image>text"}`` turns → processor chat-template turns.

    ``<image>`` tags become ``{"type": "image"}`` items at their place in the text; turns with
    structured content pass through unchanged.
    """
    conv = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            items: list[dict[str, Any]] = []
            parts = _IMAGE_TAG.split(content)
            for k, part in enumerate(parts):
                if k > 0:
                    items.append({"type": "image"})
                if part:
                    items.append({"type": "text", "text": part})
            content = items
        conv.append({"role": m["role"], "content": content})
    return conv


def render(processor: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat-template string of ``messages`` (no tokenisation)."""
    return processor.apply_chat_template(
        to_conversation(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


@dataclass
class Region:
    """Characters of the rendered text that hold one message's own words (no template markup)."""

    role: str
    start: int
    end: int
    message: int = -1  # index of the message in the conversation
    content_start: int = 0  # where this part starts in that message's own content string

    def text_offset(self, content_offset: int) -> int | None:
        """The rendered-text offset of a character offset into the message's content (None: not here)."""
        at = self.start + content_offset - self.content_start
        return at if self.start <= at <= self.end else None


@dataclass
class Layout:
    """Where a rendered conversation's pieces are, in characters and in the processor's tokens.

    Attributes:
        text: the rendered chat-template string.
        regions: the text parts of every message, located in ``text`` (``<image>`` tags excluded).
        label_spans: ``[start, end)`` characters of each assistant turn as trained on: from after the
            generation prompt to the end of the turn (its end-of-turn marker included, so the model
            learns to stop).
        offsets: per token of ``processor.tokenizer(text)``, its character span.
        special: per token, True for special/added tokens (never part of a word).
        shift: how many positions the processor's image expansion inserts before the text's tail:
            tokenizer token ``j`` after the last image placeholder is processed position ``j + shift``.
        first_tail_token: the first tokenizer token after the last image placeholder (0 if none).
    """

    text: str
    regions: list[Region]
    label_spans: list[tuple[int, int]]
    offsets: list[tuple[int, int]]
    special: list[bool]
    token_ids: list[int]
    shift: int = 0
    first_tail_token: int = 0

    def tail_positions(self, tokens: Sequence[int]) -> list[int]:
        """Processed positions of tokenizer tokens (those before the last image are dropped)."""
        return [j + self.shift for j in tokens if j >= self.first_tail_token]


def adds_special_tokens(tokenizer: Any, text: str) -> bool:
    """Whether tokenising a rendered chat should add BOS: not when the template already wrote it.

    The same rule as ``ProcessorMixin.apply_chat_template``, so training sees what inference sees.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos is not None and text.startswith(bos))


def _rendered_len(processor: Any, messages: Sequence[dict[str, Any]], gen: bool = False) -> int:
    return len(render(processor, messages, add_generation_prompt=gen)) if messages else 0


def _text_parts(content: str) -> list[tuple[int, str]]:
    """The non-empty pieces of ``content`` between ``<image>`` tags, stripped, with their offsets."""
    out, last = [], 0
    for piece_end, nxt in [(m.start(), m.end()) for m in _IMAGE_TAG.finditer(content)] + [(len(content), 0)]:
        raw = content[last:piece_end]
        if raw.strip():
            out.append((last + len(raw) - len(raw.lstrip()), raw.strip()))
        last = nxt
    return out


_SENTINEL = "LAVENDERSENTINEL{}Q"  # letters and a digit: no template trims, escapes or splits it


def _place_parts(processor: Any, messages: Sequence[dict[str, Any]], i: int, parts: list[tuple[int, str]],
                 text: str, seg_start: int) -> list[int | None]:
    """Where each text part of message ``i`` starts in ``text``, found by rendering sentinels in its place.

    Searching for the part's own text from the start of the turn would find it inside the role
    header (the answer "A" in ``ASSISTANT:``, "user" in ``<|user|>``) or a default system prompt.
    A sentinel cannot occur there, so its rendered position is the content's, whatever the markup.
    ``None`` for a part whose sentinel the template did not reproduce verbatim.
    """
    content = messages[i]["content"]
    pieces, last, sentinels = [], 0, []
    for k, (start, part) in enumerate(parts):
        sentinels.append(_SENTINEL.format(k))
        pieces += [content[last:start], sentinels[-1]]
        last = start + len(part)
    pieces.append(content[last:])
    probe = render(processor, [*messages[:i], {**messages[i], "content": "".join(pieces)}])
    out: list[int | None] = []
    shift, cursor = 0, seg_start
    for (_, part), sentinel in zip(parts, sentinels):
        p = probe.find(sentinel, cursor)
        at = p + shift if p >= 0 else None
        if at is None or text[at: at + len(part)] != part:
            out.append(None)
        else:
            out.append(at)
            cursor = p + len(sentinel)
        shift += len(part) - len(sentinel)
    return out


def template_ends_turns(processor: Any) -> bool:
    """Whether the chat template writes an end-of-turn marker (the tokenizer's EOS or another special
    token) after an assistant turn. LLaVA-1.5's released template does not: it ends a turn with a space."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "LAVENDERPROBE"}]
    tail = render(processor, probe).split("LAVENDERPROBE", 1)[-1]
    tok = processor.tokenizer
    specials = {t for t in [tok.eos_token, *getattr(tok, "all_special_tokens", [])] if t and t != tok.pad_token}
    return any(t in tail for t in specials)


def with_end_of_turn(processor: Any, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tokenizer's EOS appended to each assistant turn when the template writes no
    end-of-turn marker, so the model learns to stop (LLaVA-1.5 was trained with ``</s>`` after each
    answer; its released template omits it). Unchanged for templates that end turns themselves."""
    eos = getattr(processor.tokenizer, "eos_token", None)
    if not eos or template_ends_turns(processor):
        return list(messages)
    return [{**m, "content": m["content"] + eos} if m["role"] == "assistant" and isinstance(m["content"], str)
            else m for m in messages]


def layout(processor: Any, messages: Sequence[dict[str, Any]]) -> Layout:
    """Render ``messages`` and locate every message's words and every assistant turn in it.

    Relies on the template being prefix-stable (rendering ``messages[:i]`` is a prefix of rendering
    ``messages``), which holds for the chat templates of the supported families; a template that is
    not gets a clear error instead of silently shifted labels.
    """
    original = messages
    messages = with_end_of_turn(processor, messages)
    text = render(processor, messages)
    regions: list[Region] = []
    label_spans: list[tuple[int, int]] = []
    for i, m in enumerate(original):
        seg_start, seg_end = _rendered_len(processor, messages[:i]), _rendered_len(processor, messages[: i + 1])
        if text[:seg_end] != render(processor, messages[: i + 1]):
            raise ValueError("the chat template is not prefix-stable; labels cannot be located")
        content = m["content"] if isinstance(m["content"], str) else " ".join(
            c.get("text", "") for c in m["content"] if c.get("type") == "text")
        parts = _text_parts(content)
        placed = _place_parts(processor, messages, i, parts, text, seg_start) if isinstance(m["content"], str) \
            else [None] * len(parts)
        cursor = seg_start
        for (part_start, part), at in zip(parts, placed):
            if at is None:  # structured content, or the template rewrote the text: search after the cursor
                at = text.find(part, cursor, seg_end)
            if at < 0:
                continue  # the template rewrote this text (e.g. trimmed); no words taken from it
            regions.append(Region(m["role"], at, at + len(part), i, part_start))
            cursor = at + len(part)
        if m["role"] == "assistant":
            # the turn as trained: its text and end-of-turn marker, not the whitespace that separates
            # it from the next turn (a '▁USER' token starts on that space: it belongs to the next turn)
            end = seg_end
            while end > seg_start and text[end - 1].isspace():
                end -= 1
            label_spans.append((_rendered_len(processor, messages[:i], gen=True), end))

    tok = processor.tokenizer
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=adds_special_tokens(tok, text))
    ids = list(enc["input_ids"])
    special_ids = set(tok.all_special_ids) | {
        i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    special = [i in special_ids for i in ids]
    first_tail = 0
    image_token = getattr(processor, "image_token", None)
    if image_token is not None:
        image_id = tok.convert_tokens_to_ids(image_token)
        last = max((j for j, i in enumerate(ids) if i == image_id), default=-1)
        first_tail = last + 1
    return Layout(text, regions, label_spans, [tuple(o) for o in enc["offset_mapping"]], special, ids,
                  first_tail_token=first_tail)


def label_positions(lay: Layout) -> list[int]:
    """Processed positions of the tokens trained on (assistant turns only)."""
    # a token that starts inside a turn, or overlaps it: real tokenizers put the space before the
    # first word in that word's token ('▁Red'), which can start one character before the turn's text
    toks = [j for j, (s, e) in enumerate(lay.offsets)
            if any(a <= s < b or (s < b and e > a) for a, b in lay.label_spans)]
    return lay.tail_positions(toks)


def labels_for_batch(input_ids: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(B, T)`` labels: the ids at the given (already padded-row) positions, −100 elsewhere."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, pos in enumerate(positions):
        if pos:
            idx = torch.tensor(pos, dtype=torch.long)
            labels[b, idx] = input_ids[b, idx]
    return labels
