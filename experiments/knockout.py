"""Is the aligned row the path by which the answer is read? Steer it and watch the answer.

For a world-v2 Mllama VLM (pre-trained or fine-tuned) on ``shift``-type records (the decoy never
shares the answer), the row that predicts the answer word (the last prompt token: what Lavender
aligns with ``--row-owner next``) is restricted, in every cross-attention layer, to the image keys
of ONE object — the referent, or the decoy — and the first answer token is read greedily from the
logits (world answers are one token). If steering to the referent lifts accuracy and steering to the
decoy makes the model name the decoy's attribute, the row is causal, and its accuracy under
referent-steering is the ceiling of what aligning that row can buy. If neither moves the answer,
the answer is read through other rows (the question's tokens attend to the image too), and
aligning the answer row cannot be expected to change answers — whatever the teacher.

    python experiments/knockout.py --model demo_out/runs/ar/seed0/run --records demo_out/data/shift.jsonl

Keys of a grid cell are kept when the object covers at least ``--min-cover`` of the cell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lavender.chat import adds_special_tokens, render
from lavender.generation import prompt_messages
from lavender.records import load_image
from lavender.vlm.load import load_vlm
from lavender.world.write import load_object_masks

BACKEND = "lavender_steer"


def steer_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA, with the steered rows of the armed plan allowed only their listed keys."""
    plan = getattr(module, "_steer_plan", None)
    if plan is not None and query.shape[2] > 1:  # prefill only: the answer token's row
        bsz, _, t_len, _ = query.shape
        s_len = key.shape[2]
        add = torch.zeros(bsz, 1, t_len, s_len, dtype=query.dtype, device=query.device)
        for b, (row, keys) in enumerate(plan):
            if row is None:
                continue
            add[b, 0, row, :] = torch.finfo(query.dtype).min
            add[b, 0, row, keys] = 0.0
        if attention_mask is None:
            attention_mask = add
        elif attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype) + add
        else:
            attention_mask = attention_mask + add
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def object_keys(grid: Any, mask: np.ndarray, min_cover: float) -> torch.Tensor:
    """Key positions of the grid cells the (image-sized, whole-image grid) mask covers."""
    h, w = mask.shape
    cells = []
    for r in range(grid.rows):
        for c in range(grid.cols):
            block = mask[r * h // grid.rows:(r + 1) * h // grid.rows, c * w // grid.cols:(c + 1) * w // grid.cols]
            if block.size and block.mean() >= min_cover:
                cells.append(r * grid.cols + c)
    return grid.key_index[torch.tensor(cells, dtype=torch.long)] if cells else grid.key_index[:0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--records", required=True)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--min-cover", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    AttentionInterface.register(BACKEND, steer_forward)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)
    model, processor, family = load_vlm(a.model)
    model.eval()
    if not family.cross_attention:
        raise SystemExit("knockout.py steers cross-attention rows (Mllama); this model is " + family.name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation({family.text_config_name(): BACKEND})
    modules = family.attention_modules(base)
    path = Path(a.records)
    recs = [json.loads(ln) for ln in open(path) if ln.strip()][: a.limit]
    tok = processor.tokenizer
    tok.padding_side = "left"
    tally: dict[str, dict[str, int]] = {c: {"right": 0, "decoy": 0, "n": 0} for c in ("none", "referent", "decoy")}
    for i in range(0, len(recs), a.batch_size):
        chunk = recs[i: i + a.batch_size]
        images = [[load_image(path.parent / p) for p in r["images"]] for r in chunk]
        texts = [render(processor, prompt_messages(r["messages"]), add_generation_prompt=True) for r in chunk]
        batch = processor(text=texts, images=images, padding=True, return_tensors="pt",
                          add_special_tokens=adds_special_tokens(tok, texts[0]))
        grids = {g.batch_index: g for g in reversed(family.image_grids(
            batch, [[im.size for im in ims] for ims in images], config=base.config, processor=processor))}
        last = batch["input_ids"].shape[1] - 1  # left padding: the last position predicts the answer
        for cond in tally:
            plan = None
            if cond != "none":
                plan = []
                for b, r in enumerate(chunk):
                    mask = load_object_masks(r, path.parent)[r[cond]]
                    plan.append((last, object_keys(grids[b], np.asarray(mask), a.min_cover)))
            for m in modules.values():
                m._steer_plan = plan
            with torch.no_grad():
                logits = model(**batch).logits[:, -1]
            answers = tok.batch_decode(logits.argmax(-1)[:, None], skip_special_tokens=True)
            for r, ans in zip(chunk, answers):
                attr = "colour" if r["type"] == "colour" else "shape"
                t = tally[cond]
                t["n"] += 1
                t["right"] += ans.strip() == r["answers"][0]
                t["decoy"] += ans.strip() == r["objects"][r["decoy"]][attr]
    for m in modules.values():
        m._steer_plan = None
    table = {c: {"accuracy": t["right"] / t["n"], "names_decoy": t["decoy"] / t["n"], "n": t["n"]}
             for c, t in tally.items()}
    print(json.dumps({"model": a.model, **table}, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "records": a.records, **table}, indent=2))


if __name__ == "__main__":
    main()
