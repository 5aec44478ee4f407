"""Word spans and message regions on a real-format tokenizer and template (issue: real chat formats).

The tiny models' word-level tokenizer drops spaces from token offsets; released tokenizers do not:
sentencepiece-style ``'▁Red'`` (and byte-level ``' Red'``) carry the space before the word, and
their offsets include it. The template here renders the LLaVA-1.5 conversation format
(``USER: <image>\\n… ASSISTANT: …</s>``), written for this test. Both defects below made a
one-word answer align NOTHING.
"""

from __future__ import annotations

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
