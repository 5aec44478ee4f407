"""World v2: questions where grounding decides the answer, and a shortcut that breaks at test.

Every v2 record asks for the colour or the shape of ONE small *referent* object, named by its other
attribute ("What colour is the circle?" → the colour of the only circle). Every scene also holds a
large, salient *decoy* and up to two small distractors. The shortcut: in ``train``, ``iid-val`` and
``iid`` the decoy shares the answer attribute with the referent with probability ``p`` (so "name
the colour of the big object" is right that often); in ``shift-val`` and ``shift`` it never does,
so only a model that looks at the referent answers right. With ``p = 1`` training is perfectly
confounded: only the attention signal says which object is meant. ``combo`` is a second shift:
the referent is a colour–shape pair no other split ever shows (decoy rate ``p``).

Distractors never carry the referent's answer attribute nor its naming attribute, so the answer
word of the DM text (the caption naming every object, left to right) occurs at the referent and,
when the decoy shares it, at the decoy — never elsewhere. Each record's ``align_pairs`` links the
answer to the REFERENT's occurrence, which text matching alone cannot tell from the decoy's.

Splits (record ``i`` of a split has its own generator, as in v1): ``train``; ``iid-val`` and
``shift-val`` for designing the world and choosing the AR recipe (``shift-val`` never chooses an
arm's hyper-parameters); ``iid``, ``shift`` and ``combo`` are reported only.

**Binding pressure** (``binding=True``): the decoy carries the referent's NAMING attribute too ("What
colour is the circle on the left?" with a large circle on the right), so the naming word no longer
identifies the referent: the question names it by two attributes, its naming attribute and its side
relative to the decoy (``left``/``right``, words both world models were trained on; size words were
never in either model's training text, docs/world_v2.md says why that choice). With ``p`` the decoy
also shares the answer attribute: then the two objects differ only in size and place.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from lavender.config import PAIRINGS
from lavender.world.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SEEN_PAIRS,
    SHAPES,
    SIZE_RANGES,
    Scene,
    SceneObject,
    place_objects,
    render_scene,
)
from lavender.world.write import save_example, scene_progress, write_scene_jsonl

# split -> (decoy shares the answer attribute with probability p?, referent is a held-out pair?)
V2_SPLITS: dict[str, tuple[bool, bool]] = {
    "train": (True, False),
    "iid-val": (True, False),
    "shift-val": (False, False),
    "iid": (True, False),
    "shift": (False, False),
    "combo": (True, True),
}
V2_KINDS: tuple[str, ...] = ("colour", "shape")
V2_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} object?", "What is the shape of the {colour} object?"),
}
# binding pressure: the referent is named by its other attribute AND its side relative to the decoy
V2_BINDING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape} on the {side}?", "What is the colour of the {shape} on the {side}?"),
    "shape": ("What shape is the {colour} object on the {side}?",
              "What is the shape of the {colour} object on the {side}?"),
}
_SPLIT_CODE = {s: 100 + i for i, s in enumerate(V2_SPLITS)}  # never v1's stream codes
_BINDING_CODE = 50  # added to the split's code: binding-pressure streams never repeat plain v2 records
MIN_SIDE_DX = 6.0  # pixels between the referent's and the decoy's centres, so "left"/"right" is clear
_MAX_DRAWS = 1000


def v2_rng(seed: int, split: str, index: int, binding: bool = False) -> np.random.Generator:
    """The generator of v2 record ``index`` of ``split``: independent of ``n`` and of other splits."""
    check_split(split)
    return np.random.default_rng([int(seed), _SPLIT_CODE[split] + (_BINDING_CODE if binding else 0), int(index)])


def check_split(split: str) -> None:
    if split not in V2_SPLITS:
        raise ValueError(f"unknown world-v2 split {split!r}; choose one of {', '.join(V2_SPLITS)}")


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _objects(rng: np.random.Generator, kind: str, p: float, split: str, binding: bool = False
             ) -> tuple[list[tuple[str, str, str]], int, int] | None:
    """(colour, shape, size) per object, the referent's and decoy's indices; None to redraw.

    ``binding``: the decoy has the referent's naming attribute (and, when it shares, its answer too:
    the same pair as the referent, allowed even for a held-out ``combo`` referent)."""
    shares_p, held = V2_SPLITS[split]
    pool = sorted(HELD_OUT_PAIRS) if held else list(SEEN_PAIRS)
    ref_c, ref_s = _pick(rng, pool)
    answer_is_colour = kind == "colour"
    share = bool(rng.random() < p) if shares_p else False
    # the decoy: the referent's naming attribute iff ``binding`` (else another one); the answer
    # attribute equal to the referent's iff ``share``
    seen = list(SEEN_PAIRS)
    pool_d = seen + ([(ref_c, ref_s)] if binding and (ref_c, ref_s) not in seen else [])
    if answer_is_colour:
        cands = [(c, s) for c, s in pool_d if (s == ref_s) == binding and ((c == ref_c) == share)]
    else:
        cands = [(c, s) for c, s in pool_d if (c == ref_c) == binding and ((s == ref_s) == share)]
    if not cands:
        return None
    decoy = _pick(rng, cands)
    objs = [(ref_c, ref_s, "small"), (*decoy, "large")]
    # distractors: neither the referent's colour nor its shape (so neither the answer nor the name
    # appears on them), and not the decoy's answer attribute (so the decoy stays the one confound)
    others = [(c, s) for c, s in seen if c != ref_c and s != ref_s
              and (c != decoy[0] if answer_is_colour else s != decoy[1]) and (c, s) != decoy]
    for _ in range(int(rng.integers(0, 3))):
        if not others:
            break
        d = _pick(rng, others)
        others = [o for o in others if o != d]
        objs.append((*d, "small"))
    return objs, 0, 1


def v2_example(seed: int, split: str, index: int, p: float, binding: bool = False) -> tuple[Scene, dict]:
    """Scene and record fields of v2 record ``index``; kinds alternate (colour, shape, ...).

    ``binding``: binding pressure (module docstring): the decoy shares the referent's naming attribute
    and the question also names the referent's side relative to the decoy."""
    check_split(split)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p}: the decoy rate must be in [0, 1]")
    kind = V2_KINDS[index % len(V2_KINDS)]
    rng = v2_rng(seed, split, index, binding)
    for _ in range(_MAX_DRAWS):
        got = _objects(rng, kind, p, split, binding)
        if got is not None:
            break
    else:  # pragma: no cover - the pools always allow a decoy
        raise RuntimeError(f"no v2 scene for a {kind!r} question in {_MAX_DRAWS} draws")
    specs, ref, dec = got
    sides = [int(rng.integers(SIZE_RANGES[sz][0], SIZE_RANGES[sz][1] + 1)) for _, _, sz in specs]
    order = np.argsort([-s for s in sides], kind="stable")
    for _ in range(_MAX_DRAWS):
        corners: list = [None] * len(specs)
        for i, xy in zip(order, place_objects(rng, [sides[i] for i in order])):
            corners[i] = xy
        objs = [SceneObject(c, s, sz, x, y, side) for (c, s, sz), side, (x, y) in zip(specs, sides, corners)]
        if not binding or abs(objs[ref].centre[0] - objs[dec].centre[0]) >= MIN_SIDE_DX:
            break
    else:  # pragma: no cover - two objects side by side always fit
        raise RuntimeError(f"no v2 layout with the referent and decoy {MIN_SIDE_DX} px apart")
    side_word = "left" if objs[ref].centre[0] < objs[dec].centre[0] else "right"
    tagged = sorted(enumerate(objs), key=lambda t: (t[1].centre[0], t[1].centre[1]))  # caption order
    where = {orig: k for k, (orig, _) in enumerate(tagged)}
    scene = render_scene(tuple(o for _, o in tagged))
    r, d = scene.objects[where[ref]], scene.objects[where[dec]]
    templates = (V2_BINDING_TEMPLATES if binding else V2_TEMPLATES)[kind]
    template = int(rng.integers(len(templates)))
    if kind == "colour":
        question, answer = templates[template].format(shape=r.shape, side=side_word), r.colour
    else:
        question, answer = templates[template].format(colour=r.colour, side=side_word), r.shape
    # the referent's answer word in the caption: word 3k+1 (colour) or 3k+2 (shape) of object k,
    # counted among grounded words as 2k (colour) / 2k+1 (shape)
    wm = scene.word_masks
    g = 2 * where[ref] + (0 if kind == "colour" else 1)
    dm_start, dm_end = wm.offsets[g]
    if wm.words[g] != answer:  # guard: the caption's grounded words are in object order
        raise AssertionError(f"caption word {wm.words[g]!r} is not the answer {answer!r}")
    attr = "colour" if kind == "colour" else "shape"
    fields = {
        "type": kind, "question": question, "answer": answer,
        "template": f"{'v2b' if binding else 'v2'}.{kind}.{template}",
        "referent": where[ref], "decoy": where[dec], "binding": binding,
        "decoy_shares": getattr(d, attr) == getattr(r, attr),
        "align_pairs": [{"message": 1, "start": 0, "end": len(answer),
                         "dm_start": int(dm_start), "dm_end": int(dm_end)}],
    }
    return scene, fields


