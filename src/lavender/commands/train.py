"""Stage 2: fine-tune a VLM with L = L_VLM + λ·L_att (Lavender), on transformers' Trainer.

Every ``TrainingArguments`` option is accepted too (``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--gradient_checkpointing``, ``--report_to`` …).

Examples:
    lavender train --model world/vlm --data train.jsonl --attention attn/ --out runs/lav --max-steps 200
    lavender train --config examples/llama32_11b_lora.yaml
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m lavender train --config ...
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from lavender.trainer import LavenderArguments, run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(LavenderArguments)
    for f in dataclasses.fields(LavenderArguments):
        if not f.init:
            continue
        f.type = hints[f.name]
        HfArgumentParser._parse_dataclass_field(parser, f)
    parser.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning instead of LoRA")


def main(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(LavenderArguments) if f.init}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    run_training(LavenderArguments(**kwargs))
    return 0
