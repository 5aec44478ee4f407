"""Word spans and message regions on a real-format tokenizer and template (issue: real chat formats).

The tiny models' word-level tokenizer drops spaces from token offsets; released tokenizers do not:
sentencepiece-style ``'▁Red'`` (and byte-level ``' Red'``) carry the space before the word, and
their offsets include it. The template here renders the LLaVA-1.5 conversation format
(``USER: <image>\\n… ASSISTANT: …</s>``), written for this test. Both defects below made a
one-word answer align NOTHING.
"""

from __future__ import annotations

import numpy as np
import pytest

from lavender.chat import label_positions, layout
from lavender.data_collator import _word_offsets
from lavender.vlm.rows import sample_word_rows

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


@pytest.fixture(scope="module")
def processor():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["USER: What colour is the circle? ASSISTANT: Red.", "Which one? A. B. C. ASSISTANT: A",
              "USER: Is it red? ASSISTANT: Red circle and a blue square."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=["<image>"])
    image = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image, fast, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TEMPLATE)


def _answer_words(processor, question: str, answer: str) -> tuple[object, list[str]]:
    lay = layout(processor, [{"role": "user", "content": "<image>" + question},
                             {"role": "assistant", "content": answer}])
    offsets = _word_offsets(lay, 0, len(lay.token_ids))
    (a, b), = lay.label_spans
    labelled = set(label_positions(lay))
    candidate = [j in labelled for j in range(len(lay.offsets))]
    return lay, [w.text for w in sample_word_rows(lay.text, offsets, candidate, "query")]


def test_the_first_word_of_an_answer_is_aligned_although_its_token_carries_the_space(processor) -> None:
    lay, words = _answer_words(processor, "What colour is the circle?", "Red.")
    (answer,) = [r for r in lay.regions if r.role == "assistant"]
    # the premise: the answer's first token starts on the space before the answer text
    assert any(s == answer.start - 1 and lay.text[s] == " " for s, _ in lay.offsets)
    assert words == ["Red"]
    # ... and that token is trained (a label), as is the end-of-turn marker
    eos = lay.token_ids.index(processor.tokenizer.eos_token_id)
    assert {eos, eos - 1} <= set(label_positions(lay))
    _, words = _answer_words(processor, "Is it red?", "Red circle and a blue square.")
    assert words[0] == "Red" and "square" in words


def test_a_one_letter_answer_is_found_after_the_role_header_not_inside_it(processor) -> None:
    lay, words = _answer_words(processor, "Which one? A. B. C.", "A")
    (answer,) = [r for r in lay.regions if r.role == "assistant"]
    assert lay.text[answer.start:answer.end] == "A"
    assert answer.start > lay.text.index("ASSISTANT:") + len("ASSISTANT")
    assert words == ["A"]


NO_EOS = (  # LLaVA-1.5's released format: a turn ends with a space, no end-of-turn marker
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def test_a_template_without_end_of_turn_still_trains_eos_and_never_the_next_turn(processor) -> None:
    processor.chat_template, saved = NO_EOS, processor.chat_template
    try:
        lay = layout(processor, [{"role": "user", "content": "<image>What colour is it?"},
                                 {"role": "assistant", "content": "Red."},
                                 {"role": "user", "content": "Is it a circle?"},
                                 {"role": "assistant", "content": "A"}])
    finally:
        processor.chat_template = saved
    tok = processor.tokenizer
    trained = [tok.convert_ids_to_tokens(lay.token_ids[j]) for j in sorted(label_positions(lay))]
    assert trained.count(tok.eos_token) == 2, trained  # the model learns to stop after each answer
    assert not any("USER" in t for t in trained), trained  # the next turn's header is never trained
    assert "".join(trained).replace("▁", " ").strip() == f"Red.{tok.eos_token} A{tok.eos_token}"


# ----------------------------------------------------------------------------- Llama-3.2-Vision
# The released Llama-3.2-Vision-Instruct format (lavender.vlm.formats): BOS, a system block with the
# date ONLY for conversations without images (the system content read as a string), an error for a
# system message together with images, `<|start_header_id|>role<|end_header_id|>\n\n` headers and
# `<|eot_id|>` after every turn; Llama-3's split regex then byte-level ('ĠRed').
@pytest.fixture(scope="module")
def llama():
    from lavender.vlm.formats import build_tiny_real_format

    return build_tiny_real_format("mllama")[1]


def _trained(proc, lay) -> str:
    return proc.tokenizer.decode([lay.token_ids[j] for j in sorted(label_positions(lay))])


def test_llama_system_prompt_is_rendered_as_text_not_a_list_repr(llama) -> None:
    """Defect 4: the released template reads the system content as a string; a list printed its repr."""
    from lavender.chat import render

    msgs = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "Red."}]
    text = render(llama, msgs)
    assert "Today Date: 26 Jul 2024\n\nAnswer in one word.<|eot_id|>" in text and "'type'" not in text
    assert _trained(llama, layout(llama, msgs)) == "Red.<|eot_id|>"


