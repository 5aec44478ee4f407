"""The one config system: dataclasses, the parser (flags + YAML, one vocabulary), saved alignment."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from lavender.config import (
    AGGREGATIONS,
    ALIGNMENT_FILE,
    AlignmentConfig,
    AnalyzeConfig,
    DemoConfig,
    ExtractConfig,
    LavenderError,
    LavenderParser,
    UsageError,
    config_from_file,
    saved_alignment,
)


def _extract_parser() -> LavenderParser:
    return LavenderParser([ExtractConfig], prog="lavender extract")


def test_flags_and_yaml_share_one_vocabulary(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    # field name, dashed spelling and old alias are all the same option
    cfg.write_text("out: /tmp/a\nbatch-size: 3\nlayers: [down_blocks.0]\nresolutions: [16]\n")
    (e,) = _extract_parser().parse(["--dm", "d", "--data", "r.jsonl", "--config", str(cfg), "--batch_size", "5"])
    assert (e.out, e.batch_size, e.modules, e.resolutions) == ("/tmp/a", 5, ["down_blocks.0"], [16])  # flag wins


def test_train_aliases_in_yaml_and_flags(tmp_path) -> None:
    import lavender.config as config

    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: m\ndata: d.jsonl\nout: runs/x\nlambda: 2.5\nfull: true\naggregation: mean-max\n"
                   "layers: 0,3\nuse_cpu: true\n")
    parser = LavenderParser([config.TrainConfig, AlignmentConfig], prog="lavender train")
    train, align = parser.parse(["--config", str(cfg)])
    assert (train.output_dir, train.lambda_att, train.lora) == ("runs/x", 2.5, False)
    assert (align.aggregation, align.layers) == ("mean-max", [0, 3])
    train, _ = parser.parse(["--config", str(cfg), "--lambda_att", "0"])
    assert train.lambda_att == 0.0


@pytest.mark.parametrize("yaml_text, message", [
    ("recipe: ddm\n", "choose one of ddim, nulltext"),
    ("recipes: ddim\n", "unknown option 'recipes'"),
    ("- a\n- b\n", "must be a mapping"),
    ("strict: maybe\n", "takes true or false"),
])
def test_bad_yaml_fails_at_parse_time(tmp_path, yaml_text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(UsageError, match=message):
        _extract_parser().parse(["--dm", "d", "--data", "r", "--out", "o", "--config", str(cfg)])


def test_missing_config_file_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="cannot read it"):
        _extract_parser().parse(["--config", str(tmp_path / "nope.yaml")])


def test_alignment_config_validates_in_python_too() -> None:
    with pytest.raises(UsageError, match="--aggregation 'meen-mean': choose one of heads, mean-mean"):
        AlignmentConfig(aggregation="meen-mean")
    with pytest.raises(UsageError, match="--row-owner"):
        AlignmentConfig(row_owner="previous")
    with pytest.raises(UsageError, match="integers"):
        AlignmentConfig(layers="a,b")
    assert AlignmentConfig(layers=["1,2", "5"]).layers == [1, 2, 5]
    assert AlignmentConfig(layers="").layers is None


def test_every_listed_aggregation_is_implemented() -> None:
    import torch

    from lavender.vlm.aggregate import pool

    maps = {0: torch.rand(1, 2, 3, 5).softmax(-1), 1: torch.rand(1, 2, 3, 5).softmax(-1)}
    for name in AGGREGATIONS:
        out = pool(maps, name, torch.ones(1, 3))
        assert out.shape[-1] == 5 and torch.isfinite(out).all(), name


def test_dtype_names_match_the_torch_table() -> None:
    from lavender.config import DTYPE_NAMES
    from lavender.diffusion.extract import DTYPES

    assert set(DTYPES) == set(DTYPE_NAMES)


def test_every_choice_field_is_a_literal_with_a_help_text() -> None:
    import lavender.config as config

    for dtype in (ExtractConfig, AlignmentConfig, AnalyzeConfig, DemoConfig, config.TrainConfig):
        own = {f.name for f in dataclasses.fields(dtype)}
        if dtype is config.TrainConfig:  # TrainingArguments' own fields keep their own help
            from transformers import TrainingArguments

            own -= {f.name for f in dataclasses.fields(TrainingArguments)} - {"output_dir", "learning_rate"}
        for f in dataclasses.fields(dtype):
            if f.name in own and f.init:
                assert f.metadata.get("help"), f"{dtype.__name__}.{f.name} has no help text"
    hints = typing.get_type_hints(AlignmentConfig)
    assert typing.get_args(hints["aggregation"]) == AGGREGATIONS


def test_demo_quick_keeps_explicit_values() -> None:
    assert DemoConfig(quick=True).steps == 20
    assert DemoConfig(quick=True, steps=60).steps == 60
    with pytest.raises(UsageError, match="--ratio"):
        DemoConfig(ratio=-1)
    with pytest.raises(UsageError, match=r"--p 1\.5"):
        DemoConfig(p=1.5)


def test_config_from_file_is_the_parser(tmp_path) -> None:
    f = tmp_path / "stage1.yaml"
    f.write_text("resolutions: [16]\nlayers: [up_blocks.1.attentions.0]\n")
    cfg = config_from_file(ExtractConfig, str(f), dm="d", data="r", out="o", batch_size=16)
    assert (cfg.resolutions, cfg.modules, cfg.batch_size) == ([16], ["up_blocks.1.attentions.0"], 16)


def test_committed_world_dm_stage1_file_parses() -> None:
    from lavender.world.demo import CHECKPOINTS, stage1_config

    cfg = stage1_config(str(CHECKPOINTS / "dm"), "r.jsonl", "o")
    assert cfg.resolutions == [16] and cfg.modules == ["up_blocks.1.attentions.0"] and cfg.recipe == "ddim"


def test_saved_alignment_round_trip_and_versions(tmp_path) -> None:
    align = AlignmentConfig(aggregation="mean-max", align_on="all", match="lemma")
    align.save(str(tmp_path), resolved_layers=[1, 3])
    assert AlignmentConfig.load(str(tmp_path)) == AlignmentConfig(layers=[1, 3], aggregation="mean-max",
                                                                 align_on="all", match="lemma")
    # a run folder from before lavender_alignment.json: lavender_run.json held the same fields
    old = tmp_path / "old"
    old.mkdir()
    (old / "lavender_run.json").write_text(json.dumps({"aggregation": "flow-sum", "layers": "2", "lora_r": 8}))
    assert saved_alignment(str(old)) == {"aggregation": "flow-sum", "layers": "2"}
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / ALIGNMENT_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(LavenderError, match="newer than this Lavender"):
        saved_alignment(str(newer))
    assert saved_alignment(str(tmp_path / "missing")) is None


def test_warns_when_alignment_options_are_ignored() -> None:
    import lavender.config as config

    train = config.TrainConfig(model="m", data="d", output_dir="o", lambda_att=0.0, use_cpu=True)
    with pytest.warns(UserWarning, match="--aggregation will be ignored: no --attention"):
        config.warn_ignored_alignment(train, AlignmentConfig(aggregation="mean-mean"))


@dataclasses.dataclass
class _Positional:
    root: str = dataclasses.field(default=dataclasses.MISSING, metadata={"help": "a folder", "positional": True,
                                                                          "metavar": "DIR"})
    sources: list[str] = dataclasses.field(default_factory=list, metadata={"help": "files", "positional": True})
    json: bool = dataclasses.field(default=False, metadata={"help": "json"})


def test_positional_fields_bare_as_flag_or_in_yaml(tmp_path) -> None:
    parser = LavenderParser([_Positional], prog="lavender x")
    assert parser.parse(["a", "b", "c", "--json"])[0] == _Positional("a", ["b", "c"], True)
    assert parser.parse(["--json", "--root", "a"])[0] == _Positional("a", [], True)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("root: r\nsources: [s]\n")
    assert parser.parse(["--config", str(cfg)])[0] == _Positional("r", ["s"], False)
    with pytest.raises(SystemExit):
        parser.parse(["--json"])  # DIR is required
    with pytest.raises(SystemExit):
        parser.parse(["a", "--bogus"])