def referent_phrase(record: dict) -> list[tuple[int, int]]:
    """Character spans of the referent's colour and shape words in a v2 record's caption (``align_text``).

    The caption names object ``k`` (caption order) with grounded words ``2k`` (colour) and ``2k + 1``
    (shape); the pair of them is the only place the caption identifies the referent when the decoy
    shares the answer word (the naming word occurs once: the decoy and distractors never carry it;
    under binding pressure the decoy carries it too, and only the words' places tell them apart).
    """
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", record["align_text"])
             if m.group() in COLOURS or m.group() in SHAPES]
    k = int(record["referent"])
    return [spans[2 * k], spans[2 * k + 1]]


def with_pairs(record: dict, pair: str) -> dict:
    """``record`` with its answer paired to the referent's answer ``word`` (the v2 default) or to the
    referent's whole ``phrase`` ("red circle": a Stage-1 target that averages both words' maps)."""
    if pair not in PAIRINGS:
        raise ValueError(f"pair={pair!r}: choose one of {', '.join(PAIRINGS)}")
    if pair == "word":
        return record
    (start, _), (_, end) = referent_phrase(record)
    pairs = [{**p, "dm_start": start, "dm_end": end} for p in record["align_pairs"]]
    return {**record, "align_pairs": pairs, "pair": pair}


