"""Records → the family's chat template → token ids, labels and per-turn token ranges.

Every family renders with its processor's own chat template (``processor.apply_chat_template``), so
the text a model is trained on is exactly what it sees at inference. Labels are derived from
*rendered prefixes*: the assistant turn ``i`` occupies tokens ``[len(tok(prefix_i + generation
prompt)), len(tok(messages[: i + 1])))``. Everything else — system prompt, user turns, image tokens,
padding — is −100 (the authors' code compared a list to an int and trained on prompts: docs/pitfalls.md #13).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
_IMAGE_TAG = re.compile(r"<image>")


def to_conversation(messages: Sequence[dict[str, Any]], system_as_string: bool = False) -> list[dict[str, Any]]:
    """Records' ``{"role", "content": "<image>text"}`` turns → processor chat-template turns.

    ``<image>`` tags become ``{"type": "image"}`` items at their place in the text; turns with
    structured content pass through unchanged. ``system_as_string`` keeps a text-only system message
    a plain string, for templates that read it as one (Llama-3.2-Vision's: given a list it renders
    the list's Python repr).
    """
    conv = []
    for m in messages:
        content = m["content"]
        if system_as_string and m["role"] == "system" and isinstance(content, str) and "<image>" not in content:
            conv.append({"role": "system", "content": content})
            continue
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
        to_conversation(messages, system_takes_string(processor)), tokenize=False,
        add_generation_prompt=add_generation_prompt)


_PROBES: dict[tuple[str, str, str], Any] = {}  # (probe, chat template, EOS) → result: templates are probed once


def _probe(processor: Any, name: str, fn: Any) -> Any:
    key = (name, str(getattr(processor, "chat_template", "")), str(getattr(processor.tokenizer, "eos_token", "")))
    if key not in _PROBES:
        _PROBES[key] = fn()
    return _PROBES[key]


def system_takes_string(processor: Any) -> bool:
    """Whether the template reads a system message's content as a string: given the usual list of
    ``{"type": "text"}`` items it would print the list's repr (Llama-3.2-Vision's template does)."""
    def check() -> bool:
        conv = [{"role": "system", "content": [{"type": "text", "text": "LAVENDERSYSTEM"}]},
                {"role": "user", "content": [{"type": "text", "text": "q"}]}]
        try:
            out = processor.apply_chat_template(conv, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that rejects system messages: nothing to decide
            return False
        return "'type'" in out or "'text': 'LAVENDERSYSTEM'" in out

    return _probe(processor, "system", check)


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
        image_tokens: tokenizer indices of the image placeholders.
        segment_shifts: per text segment (tokens between placeholders), processed = tokenizer + shift;
            set by :meth:`align_to` (None before it: positions are the tokenizer's).
    """

    text: str
    regions: list[Region]
    label_spans: list[tuple[int, int]]
    offsets: list[tuple[int, int]]
    special: list[bool]
    token_ids: list[int]
    shift: int = 0
    first_tail_token: int = 0

    image_tokens: list[int] = field(default_factory=list)
    segment_shifts: list[int | None] | None = None

    def align_to(self, processed: Sequence[int]) -> int:
        """Locate each text segment (the tokens between image placeholders) in the processor's ids.

        ``processed``: one sample's ids without padding. The processor expands each placeholder into
        the image's tokens (LLaVA, Qwen2-VL, Idefics3) or keeps one (Mllama), and leaves the text
        between them as the tokenizer made it, so the tail ends where ``processed`` ends and each
        earlier segment is its last exact occurrence before the expansion that follows it. Sets
        ``shift`` (the tail's) and ``segment_shifts`` (None: a segment not found, whose tokens then
        get no position); returns the number of segments not found (0 when all were).
        """
        ids = self.token_ids
        bounds = [-1, *self.image_tokens, len(ids)]
        segs = [(bounds[k] + 1, bounds[k + 1]) for k in range(len(bounds) - 1)]
        self.shift = len(processed) - len(ids)
        shifts: list[int | None] = [None] * len(segs)
        shifts[-1] = self.shift
        limit = segs[-1][0] + self.shift  # where the segment after the current one starts, processed
        missing = 0
        for k in range(len(segs) - 2, -1, -1):
            a, b = segs[k]
            piece, n = list(ids[a:b]), b - a
            end = limit - 1  # the placeholder's expansion takes at least one position
            if n:
                end = next((e for e in range(end, n - 1, -1) if list(processed[e - n: e]) == piece), -1)
                if end < 0:
                    missing += 1
                    continue
                shifts[k] = end - b
            limit = end - n
        self.segment_shifts = shifts
        return missing

    def positions(self, tokens: Sequence[int]) -> list[int]:
        """Processed positions of tokenizer tokens; before :meth:`align_to`, the tokenizer's own.
        Image placeholders and tokens of segments not found get none."""
        if self.segment_shifts is None:
            placeholders = set(self.image_tokens)
            return [j for j in tokens if j not in placeholders]
        out = []
        for j in tokens:
            k = bisect.bisect_right(self.image_tokens, j)
            if (k and self.image_tokens[k - 1] == j) or self.segment_shifts[k] is None:
                continue
            out.append(j + self.segment_shifts[k])
        return out


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
    # the WHOLE conversation with sentinels in message i: what precedes them is exactly ``text``'s
    # prefix even for templates whose preamble depends on later turns (Llama-3.2-Vision's date block)
    probe = render(processor, [*messages[:i], {**messages[i], "content": "".join(pieces)}, *messages[i + 1:]])
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


