"""VQA questions about a scene: five kinds, short closed-set answers, seen and unseen templates.

Kinds (the record's ``type``) and their answers:

- ``colour``    "What colour is the circle?"              → a colour word (the shape is unique)
- ``shape``     "What shape is the red object?"           → a shape word (the colour is unique)
- ``count``     "How many shapes are there?"              → "1" … "4" (digits, as VQAv2 normalises)
- ``position``  "Is the red circle left of the blue square?" → yes/no (answer drawn 50/50), or
                "Which side is the red circle on?"        → left/right (object ≥ 6 px off centre)
- ``existence`` "Is there a green triangle?"              → yes/no (answer drawn 50/50; a "no"
                usually shares the colour or the shape of a present object, so one word is not enough)

Each form has seen templates (train/validation/test) and an unseen paraphrase (the OOD splits).
Every template uses only words of :data:`lavender.vlm.tiny.BASIC_WORDS`, so tiny tokenizers keep
them whole. A question that a scene cannot support (no unique shape, objects too close in x) is
reported as ``None``; the writer then draws a new scene, so the kinds stay balanced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lavender.words import split_words
from lavender.world.scenes import (
    CAPTION_WORDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SEEN_PAIRS,
    SIZE,
    SceneObject,
    article,
)

KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "existence")

# form -> (seen templates, unseen templates). Placeholders: {shape} {colour} {art} {a} {b} {side}.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (("What colour is the {shape}?", "What is the colour of the {shape}?"),
               ("Which colour does the {shape} have?",)),
    "shape": (("What shape is the {colour} object?", "What is the shape of the {colour} object?"),
              ("Which shape is the {colour} one?",)),
    "count": (("How many shapes are there?", "How many objects are in the image?"),
              ("What is the number of objects?",)),
    "relation": (("Is the {a} {side} of the {b}?", "Is the {a} to the {side} of the {b}?"),
                 ("Is the {a} on the {side} side of the {b}?",)),
    "side": (("Which side is the {a} on?", "Is the {a} on the left or the right?"),
             ("On which side of the image is the {a}?",)),
    "existence": (("Is there {art} {colour} {shape}?", "Is there {art} {colour} {shape} in the image?"),
                  ("Does the image have {art} {colour} {shape}?",)),
}
FORM_KIND = {"colour": "colour", "shape": "shape", "count": "count", "relation": "position",
             "side": "position", "existence": "existence"}

ANSWERS: tuple[str, ...] = (*COLOURS, "circle", "square", "triangle", "cross", "1", "2", "3", "4",
                            "yes", "no", "left", "right")
MIN_DX = 6.0  # pixels between centres (or from the image centre) for a left/right question


@dataclass(frozen=True)
class Question:
    kind: str  # one of KINDS: the record's "type"
    template: str  # "<form>.<seen|unseen>.<index>", e.g. "relation.seen.1"
    text: str
    answer: str


def _ref(o: SceneObject) -> str:
    return f"{o.colour} {o.shape}"


def _prefer(objs: list[SceneObject], held_out: bool) -> list[SceneObject]:
    """On splits with held-out pairs, ask about a held-out object whenever the question allows."""
    if held_out:
        special = [o for o in objs if (o.colour, o.shape) in HELD_OUT_PAIRS]
        if special:
            return special
    return objs


def _fields(form: str, objs: tuple[SceneObject, ...], rng: np.random.Generator,
            held_out: bool) -> tuple[dict[str, str], str] | None:
    """Template fields and the answer for ``form`` on these objects, or None if unsupported."""
    if form == "colour":
        unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not unique:
            return None
        o = _choice(rng, _prefer(unique, held_out))
        return {"shape": o.shape}, o.colour
    if form == "shape":
        unique = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
        if not unique:
            return None
        o = _choice(rng, _prefer(unique, held_out))
        return {"colour": o.colour}, o.shape
    if form == "count":
        return {}, str(len(objs))
    if form == "relation":
        pairs = [(a, b) for a in objs for b in objs
                 if a is not b and abs(a.centre[0] - b.centre[0]) >= MIN_DX]
        if held_out:
            pairs = [p for p in pairs if (p[0].colour, p[0].shape) in HELD_OUT_PAIRS
                     or (p[1].colour, p[1].shape) in HELD_OUT_PAIRS] or pairs
        if not pairs:
            return None
        a, b = _choice(rng, pairs)
        want_yes = bool(rng.integers(2))
        a_is_left = a.centre[0] < b.centre[0]
        side = "left" if a_is_left == want_yes else "right"
        return {"a": _ref(a), "b": _ref(b), "side": side}, ("yes" if want_yes else "no")
    if form == "side":
        off = [o for o in objs if abs(o.centre[0] - SIZE / 2) >= MIN_DX]
        if not off:
            return None
        o = _choice(rng, _prefer(off, held_out))
        return {"a": _ref(o)}, ("left" if o.centre[0] < SIZE / 2 else "right")
    if form == "existence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.integers(2):
            o = _choice(rng, _prefer(list(objs), held_out))
            return {"art": article(o.colour), "colour": o.colour, "shape": o.shape}, "yes"
        pool = sorted(HELD_OUT_PAIRS) if held_out else list(SEEN_PAIRS)
        absent = [p for p in pool if p not in present]
        # mostly a near miss: shares a colour or a shape with something in the scene
        near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
        c, s = _choice(rng, near if near and rng.random() < 0.75 else absent)
        return {"art": article(c), "colour": c, "shape": s}, "no"
    raise ValueError(f"unknown question form {form!r}; forms are {tuple(TEMPLATES)}")


def _choice(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def make_question(rng: np.random.Generator, kind: str, objs: tuple[SceneObject, ...],
                  held_out: bool, unseen_templates: bool) -> Question | None:
    """One question of ``kind`` about ``objs``, or None when the scene cannot support it.

    Args:
        held_out: the scene comes from a split with held-out colour–shape pairs; questions then
            target a held-out object when they can, and "no" existence questions name a held-out
            pair (never a seen one), so held-out pairs appear only in these splits' texts.
        unseen_templates: use the unseen paraphrases (OOD) instead of the seen ones.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    form = ("relation", "side")[int(rng.integers(2))] if kind == "position" else kind
    got = _fields(form, objs, rng, held_out)
    if got is None:
        return None
    fields, answer = got
    which = "unseen" if unseen_templates else "seen"
    options = TEMPLATES[form][1 if unseen_templates else 0]
    i = int(rng.integers(len(options)))
    return Question(kind, f"{form}.{which}.{i}", options[i].format(**fields), answer)


def all_template_texts() -> list[str]:
    """Every template string (seen and unseen)."""
    return [t for seen, unseen in TEMPLATES.values() for t in (*seen, *unseen)]


def vocabulary() -> list[str]:
    """Every word of the world's captions, questions and answers, lower-cased and sorted.

    What the tiny DM's and VLM's tokenizers must know (questions also end with "?").
    """
    words = set(CAPTION_WORDS) | set(ANSWERS)
    for t in all_template_texts():
        words |= {w.text.lower() for w in split_words(re.sub(r"\{\w+\}", " ", t))}
    return sorted(words)