def write_with_pairs(src: str | os.PathLike, dst: str | os.PathLike, pair: str) -> Path:
    """``src``'s records with :func:`with_pairs` applied, written to ``dst`` (same folder: same images);
    kept if ``dst`` exists already."""
    dst = Path(dst)
    if not dst.exists():
        dst.write_text("".join(json.dumps(with_pairs(json.loads(ln), pair)) + "\n" for ln in open(src)))
    return dst


def write_v2_split(out_dir: str | os.PathLike, split: str, n: int, seed: int = 0, p: float = 1.0,
                   pair: str = "word", binding: bool = False) -> Path:
    """Write ``n`` v2 VQA records of ``split`` to ``out_dir/<split>.jsonl`` (images and masks beside it);
    ``pair`` (:func:`with_pairs`) says which span of the caption the answer is paired with;
    ``binding`` writes the binding-pressure variant (ids ``v2b<split>_…``)."""
    check_split(split)
    if pair not in PAIRINGS:
        raise ValueError(f"pair={pair!r}: choose one of {', '.join(PAIRINGS)}")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)

    def rows():
        for i in scene_progress(range(n), n, f"world v2 {split}"):
            scene, f = v2_example(seed, split, i, p, binding)
            ex_id = f"{'v2b' if binding else 'v2'}{split}_{i:06d}"
            img, masks = save_example(root, ex_id, scene)
            yield with_pairs({"id": ex_id, "images": [img],
                   "messages": [{"role": "user", "content": "<image>" + f["question"]},
                                {"role": "assistant", "content": f["answer"]}],
                   "align_text": scene.caption, "type": f["type"], "answers": [f["answer"]],
                   "masks": masks, "objects": [o.to_dict() for o in scene.objects],
                   "template": f["template"], "referent": f["referent"], "decoy": f["decoy"],
                   "decoy_shares": f["decoy_shares"], "align_pairs": f["align_pairs"], "p": p,
                   **({"binding": True} if f["binding"] else {})}, pair)

    return write_scene_jsonl(root / f"{split}.jsonl", rows())

