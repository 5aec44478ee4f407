"""Model families, one file each; importing this package registers them all."""

from lavender.vlm.families.base import Family, ImageGrid, families, family_for_config, register_family

__all__ = ["Family", "ImageGrid", "families", "family_for_config", "register_family", "family_for_path"]


def _register_all() -> None:
    # Each module registers itself on import; a missing optional module is skipped, not fatal.
    import importlib

    for name in ("mllama", "llava", "qwen2_vl", "idefics3", "gemma3", "qwen3_vl", "llava_onevision",
                 "paligemma", "internvl", "minicpmv"):
        try:
            importlib.import_module(f"lavender.vlm.families.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lavender.vlm.families.{name}":
                raise


def family_for_path(path: str) -> Family:
    """The family of a model folder or hub id, from its ``config.json`` only (no weights loaded).

    A folder without a VLM config (e.g. a diffusers pipeline) gets an error naming the families.
    """
    import json
    import os

    cfg_path = os.path.join(path, "config.json")
    if os.path.isdir(path):
        if not os.path.exists(cfg_path):
            hint = " (it looks like a diffusers pipeline)" if os.path.exists(os.path.join(path, "model_index.json")) else ""
            raise ValueError(f"{path} has no config.json{hint}; expected a VLM of one of the supported "
                             f"families: {', '.join(families())}")
        with open(cfg_path) as f:
            return family_for_config(json.load(f))
    from transformers import AutoConfig

    return family_for_config(AutoConfig.from_pretrained(path))


_register_all()
