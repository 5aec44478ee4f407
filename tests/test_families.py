"""Family registry, detection from configs, tiny models (save/load/forward) and their processors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.vlm.families import Family, families, family_for_config, family_for_path, register_family
from lavender.vlm.families.base import middle_layers

ARCHS = sorted(families())  # every registered family, with no list to keep in sync


def test_registry_has_the_supported_families_and_rejects_duplicates():
    assert {"mllama", "llava", "qwen2_vl", "idefics3"} <= set(ARCHS)  # the README's supported families
    with pytest.raises(ValueError, match="already registered"):
        @register_family
        class Again(Family):  # noqa: F811 - the point is the duplicate name
            name = "llava"


@pytest.mark.parametrize("model_type,name", [("mllama", "mllama"), ("llava", "llava"), ("qwen2_vl", "qwen2_vl"),
                                             ("qwen2_5_vl", "qwen2_vl"), ("idefics3", "idefics3"),
                                             ("smolvlm", "idefics3"), ("gemma3", "gemma3"), ("qwen3_vl", "qwen3_vl"),
                                             ("paligemma", "paligemma"), ("minicpmv4_6", "minicpmv"),
                                             ("llava_onevision", "llava_onevision"), ("llava_next", "llava_next"),
                                             ("internvl", "internvl")])
def test_detection_from_config(model_type, name):
    assert family_for_config({"model_type": model_type}).name == name


def test_unknown_architecture_names_the_families(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported model architecture 'bert'.*mllama.*llava"):
        family_for_config({"model_type": "bert"})
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="diffusers pipeline.*supported families"):
        family_for_path(str(tmp_path))


def test_middle_layers_default_subset():
    assert middle_layers(32) == [8, 11, 14, 18, 21, 24]
    assert middle_layers(4) == [2]
    assert all(len(middle_layers(n)) == max(1, round(n / 5)) for n in range(1, 81))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_with_standard_class_and_runs(tiny_vlm, arch):
    from transformers import AutoModelForImageTextToText

    path = tiny_vlm(arch)
    fam = family_for_path(path)
    assert fam.name == arch
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = fam.load_processor(path)
    assert hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [[image]] if arch in ("mllama", "idefics3") else [image]
    inputs = fam.encode(processor, [text], images, return_tensors="pt")  # as the collator does
    out = model(**{**inputs, "labels": inputs["input_ids"]})  # PaliGemma's processor returns labels too
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == inputs["input_ids"].shape
    out.loss.backward()

    # the family's view of the same model
    modules = fam.attention_modules(model)
    assert modules and set(fam.default_layers(model)) <= set(modules)
    if arch == "mllama":
        assert sorted(modules) == list(model.config.text_config.cross_attention_layers) == fam.default_layers(model)
    lora = [n for n, _ in model.named_modules() if re.fullmatch(fam.lora_target_regex, n)]
    assert lora and not any("vision" in n for n in lora)  # language model only, never the vision tower
    mask = fam.image_token_mask(inputs["input_ids"], model.config)
    grids = fam.image_grids(inputs, [[(70, 40)]], model.config, processor)
    assert len(grids) == 1 and grids[0].key_index.numel() == grids[0].rows * grids[0].cols
    if not fam.cross_attention:  # grid keys are image placeholders of input_ids
        assert mask[0, grids[0].key_index].all()


def test_tokenizer_offsets_and_fallback(tiny_vlm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vlm("llava"))
    enc = tok("A zebra, left of 42 dogs.", return_offsets_mapping=True, add_special_tokens=False)
    text = "A zebra, left of 42 dogs."
    pieces = [text[a:b].lower() for a, b in enc["offset_mapping"]]
    assert pieces[:2] == ["a", "z"] and "left" in pieces and "," in pieces  # unknown words → letters
    assert tok.unk_token_id not in enc["input_ids"]


def test_tiny_vlm_command(tmp_path):
    from lavender.cli import main

    assert main(["tiny-vlm", "--arch", "llava", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert family_for_path(str(tmp_path / "m")).name == "llava"
    assert main(["tiny-vlm", "--arch", "nope", str(tmp_path / "x")]) == 2  # at parse time, naming the families
    assert not (tmp_path / "x").exists()
