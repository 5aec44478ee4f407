"""World v2: the decoy rate by split, pairs that name the referent, the shortcut's structure, files.

The referent and decoy are checked from the PIXELS (the colour under the referent's mask, the size
of the decoy's), not from the generator's own fields alone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from lavender.config import V2_SPLITS as CONFIG_V2_SPLITS
from lavender.records import read_records
from lavender.world import COLOURS, HELD_OUT_PAIRS, load_object_masks
from lavender.world.v2 import V2_SPLITS, v2_example, write_v2_split

N = 600


def _rate(split: str, p: float, n: int = N) -> float:
    return float(np.mean([v2_example(0, split, i, p)[1]["decoy_shares"] for i in range(n)]))


@pytest.mark.parametrize("p", [0.9, 1.0])
def test_decoy_rate_is_p_in_training_splits_and_zero_in_shift(p) -> None:
    sd = 3 * math.sqrt(p * (1 - p) / N) + 1e-9  # three binomial standard errors
    for split in ("train", "iid-val", "iid"):
        assert abs(_rate(split, p) - p) <= sd, split
    for split in ("shift-val", "shift"):
        assert _rate(split, p) == 0.0, split


def test_config_lists_the_generators_splits() -> None:
    assert tuple(V2_SPLITS) == CONFIG_V2_SPLITS


def test_every_pair_names_the_referent_and_only_referent_and_decoy_carry_the_answer(tmp_path) -> None:
    path = write_v2_split(tmp_path, "train", 80, seed=3, p=0.9)
    rows = [json.loads(ln) for ln in open(path)]
    for rec in rows:
        masks = load_object_masks(rec, tmp_path)
        ref, dec = rec["objects"][rec["referent"]], rec["objects"][rec["decoy"]]
        attr = "colour" if rec["type"] == "colour" else "shape"
        (pair,) = rec["align_pairs"]
        word = rec["align_text"][pair["dm_start"]: pair["dm_end"]]
        answer = rec["messages"][1]["content"]
        assert word == answer == ref[attr] == answer[pair["start"]: pair["end"]]
        # the paired occurrence is the referent's: count the objects named before it in the caption
        k = rec["align_text"][: pair["dm_start"]].count(" and ")
        assert k == rec["referent"]
        # pixels: the referent's mask has the answer colour (colour questions); the decoy's box is the largest
        if attr == "colour":
            image = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("RGB"))
            assert tuple(image[masks[rec["referent"]]][0]) == COLOURS[answer]
        assert dec["box"][2] > max(o["box"][2] for i, o in enumerate(rec["objects"]) if i != rec["decoy"])
        assert dec["size"] == "large" and ref["size"] == "small"
        # only referent and (when it shares) decoy carry the answer attribute; the name is unique
        carriers = [i for i, o in enumerate(rec["objects"]) if o[attr] == answer]
        assert carriers == sorted({rec["referent"], rec["decoy"]} if rec["decoy_shares"] else {rec["referent"]})
        name = "shape" if attr == "colour" else "colour"
        assert sum(o[name] == ref[name] for o in rec["objects"]) == 1
    # records load through the toolkit's reader, align_pairs validated
    assert all(r.align_pairs for r in read_records(path))


def test_combo_referents_are_held_out_pairs_never_seen_elsewhere() -> None:
    for i in range(100):
        scene, f = v2_example(0, "combo", i, 0.9)
        r = scene.objects[f["referent"]]
        assert (r.colour, r.shape) in HELD_OUT_PAIRS
        for split in ("train", "iid", "shift"):
            s, _ = v2_example(0, split, i, 0.9)
            assert not any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects)


def test_generator_is_deterministic_and_prefix_stable(tmp_path) -> None:
    a = write_v2_split(tmp_path / "a", "shift", 12, seed=5)
    b = write_v2_split(tmp_path / "b", "shift", 20, seed=5)
    assert open(a).read().splitlines() == open(b).read().splitlines()[:12]
    assert (tmp_path / "a/images/v2shift_000007.png").read_bytes() == \
        (tmp_path / "b/images/v2shift_000007.png").read_bytes()
    assert v2_example(1, "train", 0, 1.0)[0].caption != v2_example(2, "train", 0, 1.0)[0].caption or \
        v2_example(1, "train", 1, 1.0)[0].caption != v2_example(2, "train", 1, 1.0)[0].caption


def test_phrase_pairs_span_the_referents_colour_and_shape(tmp_path) -> None:
    """``pair="phrase"`` pairs the answer with "red circle" of the REFERENT: both of its words, never the
    decoy's (whose answer word may be the same), and its naming word occurs once in the caption."""
    from lavender.world.v2 import referent_phrase, with_pairs

    path = write_v2_split(tmp_path, "train", 40, seed=5, p=1.0, pair="phrase")
    for rec in map(json.loads, open(path)):
        (pair,) = rec["align_pairs"]
        ref = rec["objects"][rec["referent"]]
        assert rec["align_text"][pair["dm_start"]: pair["dm_end"]] == f"{ref['colour']} {ref['shape']}"
        assert rec["align_text"][: pair["dm_start"]].count(" and ") == rec["referent"]
        (c0, c1), (s0, s1) = referent_phrase(rec)
        assert (c0, s1) == (pair["dm_start"], pair["dm_end"]) and c1 < s0
        word = with_pairs({**rec, "pair": "word"}, "word")
        assert word["align_pairs"] == rec["align_pairs"]  # "word" leaves a record as it is
    with pytest.raises(ValueError, match="choose one of word, phrase"):
        write_v2_split(tmp_path, "train", 1, pair="sentence")


def test_binding_pressure_names_the_referent_by_two_attributes(tmp_path) -> None:
    """``binding=True``: the decoy carries the referent's naming word too, so the question must add the
    referent's side; the side is read from the PIXELS (mask centres), the pair still names the referent,
    the decoy shares the answer at rate p in train and never in shift, and plain v2 is unchanged."""
    for split, p in (("train", 1.0), ("shift", 1.0)):
        path = write_v2_split(tmp_path / split, split, 40, seed=2, p=p, binding=True)
        for rec in map(json.loads, open(path)):
            masks = load_object_masks(rec, tmp_path / split)
            ref, dec = rec["objects"][rec["referent"]], rec["objects"][rec["decoy"]]
            attr = "colour" if rec["type"] == "colour" else "shape"
            name = "shape" if attr == "colour" else "colour"
            assert ref[name] == dec[name] and sum(o[name] == ref[name] for o in rec["objects"]) == 2
            x_ref, x_dec = (np.nonzero(masks[rec[k]])[1].mean() for k in ("referent", "decoy"))
            side = "left" if x_ref < x_dec else "right"
            assert rec["messages"][0]["content"].endswith(f"{ref[name]}{' object' if name == 'colour' else ''} "
                                                          f"on the {side}?")
            assert rec["decoy_shares"] == (split == "train") == (dec[attr] == ref[attr])
            (pair,) = rec["align_pairs"]
            assert rec["align_text"][: pair["dm_start"]].count(" and ") == rec["referent"]
            assert rec["id"].startswith("v2b") and rec["binding"] is True
    plain = [v2_example(0, "train", i, 1.0)[0].caption for i in range(10)]
    assert plain != [v2_example(0, "train", i, 1.0, binding=True)[0].caption for i in range(10)]
    assert plain == [v2_example(0, "train", i, 1.0)[0].caption for i in range(10)]


def test_binding_needs_world_v2() -> None:
    from lavender.config import ScenesConfig, UsageError

    with pytest.raises(UsageError, match="--world v2"):
        ScenesConfig(out="x", n=3, binding=True)
