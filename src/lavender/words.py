"""Words of a text with character offsets, token→word merging, and DM↔VLM word matching.

Both stages see the same words: Stage 1 splits the DM's text, Stage 2 the VLM's text, and a word's
map is the mean over the rows of the tokens that overlap it (tokenizer offsets). Matching is on
normalised words: ``exact`` (lower-cased, the paper's best) or ``lemma`` (simplemma, bundled data,
nothing downloaded).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from lavender.config import MATCH_MODES

# A word is a run of letters/digits/underscores, optionally joined by one internal '.', apostrophe or
# hyphen ("e.g", "file_name", "don't", "x-ray"). Sentence punctuation is never part of a word.
WORD_RE = re.compile(r"\w+(?:[.'’\-]\w+)*")



@dataclass(frozen=True)
class Word:
    """One word occurrence: its text and ``[start, end)`` character offsets in the source text."""

    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """Split ``text`` into word occurrences with character offsets (punctuation dropped)."""
    return [Word(m.group(0), m.start(), m.end()) for m in WORD_RE.finditer(text)]


def word_token_spans(
    words: Sequence[Word], offsets: Sequence[tuple[int, int]], special: Sequence[bool] | None = None
) -> list[list[int]]:
    """For each word, the indices of the tokens whose character span overlaps it.

    Args:
        words: word occurrences of the text that was tokenised.
        offsets: per-token ``(start, end)`` character offsets (``return_offsets_mapping``).
        special: optional per-token flag; special tokens (BOS/EOS/padding, image tokens) never belong
            to a word. Tokens with an empty span ``(s, s)`` are treated as special too.

    A word can span several tokens (sub-words) and a token can touch two words (a BPE token such as
    ``"a."``); the token then belongs to both, which is what averaging over a word's rows wants.
    """
    spans: list[list[int]] = [[] for _ in words]
    if not words:
        return spans
    starts = [w.start for w in words]
    for t, (s, e) in enumerate(offsets):
        if e <= s or (special is not None and special[t]):
            continue
        # words are sorted by start; scan the few that can overlap [s, e)
        lo = _bisect_right(starts, s) - 1
        for i in range(max(lo, 0), len(words)):
            w = words[i]
            if w.start >= e:
                break
            if w.end > s and w.start < e:
                spans[i].append(t)
    return spans


def _bisect_right(a: Sequence[int], x: int) -> int:
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@lru_cache(maxsize=65536)
def _lemma(word: str) -> str:
    try:
        import simplemma
    except ImportError as e:  # pragma: no cover - simplemma is a core dependency
        raise ImportError("--match lemma needs simplemma: pip install simplemma") from e
    return simplemma.lemmatize(word, lang="en").lower()


def normalize(word: str, mode: str = "exact") -> str:
    """The key two words are compared by: lower-cased (``exact``) or its English lemma (``lemma``)."""
    if mode == "exact":
        return word.lower()
    if mode == "lemma":
        return _lemma(word.lower())
    raise ValueError(f"unknown match mode {mode!r}; choose one of {MATCH_MODES}")


def match_words(query: Sequence[str], targets: Sequence[str], mode: str = "exact",
                ambiguous: str = "occurrence") -> list[list[int]]:
    """Indices into ``targets`` for each word of ``query`` (empty when it has no match).

    A query word whose key occurs once in ``targets`` gets that one index. When it occurs several
    times, ``ambiguous`` decides: ``occurrence`` — the k-th "dog" of the query takes the k-th "dog"
    of the targets (the last one when the targets have fewer); ``first`` — the first; ``skip`` —
    none; ``mean`` — all of them (the caller averages their maps).
    """
    by_key: dict[str, list[int]] = {}
    for j, w in enumerate(targets):
        by_key.setdefault(normalize(w, mode), []).append(j)
    seen: dict[str, int] = {}
    out: list[list[int]] = []
    for w in query:
        key = normalize(w, mode)
        idx = by_key.get(key, [])
        k = seen.get(key, 0)
        seen[key] = k + 1
        if len(idx) <= 1:
            out.append(list(idx))
        elif ambiguous == "occurrence":
            out.append([idx[min(k, len(idx) - 1)]])
        elif ambiguous == "first":
            out.append([idx[0]])
        elif ambiguous == "skip":
            out.append([])
        elif ambiguous == "mean":
            out.append(list(idx))
        else:
            raise ValueError(f"unknown ambiguity policy {ambiguous!r}; choose occurrence, first, skip or mean")
    return out
