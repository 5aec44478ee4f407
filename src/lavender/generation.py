"""Batched greedy generation with the family's chat template (``lavender generate`` / ``eval``).

Prompts are the record's conversation up to (not including) its last assistant turn, rendered with
``add_generation_prompt=True`` — the same template the trainer used, so a fine-tuned model is asked
exactly as it was taught. Batches are left-padded (decoder-only generation needs the prompts to end
at the same column).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lavender.chat import adds_special_tokens, render


def prompt_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation a model answers: everything before the final assistant turn."""
    msgs = list(messages)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs:
        raise ValueError("a prompt needs at least one user turn")
    return msgs


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _family_of(model: Any) -> Any:
    """The model's family (None for a model no family handles: the processor is then called directly)."""
    from lavender.vlm.families import family_for_config

    try:
        return family_for_config(getattr(model, "config", None) or {})
    except ValueError:
        return None


@torch.inference_mode()
def generate(model: Any, processor: Any, prompts: Sequence[tuple[Sequence[dict[str, Any]], list[Any]]],
             max_new_tokens: int = 32, batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy answers for ``(messages, images)`` prompts, in order.

    Args:
        model: a VLM (or PEFT model) in eval mode.
        processor: its processor (tokenizer padding side is set to left for the call and restored).
        prompts: per prompt, the messages (``"<image>"`` tags in the text) and its PIL images.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per ``generate`` call.
    """
    from tqdm.auto import tqdm

    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    family = _family_of(model)
    try:
        bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
        for chunk in _batches(prompts, batch_size):
            texts = [render(processor, prompt_messages(m), add_generation_prompt=True) for m, _ in chunk]
            images = [list(ims) for _, ims in chunk]
            kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt",
                                      "add_special_tokens": adds_special_tokens(tok, texts[0])}
            if any(images):
                kwargs["images"] = images
            # the family runs the processor (PaliGemma: the rendered prompt is its processor's own prefix)
            batch = (processor(**kwargs) if family is None else
                     family.encode(processor, kwargs.pop("text"), kwargs.pop("images", None), **kwargs)).to(device)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out.extend(s.strip() for s in tok.batch_decode(new, skip_special_tokens=True))
            bar.update(len(chunk))
        bar.close()
    finally:
        tok.padding_side = side
    return out
