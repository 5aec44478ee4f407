"""Generate answers with a VLM, a LoRA run folder or a merged export.

Examples:
    lavender generate --model runs/lav --image cat.jpg --prompt "What colour is the cat?"
    lavender generate --model runs/lav --data test.jsonl --out answers.jsonl --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder / hub id, or a `lavender train` RUN_DIR")
    parser.add_argument("--image", help="one image (with --prompt)")
    parser.add_argument("--prompt", help="the question for --image")
    parser.add_argument("--data", help="records (JSONL): answer each record's last user turn")
    parser.add_argument("--out", help="with --data: write one JSON line per record (id, prediction)")
    parser.add_argument("--images-root", help="folder record image paths are relative to")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def main(args: argparse.Namespace) -> int:
    from lavender.generation import generate
    from lavender.records import iter_records, load_image
    from lavender.trainer import load_vlm

    if bool(args.image) == bool(args.data):
        raise SystemExit("lavender generate: give either --image with --prompt, or --data")
    model, processor, _ = load_vlm(args.model)
    model.to(args.device).eval()
    if args.image:
        if not args.prompt:
            raise SystemExit("lavender generate: --image needs --prompt")
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
