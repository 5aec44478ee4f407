"""Export a training run as a plain Hugging Face model folder (for VLMEvalKit, lmms-eval, vLLM …).

``--merge`` folds the LoRA adapter into the base weights (``merge_and_unload``) and saves the model
and its processor; the result loads with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
needs neither PEFT nor Lavender. The Aligner is a training-time module and is not exported.

Example:
    lavender export runs/lav --merge --out exports/lav-merged
"""

from __future__ import annotations

from lavender.config import ExportConfig, UsageError

CONFIGS = (ExportConfig,)


def main(args: ExportConfig) -> int:
    from lavender.vlm.load import load_vlm

    model, processor, _ = load_vlm(args.run_dir)
    if hasattr(model, "merge_and_unload"):
        if not args.merge:
            raise UsageError(f"{args.run_dir} is a LoRA adapter; pass --merge to fold it into the base model")
        model = model.merge_and_unload()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0
