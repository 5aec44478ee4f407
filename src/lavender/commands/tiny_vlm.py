"""Write a tiny randomly initialised VLM and its processor (tokenizer built offline) to OUT.

The folder is in the standard ``save_pretrained`` layout: the model loads with
``AutoModelForImageTextToText.from_pretrained(OUT)`` and the processor with ``AutoProcessor`` (for
qwen2_vl and idefics3 without torchvision: the family's ``load_processor``). For smoke tests and
examples without downloads:

    lavender tiny-vlm --arch mllama /tmp/tiny-mllama
"""

from __future__ import annotations

from lavender.config import TinyVLMConfig

CONFIGS = (TinyVLMConfig,)


def main(args: TinyVLMConfig) -> int:
    from lavender.vlm.families import families

    if args.real_format:
        from lavender.vlm.formats import build_tiny_real_format
        from lavender.vlm.tiny import save_tiny

        save_tiny(*build_tiny_real_format(args.arch, seed=args.seed), args.out)
    else:
        families()[args.arch].make_tiny(args.out, seed=args.seed)
    fmt = " (released chat format)" if args.real_format else ""
    print(f"wrote a tiny {args.arch} model and its processor{fmt} to {args.out}")
    return 0
