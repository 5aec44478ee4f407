"""Every command on a corpus of bad invocations: one clear line, a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lavender.cli import main


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_vlm) -> dict[str, str]:
    from _stage1_fixtures import tiny_dm_path

    root = tmp_path_factory.mktemp("bad")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "unknown.yaml").write_text("recipes: ddim\n")
    (root / "typo.yaml").write_text("aggregation: meen-mean\n")
    (root / "records.jsonl").write_text('{"id": "a", "images": ["x.png"], "messages": []}\n')
    return {"root": str(root), "dm": tiny_dm_path(), "vlm": tiny_vlm("llava"), "missing": str(root / "nope")}


def _cases(p: dict[str, str]) -> list[tuple[list[str], int, str]]:
    """(argv, exit code, a fragment the message must contain)."""
    r, dm, vlm, missing = p["root"], p["dm"], p["vlm"], p["missing"]
    need = ["--data", f"{r}/records.jsonl", "--out", f"{r}/o"]
    return [
        # choice typos of every command: parse time, the valid choices named
        (["extract", "--dm", dm, *need, "--recipe", "ddm"], 2, "ddim"),
        (["extract", "--dm", dm, *need, "--frame", "crop"], 2, "center-crop"),
        (["extract", "--dm", dm, *need, "--dtype", "fp8"], 2, "bf16"),
        (["train", "--model", vlm, *need, "--aggregation", "meen-mean"], 2, "mean-mean"),
        (["train", "--model", vlm, *need, "--att-loss", "l1"], 2, "mass"),
        (["train", "--model", vlm, *need, "--row_owner", "prev"], 2, "query"),
        (["train", "--model", vlm, *need, "--config", f"{r}/typo.yaml"], 2, "choose one of heads"),
        (["analyze", "--attention", missing, "--out", f"{r}/a", "--match", "fuzzy"], 2, "lemma"),
        (["attend", "--model", vlm, "--image", "x.png", "--text", "t", "--out", "o.npz", "--align-on", "some"], 2,
         "answer"),
        (["eval", "--model", vlm, *need, "--metric", "exakt"], 2, "exact"),
        (["data", "convert", "--from", "flikr", "--in", "x", "--out", "y"], 2, "flickr30k"),
        (["world", "scenes", "--out", f"{r}/w", "--n", "2", "--split", "tset"], 2, "test"),
        (["world", "train-vlm", "--out", f"{r}/w", "--arch", "gpt"], 2, "mllama"),
        (["tiny-vlm", "--arch", "nope", f"{r}/t"], 2, "llava"),
        (["tiny-dm", f"{r}/t", "--architecture", "sd99"], 2, "sd14"),
        (["demo", "--p", "1.5"], 2, "[0, 1]"),
        # unknown flags, unknown YAML keys, broken config files, missing options
        (["extract", "--dm", dm, *need, "--bogus"], 2, "unrecognized"),
        (["extract", "--dm", dm, *need, "--config", f"{r}/unknown.yaml"], 2, "unknown option 'recipes'"),
        (["extract", "--dm", dm, *need, "--config", f"{r}/list.yaml"], 2, "mapping"),
        (["extract", "--dm", dm, *need, "--config", f"{r}/missing.yaml"], 2, "cannot read"),
        (["extract", "--data", "x"], 2, "required"),
        (["inspect"], 2, "ATTN_DIR"),
        (["world", "nope"], 2, "scenes"),
        (["nope"], 2, "unknown command"),
        (["generate", "--model", vlm], 2, "--image"),
        (["extract", "--dm", dm, *need, "--steps", "0"], 2, ">= 1"),
        # paths and models that do not exist or are the wrong kind
        (["inspect", missing], 2, "not an attention dataset"),
        (["attend", "--model", dm, "--image", missing, "--text", "t", "--out", "o.npz"], None, "cannot read"),
        (["eval", "--model", dm, *need], 1, "diffusers pipeline"),
        (["eval", "--model", missing, *need], 1, "no such folder"),
        (["train", "--model", vlm, "--data", missing, "--out", f"{r}/run"], None, "nope"),
        (["analyze", "--attention", missing, "--out", f"{r}/a"], 2, "not an attention dataset"),
        (["data", "mix", missing, "--out", f"{r}/m.jsonl"], 2, "nope"),
        (["export", missing, "--out", f"{r}/e"], 1, "no such folder"),
    ]


def test_bad_invocations_give_one_line_and_no_traceback(paths, capsys) -> None:
    failures = []
    for argv, code, fragment in _cases(paths):
        got = main(argv)
        out = capsys.readouterr()
        text = out.out + out.err
        lines = [ln for ln in out.err.splitlines() if "error:" in ln]
        ok = (got != 0 and (code is None or got == code) and "Traceback" not in text and lines
              and lines[-1].startswith(f"lavender {argv[0]}" if argv[0] != "nope" else "lavender")
              and fragment in lines[-1])
        if not ok:
            failures.append(f"{argv}: exit {got} (want {code}), stderr {out.err[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback(paths, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LAVENDER_DEBUG", "1")
    assert main(["inspect", paths["missing"]]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_real_terminal_sees_no_traceback(paths) -> None:
    res = subprocess.run([sys.executable, "-m", "lavender", "extract", "--dm", paths["dm"], "--data", "x",
                          "--out", "y", "--recipe", "ddm"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("lavender extract: error:")
