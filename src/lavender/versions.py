"""The software a result was made with.

Float32 training on a CPU is deterministic for a fixed seed and thread count, but only for fixed
library versions: a new transformers, torch or pillow release can change a kernel, a default or a
rendered pixel, and with it every trajectory downstream. Every result file Lavender writes (Stage 1
manifests, run results, experiment summaries) records these versions, so a number that moved can be
traced to the environment rather than the code; ``constraints.txt`` pins the environment that
README's numbers were made with (docs/reproducibility.md).
"""

from __future__ import annotations

from importlib import metadata

# The distributions whose version can change a number Lavender reports.
PACKAGES = ("lavender-vlm", "torch", "transformers", "diffusers", "peft", "accelerate", "tokenizers",
            "safetensors", "numpy", "pillow", "simplemma")


def software_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`PACKAGES` (``None`` where one is not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
