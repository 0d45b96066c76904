"""Every config option composes and validates; schema errors name the key."""

from __future__ import annotations


import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lorabench.checks import validate
from lorabench.errors import ConfigError
from lorabench.strategies import available
from tests.helpers import CONF, compose_cfg

GROUPS = ["model", "strategy", "task", "optim", "trainer", "logger", "paths", "extras", "debug", "hparams_search"]
# Options that need a user value (a model dir, a dataset) to validate, and that value.
NEEDS = {
    ("model", "hf"): ["model.name_or_path=/some/model"],
    ("task", "hf"): ["task.dataset=/some/data.jsonl"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_cfg(f"{group}={option}", *NEEDS.get((group, option), []))
    OmegaConf.resolve(cfg)
    typed = validate(cfg)
    if group == "strategy":
        assert typed.name == cfg.strategy.name


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    first = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()[0]
    assert first.startswith("# @package _global_") or first.startswith("# lorabench"), first
    cfg = compose_cfg(f"experiment={experiment}")
    OmegaConf.resolve(cfg)
    validate(cfg)


def test_every_registered_strategy_has_a_yaml() -> None:
    assert set(available()) <= set(options("strategy"))


def test_default_is_the_embedded_lora_run() -> None:
    cfg = compose_cfg()
    assert (cfg.model.source, cfg.strategy.name, cfg.task.name) == ("tiny", "lora", "sort")
    assert (cfg.logger.backend, cfg.logger.mode) == ("wandb", "offline")
    assert cfg.optim.lr == cfg.strategy.lr  # the strategy's tuned lr is the default
    assert cfg.model.hidden_size >= 256 and cfg.model.hidden_size % 64 == 0


def test_misspelled_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.max_stpes"):
        compose_cfg("trainer.max_stpes=3")


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException, match="max_steps"):
        compose_cfg("trainer.max_steps=abc")


def test_strategy_schema_catches_added_keys_and_types() -> None:
    """The strategy dataclass is the node's schema: Hydra refuses a wrong type while
    composing; a key forced in with `+` and a node built without Hydra fail validation."""
    from hydra.errors import ConfigCompositionException

    from lorabench.strategies.registry import validate_strategy_config

    with pytest.raises(ConfigCompositionException, match="rank"):
        compose_cfg("strategy.rank=abc")
    with pytest.raises(ConfigError, match=r"strategy\.rnk"):
        validate(compose_cfg("+strategy.rnk=3"))
    with pytest.raises(ConfigError, match=r"strategy\.rnk: .*\(strategy 'lora'\)"):
        validate_strategy_config({"name": "lora", "rnk": 3})
    with pytest.raises(ConfigError, match=r"strategy\.rank"):
        validate_strategy_config({"name": "lora", "rank": "abc"})


@pytest.mark.parametrize(
    "override,message",
    [
        ("strategy.rank=0", r"strategy.rank: must be a positive integer"),
        ("optim.lr=-0.1", r"optim.lr: expected a number > 0"),
        ("task.difficulty_min=9", r"task.difficulty_min/max"),
        ("logger.mode=loud", r"logger.mode: expected one of"),
    ],
)
def test_bad_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        validate(compose_cfg(override, "task.difficulty_max=5"))
    assert "\n" not in str(e.value)


def test_conf_keys_all_have_a_comment() -> None:
    """The convention: a one-line 'why' comment on every YAML key."""
    missing = []
    for path in CONF.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("-") or s.endswith(":"):
                continue
            if ":" in s and "#" not in s:
                missing.append(f"{path.relative_to(CONF)}: {s}")
    assert not missing, missing


def test_merge_bits_are_checked_before_training() -> None:
    with pytest.raises(ConfigError, match=r"strategy.merge_bits: expected one of \[2, 3, 4, 8\], got 5"):
        validate(compose_cfg("strategy=qlora", "strategy.merge=intn", "strategy.merge_bits=5"))
