"""Generate answers with a VLM, a LoRA run folder or a merged export.

Examples:
    lavender generate --model runs/lav --image cat.jpg --prompt "What colour is the cat?"
    lavender generate --model runs/lav --data test.jsonl --out answers.jsonl --batch-size 16
"""

from __future__ import annotations

import json
import sys

from lavender.config import GenerateConfig

CONFIGS = (GenerateConfig,)


def main(args: GenerateConfig) -> int:
    from lavender.generation import generate
    from lavender.records import iter_records, load_image
    from lavender.vlm.load import load_vlm

    model, processor, _ = load_vlm(args.model)
    model.to(args.device).eval()
    if args.image:
        msgs = [{"role": "user", "content": "<image>" + args.prompt}]
        print(generate(model, processor, [(msgs, [load_image(args.image)])], args.max_new_tokens, 1)[0])
        return 0
    records = [r for r in iter_records(args.data, images_root=args.images_root) if not isinstance(r, Exception)]
    prompts = [(r.messages, [load_image(p) for p in r.images]) for r in records]
    answers = generate(model, processor, prompts, args.max_new_tokens, args.batch_size, progress=True)
    sink = open(args.out, "w") if args.out else sys.stdout
    try:
        for r, a in zip(records, answers):
            sink.write(json.dumps({"id": r.id, "prediction": a}) + "\n")
    finally:
        if args.out:
            sink.close()
    return 0