def test_llama_first_image_in_a_later_turn_labels_every_answer(llama) -> None:
    """Defect 5: the date block is written only for image-free prefixes, so the template is not
    prefix-stable when the first image comes in turn 3; both answers are still found and trained."""
    msgs = [{"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "<image>What colour is the circle?"},
            {"role": "assistant", "content": "Red."}]
    lay = layout(llama, msgs)
    assert "Cutting Knowledge" not in lay.text  # the conversation has an image: no date block
    assert _trained(llama, lay) == "A<|eot_id|>Red.<|eot_id|>"
    answers = [lay.text[r.start:r.end] for r in lay.regions if r.role == "assistant"]
    assert answers == ["A", "Red."]


def test_a_template_error_skips_and_counts_the_record(llama) -> None:
    """Defect 7: the released Llama template raises for a system message with an image; the collator
    skips that record (counted, named) and trains the rest of the batch."""
    from lavender.data_collator import LavenderCollator
    from lavender.records import Record
    from lavender.vlm.families import families

    img = _image_file()
    bad = Record(id="sys+image", index=0, images=[img], messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Colour?"},
        {"role": "assistant", "content": "Red."}])
    good = Record(id="ok", index=1, images=[img], messages=[{"role": "user", "content": "<image>Colour?"},
                                                     {"role": "assistant", "content": "Red."}])
    coll = LavenderCollator(llama, families()["mllama"], None)
    batch = coll([bad, good])
    assert batch["input_ids"].shape[0] == 1
    assert [i for i, _ in coll.skipped] == ["sys+image"] and "system messages" in coll.skipped[0][1]


def _image_file() -> str:
    import tempfile

    import numpy as np
    from PIL import Image

    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(path)
    return path


def test_an_answer_before_a_later_image_is_trained_and_its_words_counted_as_dropped(processor, tmp_path) -> None:
    """Defects 6 and 8: with LLaVA's image expansion, the first answer (before the second image) is
    trained, located through the processor's ids; its word cannot be aligned (rows are read after the
    last image) and is counted in ``n_dropped`` instead of vanishing from the match rate."""
    from lavender.attnstore import AttentionStore, AttentionWriter
    from lavender.config import AlignmentConfig
    from lavender.data_collator import LavenderCollator
    from lavender.records import Record
    from lavender.vlm.families import families
    from lavender.words import split_words

    img = _image_file()
    rec = Record(id="two", index=0, images=[img, img], messages=[
        {"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "<image>Which one? A. B."}, {"role": "assistant", "content": "A"}],
        align_text="a red circle")
    fam = families()["llava"]
    batch = LavenderCollator(processor, fam, None)([rec])
    labels = batch["labels"][0]
    trained = processor.tokenizer.decode(batch["input_ids"][0][labels != -100])
    assert trained.replace(" ", "") == "Red.</s>A</s>"
    ws = split_words("a red circle")
    writer = AttentionWriter(tmp_path / "attn", {"map_size": 8, "frame": "squash"})
    writer.add("two", [w.text for w in ws], [(w.start, w.end) for w in ws], np.random.rand(3, 8, 8).astype("float32"))
    writer.close()

    class Config:  # what the LLaVA family reads from a model config to find the image grid
        image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        image_token_index = image_token_id
        vision_config = type("V", (), {"image_size": 28, "patch_size": 14})()
        vision_feature_select_strategy = "default"

    align = LavenderCollator(processor, fam, Config(), AttentionStore(tmp_path / "attn"), [0],
                             AlignmentConfig())([rec])["lavender"]
    assert [w.text for w in align.rows.words[0]] == ["A"] and align.n_words == 1  # "A" matches the DM's "a"
    assert align.n_dropped == 1  # "Red." came before the last image
