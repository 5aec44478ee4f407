"""Loading a VLM — a model folder, a hub id, or a `lavender train` run folder — with its family.

Evaluation, generation, analysis and training all load models here, so a run folder (a PEFT
adapter beside ``adapter_config.json``, or a full fine-tune) is accepted everywhere a model is, and
a wrong path fails with one clear message before any weights are read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lavender.config import LavenderError


def _looks_local(path: str) -> bool:
    """A path the user meant as a folder (hub ids are ``name`` or ``org/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def resolve_family(path: str) -> Any:
    """The family of ``path`` (see :func:`lavender.vlm.families.family_for_path`), errors as one line."""
    from lavender.vlm.families import family_for_path

    if not os.path.exists(path) and _looks_local(path):
        raise LavenderError(f"--model {path}: no such folder (give a VLM folder, a hub id, or a run folder)")
    try:
        return family_for_path(path)
    except ValueError as e:
        raise LavenderError(f"--model {path}: {e}") from None
    except OSError as e:
        raise LavenderError(f"--model {path}: not a local folder, and loading it from the hub failed "
                            f"({str(e).splitlines()[0]})") from None


def base_model_of(run_dir: str) -> str | None:
    """The base model a LoRA run folder was trained from (``None`` for a plain model folder)."""
    adapter_cfg = os.path.join(run_dir, "adapter_config.json")
    if not os.path.exists(adapter_cfg):
        return None
    with open(adapter_cfg) as f:
        return json.load(f)["base_model_name_or_path"]


def load_vlm(path: str, dtype: Any = None) -> tuple[Any, Any, Any]:
    """``(model, processor, family)`` of a VLM folder or hub id, or of a LoRA run folder (adapter applied)."""
    from transformers import AutoModelForImageTextToText

    base_path = base_model_of(path) if os.path.isdir(path) else None
    if base_path is not None:
        from peft import PeftModel

        family = resolve_family(base_path)
        model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype)
        model = PeftModel.from_pretrained(model, path)
        has_proc = any(os.path.exists(os.path.join(path, n)) for n in ("processor_config.json",
                                                                        "preprocessor_config.json"))
        return model, family.load_processor(path if has_proc else base_path), family
    family = resolve_family(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return model, family.load_processor(path), family
