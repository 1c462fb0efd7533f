"""The command line is generated from the pydantic configs: every option once, nested ones through --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import build_parser
from distill.config import ConfigError, config_from_args


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_train_options_come_from_train_config(tmp_path):
    from distill.train.config import TrainConfig

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("data: from-yaml\nmax_steps: 7\nlora: {rank: 16}\n")
    args = parse("train", "--config", str(yaml_file), "--data", "D", "--max-steps", "3", "--no-packing",
                 "--method", "on-policy", "--set", "lora.rank=4", "--set", "on_policy.rounds=3")
    config = config_from_args(TrainConfig, args)
    # Named options beat --set, which beats the YAML; nested fields keep their YAML siblings.
    assert (config.data, config.max_steps, config.packing, config.method) == ("D", 3, False, "on-policy")
    assert config.lora.rank == 4 and config.on_policy.rounds == 3


def test_every_scalar_field_has_its_option_and_its_description_as_help(capsys):
    from distill.evaluate.config import EvalConfig

    with pytest.raises(SystemExit):
        parse("eval", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for name in ("--selection-split", "--target-agreement", "--student-serving", "--ship-agreement", "--limit"):
        assert name in text
    assert " ".join(EvalConfig.model_fields["selection_limit"].description.split()) in text


def test_list_options_and_bad_input_are_clear():
    from pipelines.run import RunConfig

    config = config_from_args(RunConfig, parse("run", "--stages", "train,eval", "--set", "train.max_steps=2"))
    assert config.stages == ["train", "eval"] and config.train == {"max_steps": 2}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_from_args(RunConfig, parse("run", "--set", "train.max_steps"))
    with pytest.raises(ConfigError, match="stages"):
        config_from_args(RunConfig, parse("run", "--stages", "eval,train"))
    with pytest.raises(SystemExit):  # argparse rejects a value outside a Literal's choices
        parse("train", "--method", "rl")


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))
def test_every_shipped_run_config_builds_all_its_stage_configs(path):
    """configs/*.yaml are what users run (`distill run --config ...`): a renamed or mistyped option in any of
    them fails here, not an hour into a cluster job."""
    import yaml

    from pipelines.run import RunConfig

    config = RunConfig(**yaml.safe_load(Path(path).read_text()))
    assert config.train_config().output.endswith("train") and config.eval_config().output.endswith("eval")
