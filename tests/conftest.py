"""Shared fixtures: tiny random VLMs built once per test session (offline, a few seconds each).

Fixtures:
    tiny_vlm: a function ``arch -> path`` (``arch`` in ``mllama``, ``llava``, ``qwen2_vl``,
        ``idefics3``) that builds the family's tiny model + processor on first use and returns
        the same folder afterwards. Use it in any test: ``path = tiny_vlm("mllama")``.
    tiny_mllama_dir, tiny_llava_dir: shortcuts for the two most used families.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    from lavender.vlm.families import families

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            out = str(tmp_path_factory.mktemp(f"tiny_{arch}"))
            families()[arch].make_tiny(out, seed=0)
            built[arch] = out
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_mllama_dir(tiny_vlm: Callable[[str], str]) -> str:
    return tiny_vlm("mllama")


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_vlm: Callable[[str], str]) -> str:
    return tiny_vlm("llava")
