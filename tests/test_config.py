from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignment.config import ConfigError, load_config, parse_overrides, save_config


@dataclass
class Scorer:
    url: str = "auto"
    timeout: float = 30.0


@dataclass
class Recipe:
    model_name: str = "models/toy/policy"
    lambda_lr: float = 0.005
    max_steps: int = 10
    lambda_adapt: bool = True
    loss_type: Literal["dapo", "grpo"] = "dapo"
    eval_path: str | None = None
    stop: list[str] = field(default_factory=list)
    scorer: Scorer = field(default_factory=Scorer)


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "lambda_lr: 0.01\nmax_steps: 5\nscorer:\n  timeout: 5\n")
    cfg = load_config(Recipe, path, ["max_steps=7", "scorer.url=http://h:1", "stop=['USER:', x]"])
    assert cfg.lambda_lr == 0.01 and isinstance(cfg.scorer.timeout, float)
    assert cfg.max_steps == 7
    assert cfg.scorer == Scorer(url="http://h:1", timeout=5.0)
    assert cfg.stop == ["USER:", "x"]
    assert cfg.model_name == "models/toy/policy"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "lamda_lr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    message = str(err.value)
    assert "'lamda_lr'" in message and str(path) in message and "'lambda_lr'" in message


def test_unknown_nested_and_override_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'tmeout'.*under 'scorer'"):
        load_config(Recipe, write(tmp_path, "scorer:\n  tmeout: 1\n"))
    with pytest.raises(ConfigError, match="'nope' in command-line overrides"):
        load_config(Recipe, None, ["nope=1"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("max_steps=1.5", "expected an integer"),
        ("lambda_adapt=yes please", "expected true or false"),
        ("lambda_lr=fast", "expected a number"),
        ("loss_type=ppo", "not one of"),
        ("stop=USER", "expected a list"),
    ],
)
def test_wrong_types_are_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(Recipe, None, [override])


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 5e-6 as the string "5e-6"; users type --learning_rate=5e-6
    cfg = load_config(Recipe, write(tmp_path, "lambda_lr: 1e-5\n"), ["scorer.timeout=2E+1"])
    assert cfg.lambda_lr == 1e-5 and cfg.scorer.timeout == 20.0
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Recipe, None, ["lambda_lr=1e-5x"])
    with pytest.raises(ConfigError, match="expected a string"):
        load_config(Recipe, None, ["model_name=[1e-5]"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Recipe, write(tmp_path, "- a\n- b\n"))


def test_optional_accepts_null_and_roundtrips(tmp_path):
    cfg = load_config(Recipe, None, ["eval_path=null", "lambda_lr=1"])
    assert cfg.eval_path is None and cfg.lambda_lr == 1.0
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Recipe, tmp_path / "saved.yaml") == cfg


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    import argparse

    from alignment.config import add_dataclass_args, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_dataclass_args(parser, Recipe)
    path = write(tmp_path, "max_steps: 5\nlambda_lr: 0.5\nlambda_adapt: true\n")
    args = parser.parse_args(
        ["--config", str(path), "--max_steps", "9", "--no_lambda_adapt", "--stop", "[a, b]"]
    )
    cfg = config_from_args(Recipe, args, args.config)
    assert (cfg.max_steps, cfg.lambda_lr, cfg.lambda_adapt, cfg.stop) == (9, 0.5, False, ["a", "b"])
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_args(Recipe, parser.parse_args(["--max_steps", "many"]))


@dataclass
class Member:
    name: str
    weight: float = 1.0


@dataclass
class Roster:
    members: list[Member] = field(default_factory=list)


def test_list_of_dataclasses_is_built_and_checked(tmp_path):
    cfg = load_config(Roster, write(tmp_path, "members:\n  - {name: a}\n  - {name: b, weight: 2}\n"))
    assert cfg.members == [Member("a"), Member("b", 2.0)]
    with pytest.raises(ConfigError, match=r"unknown key 'wieght'.*did you mean 'weight'"):
        load_config(Roster, write(tmp_path, "members:\n  - {name: a, wieght: 2}\n"))
    with pytest.raises(ConfigError, match="expected a mapping of Member fields"):
        load_config(Roster, write(tmp_path, "members: [a]\n"))
    with pytest.raises(ConfigError, match="name"):  # a required field left out
        load_config(Roster, write(tmp_path, "members:\n  - {weight: 2}\n"))
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(Roster, tmp_path / "again.yaml") == cfg


def test_field_help_is_the_flag_help():
    import argparse

    from alignment.config import add_dataclass_args, field_help

    @dataclass
    class Helped:
        steps: int = field(default=3, metadata=field_help("optimiser steps to take"))
        quiet: bool = field(default=False, metadata=field_help("log warnings only"))
        plain: float = 0.5

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Helped)
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    # the default, as the YAML spells it, follows the field's help (or stands alone without one)
    assert helps["--steps"] == "optimiser steps to take (default: 3)"
    assert helps["--quiet"] == "log warnings only (default: false)"
    assert helps["--plain"] == "(default: 0.5)"


def test_unknown_flags_become_overrides_known_flags_stay():
    import argparse

    from alignment.config import overrides_from_flags

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--use_vllm", action="store_const", const=True)
    p.add_argument("--models", nargs="+")
    argv = ["--config", "--weird.yaml", "--warmup_steps", "0.1", "beta=0.05", "--lr=-1e-5", "--use_vllm",
            "--bf16", "--models", "a", "b", "--seed", "-3", "--", "--raw"]  # fmt: skip
    assert overrides_from_flags(p, argv) == [
        "--config", "--weird.yaml",  # a known flag's value passes through, even one that looks like a flag
        "warmup_steps=0.1", "beta=0.05", "lr=-1e-5", "--use_vllm",
        "bf16=true",  # an unknown flag followed by another flag: a switch
        "--models", "a", "b", "seed=-3", "--", "--raw",
    ]  # fmt: skip
