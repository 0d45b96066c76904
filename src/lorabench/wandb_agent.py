"""Jobs launched by `wandb agent`, and the W&B sweep files that drive it.

`wandb agent` runs the sweep's command once per agent run with WANDB_SWEEP_ID, WANDB_RUN_ID and
WANDB_SWEEP_PARAM_PATH (a YAML file `{name: {value: v}}`) in the environment. `wandb.init` then
ignores the id/project/entity it is given (it takes the agent's run id) and merges every
parameter into run.config under the parameter's own name, locked against later updates:
`optim.lr` lands as a flat key beside our nested `optim`, and a config-group choice such as
`strategy: qlora` *replaces* our nested `strategy` node with the string. The sweep controller
reads `run.config[<parameter name>]` back (grid de-duplication, Bayes' observations), so those
keys must keep the sweep's values. `adopt_agent_run` (called right after `wandb.init`):

- checks every parameter's value equals what Hydra composed (else the value never reached the
  job, e.g. a sweep command without `${args_no_hyphens}`) — one line, the run finished as failed;
- writes the resolved config back: every node as composed, and each group node the sweep
  replaced as dotted keys (`strategy.rank`, ...: the same columns the W&B UI shows for a nested
  node), so nothing of the resolved config is lost and the controller still reads its values;
- refuses a multirun (`-m`, an Optuna search): the agent gives the command one run id, and every
  job of a multirun would write into that one run.

`sweep_problems` checks a sweep file's parameters against the composed lorabench config (W&B's
own schema knows nothing about our keys).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from lorabench.errors import ConfigError

SWEEP_ID_ENV = "WANDB_SWEEP_ID"  # set by `wandb agent` for each run it launches
PARAM_PATH_ENV = "WANDB_SWEEP_PARAM_PATH"  # the run's parameters, written by the agent
RUN_ID_ENV = "WANDB_RUN_ID"  # the run id the agent reserved on the server
_MISSING = object()


def agent_parameters() -> Optional[dict[str, Any]]:
    """The parameters `wandb agent` gave this process ({name: value}), or None outside an agent."""
    path = os.environ.get(PARAM_PATH_ENV)
    if not os.environ.get(SWEEP_ID_ENV) or not path:
        return None
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{PARAM_PATH_ENV}={path}: cannot read the W&B sweep parameters ({e})") from None
    loaded.pop("wandb_version", None)
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in loaded.items()}


def group_choices() -> dict[str, Any]:
    """Hydra's config-group choices of this job ({} outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return dict(HydraConfig.get().runtime.choices)
    except ValueError:
        return {}


def is_multirun() -> bool:
    """Whether this job is one of a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def composed_value(cfg: DictConfig, key: str, choices: dict[str, Any]) -> Any:
    """What Hydra composed for a sweep parameter: a group's choice, or the config value at `key`."""
    if key in choices:
        return choices[key]
    node = OmegaConf.select(cfg, key, default=_MISSING)
    if isinstance(node, DictConfig):
        return node.get("name", _MISSING)  # a group node outside Hydra: its name is its choice
    return node


def same_value(a: Any, b: Any) -> bool:
    """Equal, with numbers compared as numbers (YAML may give 8 where Hydra has 8.0)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b or str(a) == str(b)


def check_parameters(params: dict[str, Any], cfg: DictConfig, choices: dict[str, Any]) -> None:
    """One line for the first parameter whose value did not reach the composed config."""
    for key, value in params.items():
        composed = composed_value(cfg, key, choices)
        if composed is _MISSING:
            raise ConfigError(f"W&B sweep parameter '{key}': not a lorabench config key "
                              "(the sweep's parameter names must be Hydra override keys)")
        if not same_value(composed, value):
            raise ConfigError(
                f"W&B sweep parameter {key}={value!r} did not reach Hydra (the job composed {composed!r}): "
                "the sweep's command must pass ${args_no_hyphens} to lorabench")


def flatten(node: Any, prefix: str) -> dict[str, Any]:
    """{"prefix.a.b": leaf} for every leaf of a nested dict."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}"))
    return out


def agent_config(cfg: DictConfig, params: dict[str, Any], choices: dict[str, Any]) -> dict[str, Any]:
    """The run config under an agent: the resolved config, each group node a parameter replaced
    as dotted keys, and every parameter under its own name (the controller reads them)."""
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for key, value in params.items():
        if isinstance(out.get(key), dict):
            out.update(flatten(out.pop(key), key))
        out[key] = value
    return out


def adopt_agent_run(run: Any, cfg: DictConfig) -> Any:
    """Called right after `wandb.init`: outside `wandb agent`, returns the run untouched; under it,
    checks the parameters and restores the resolved config (module docstring). A refused run is
    finished with exit code 1 before the ConfigError is raised."""
    params = agent_parameters()
    if params is None or run is None:
        return run
    choices = group_choices()
    try:
        if is_multirun():
            raise ConfigError(
                "under `wandb agent` a sweep command runs one job (the agent gives it one W&B run): "
                "drop -m / hparams_search and comma-separated values from the sweep's command")
        check_parameters(params, cfg, choices)
    except ConfigError:
        run.finish(exit_code=1)
        raise
    wanted = agent_config(cfg, params, choices)
    run.config.update({k: v for k, v in wanted.items() if k not in params}, allow_val_change=True)
    return run


def sweep_problems(sweep: dict[str, Any], cfg: DictConfig, conf_dir: Path) -> list[str]:
    """One line per problem of a W&B sweep config against lorabench: a parameter that is no
    config key (and no config group), a group value with no YAML, a command that would not pass
    the parameters to Hydra as overrides."""
    problems = []
    command = [str(c) for c in sweep.get("command", [])]
    if "${args_no_hyphens}" not in command:
        problems.append("command: must contain ${args_no_hyphens} (W&B's `--key=value` args are not Hydra overrides)")
    for key, spec in (sweep.get("parameters") or {}).items():
        group_dir = conf_dir / key
        if group_dir.is_dir():
            known = sorted(p.stem for p in group_dir.glob("*.yaml"))
            values = spec.get("values", [spec["value"]] if "value" in spec else [])
            bad = [v for v in values if str(v) not in known]
            if bad:
                problems.append(f"parameters.{key}: unknown {key} {bad}, expected some of {known}")
            continue
        node = OmegaConf.select(cfg, key, default=_MISSING)
        if node is _MISSING or isinstance(node, DictConfig):
            problems.append(f"parameters.{key}: not a lorabench config key (nor a config group in {conf_dir})")
    return problems