def end_of_turn_marker(processor: Any) -> str:
    """The text the chat template writes right after an assistant message's content ("<|eot_id|>",
    "<|im_end|>", "<end_of_utterance>"), up to the first whitespace; "" for templates that write no
    special token there (LLaVA-1.5's released template ends a turn with a space)."""
    def check() -> str:
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "LAVENDERPROBE"}]
        tail = render(processor, probe).split("LAVENDERPROBE", 1)[-1]
        marker = tail.split(maxsplit=1)[0] if tail and not tail[0].isspace() else ""
        tok = processor.tokenizer
        specials = {t for t in [tok.eos_token, *getattr(tok, "all_special_tokens", [])] if t and t != tok.pad_token}
        return marker if any(t in marker for t in specials) else ""

    return _probe(processor, "end_of_turn", check)


def template_ends_turns(processor: Any) -> bool:
    """Whether the chat template writes an end-of-turn marker (the tokenizer's EOS or another special
    token) after an assistant turn."""
    return bool(end_of_turn_marker(processor))


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

    Message text is located by rendering sentinels in its place (:func:`_place_parts`). An assistant
    turn's trained span runs from the end of the generation prompt to its end-of-turn marker, found
    from rendered prefixes when the template is prefix-stable (rendering ``messages[:i]`` is a prefix
    of rendering ``messages``). Llama-3.2-Vision's is not when the first image comes in a later turn
    (its date block is written only for image-free conversations); then the span runs from the turn's
    first text to its last plus the template's end-of-turn marker (:func:`end_of_turn_marker`).
    """
    original = messages
    messages = with_end_of_turn(processor, messages)
    text = render(processor, messages)
    # ends[i] = length of the rendered messages[:i] (each prefix rendered once, for both uses)
    prefixes = [render(processor, messages[: i + 1]) for i in range(len(messages) - 1)] + [text]
    stable = all(text.startswith(p) for p in prefixes)
    ends = [0] + [len(p) for p in prefixes]
    marker = "" if stable else end_of_turn_marker(processor)
    regions: list[Region] = []
    label_spans: list[tuple[int, int]] = []
    for i, m in enumerate(original):
        if stable:
            seg_start, seg_end = ends[i], ends[i + 1]
        else:
            seg_start, seg_end = (regions[-1].end if regions else 0), len(text)
        n_before = len(regions)
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
        if m["role"] == "assistant" and stable:
            # the turn as trained: its text and end-of-turn marker, not the whitespace that separates
            # it from the next turn (a '▁USER' token starts on that space: it belongs to the next turn)
            end = seg_end
            while end > seg_start and text[end - 1].isspace():
                end -= 1
            label_spans.append((_rendered_len(processor, messages[:i], gen=True), end))
        elif m["role"] == "assistant" and len(regions) > n_before:
            start, end = regions[n_before].start, regions[-1].end
            eos = getattr(processor.tokenizer, "eos_token", None)
            if eos and messages[i] is not m and text.startswith(eos, end):  # the EOS with_end_of_turn added
                end += len(eos)
            if marker and text.startswith(marker, end):
                end += len(marker)
            label_spans.append((start, end))

    tok = processor.tokenizer
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=adds_special_tokens(tok, text))
    ids = list(enc["input_ids"])
    special_ids = set(tok.all_special_ids) | {
        i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    special = [i in special_ids for i in ids]
    images: list[int] = []
    image_token = getattr(processor, "image_token", None)
    if image_token is not None:
        image_id = tok.convert_tokens_to_ids(image_token)
        images = [j for j, i in enumerate(ids) if i == image_id]
    return Layout(text, regions, label_spans, [tuple(o) for o in enc["offset_mapping"]], special, ids,
                  first_tail_token=images[-1] + 1 if images else 0, image_tokens=images)


def label_positions(lay: Layout) -> list[int]:
    """Processed positions of the tokens trained on (assistant turns only)."""
    # a token that starts inside a turn, or overlaps it: real tokenizers put the space before the
    # first word in that word's token ('▁Red'), which can start one character before the turn's text
    toks = [j for j, (s, e) in enumerate(lay.offsets)
            if any(a <= s < b or (s < b and e > a) for a, b in lay.label_spans)]
    return lay.positions(toks)


def labels_for_batch(input_ids: torch.Tensor, positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(B, T)`` labels: the ids at the given (already padded-row) positions, −100 elsewhere."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, pos in enumerate(positions):
        if pos:
            idx = torch.tensor(pos, dtype=torch.long)
            labels[b, idx] = input_ids[b, idx]
    return labels
