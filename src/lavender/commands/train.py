"""Stage 2: fine-tune a VLM with L = L_VLM + λ·L_att (Lavender), on transformers' Trainer.

Every ``TrainingArguments`` option is accepted too (``--per_device_train_batch_size``,
``--gradient_accumulation_steps``, ``--bf16``, ``--gradient_checkpointing``, ``--report_to`` …).
What is aligned (``--layers``, ``--aggregation``, ``--row-owner``, ``--align-on``, ``--match``) is
saved in RUN_DIR/lavender_alignment.json, which ``analyze`` and ``attend`` read back. For Python
tracebacks of errors use ``lavender --debug train ...`` or LAVENDER_DEBUG=1 (``--debug`` itself is
a TrainingArguments option).

Examples:
    lavender train --model world/vlm --data train.jsonl --attention attn/ --out runs/lav --max-steps 200
    lavender train --config examples/llama32_11b_lora.yaml
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m lavender train --config ...
"""

from __future__ import annotations

from typing import Any

import lavender.config as config

CONFIGS = (config.TrainConfig, config.AlignmentConfig)


def main(train: Any, alignment: config.AlignmentConfig) -> int:
    from lavender.trainer import run_training

    run_training(train, alignment)
    return 0
