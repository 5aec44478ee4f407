"""The miniature world: procedural scenes with exact per-word masks, VQA questions and splits.

Small enough for a 2-core CPU, rich enough to test the method: the ground-truth masks say where a
colour or shape word's attention SHOULD be, which real data never tells. See docs/world.md.
"""

from lavender.world.questions import ANSWERS, KINDS, TEMPLATES, Question, make_question, vocabulary
from lavender.world.scenes import (
    CAPTION_WORDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SEEN_PAIRS,
    SHAPES,
    SIZE,
    SPLITS,
    Batch,
    Scene,
    SceneObject,
    WordMasks,
    downsample_masks,
    make_scene,
    sample_batch,
    shape_mask,
    union_mask,
)
from lavender.world.write import (
    load_object_masks,
    load_word_masks,
    record_rng,
    vqa_example,
    write_captions,
    write_split,
)

__all__ = [
    "ANSWERS", "CAPTION_WORDS", "COLOURS", "HELD_OUT_PAIRS", "KINDS", "SEEN_PAIRS", "SHAPES", "SIZE",
    "SPLITS", "TEMPLATES", "Batch", "Question", "Scene", "SceneObject", "WordMasks", "downsample_masks",
    "load_object_masks", "load_word_masks", "make_question", "make_scene", "record_rng", "sample_batch",
    "shape_mask", "union_mask", "vocabulary", "vqa_example", "write_captions", "write_split",
]
