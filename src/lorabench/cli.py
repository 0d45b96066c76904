"""The `lorabench` console script (and `python -m lorabench`): a Hydra app over conf/.

Bad input ends here as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.checks import register_configs, validate
from lorabench.errors import ConfigError, Interrupted

log = logging.getLogger("lorabench")


def conf_dir() -> str:
    """conf/ beside src/ (editable install), or $LORABENCH_CONF."""
    env = os.environ.get("LORABENCH_CONF")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def fill_runtime_keys(cfg: DictConfig) -> None:
    """run_dir from Hydra's output dir; the W&B group from the sweep dir (one group per sweep)."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    with open_dict(cfg):
        cfg.run_dir = hc.runtime.output_dir
        if cfg.logger.group is None:
            if hc.mode == RunMode.MULTIRUN:
                cfg.logger.group = Path(hc.sweep.dir).name
            else:
                cfg.logger.group = "single-runs"


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a rich tree, one branch per top-level group (extras.print_config)."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(str(key)).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    Console().print(tree)


def optimized_value(cfg: DictConfig, summary: dict[str, Any]) -> Optional[float]:
    """The summary's `optimized_metric`, returned to Hydra sweepers. A key the run did not
    produce stops a sweep with one line (a sweeper cannot rank None); a single run just logs it."""
    key = cfg.get("optimized_metric")
    if key is None:
        return None
    if key in summary:
        return float(summary[key])
    message = f"optimized_metric: '{key}' is not in the run's summary (e.g. {sorted(k for k in summary if k.startswith('eval/'))})"
    try:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        multirun = False
    if multirun:
        raise ConfigError(message)
    log.warning(message)
    return None


def resume_command(cfg: DictConfig) -> str:
    """The command line that continues this job in its run dir."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        overrides = []
    return " ".join(["lorabench", *overrides, f"hydra.run.dir={cfg.run_dir}"])


def run_job(cfg: DictConfig) -> Optional[float]:
    """Validate, train, report. Returns the summary's `optimized_metric` for Hydra sweepers."""
    from lorabench.training import job

    fill_runtime_keys(cfg)
    try:
        validate(cfg)
        if cfg.extras.print_config:
            print_config_tree(cfg)
        summary = job.run(cfg)
        value = optimized_value(cfg, summary)
    except ConfigError as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"lorabench: {e}; resume with: {resume_command(cfg)}", file=sys.stderr)
        sys.exit(130)
    if summary.get("already_completed"):
        print(f"lorabench: {cfg.run_dir} holds a completed run; not training it again "
              "(trainer.overwrite=true starts afresh)", file=sys.stderr)
        return value
    log.info(
        "done: %s accuracy %s -> %s, loss %.4f, run dir %s",
        summary["strategy"],
        summary.get("eval/accuracy_base"),
        summary.get("eval/accuracy"),
        summary.get("eval/loss", float("nan")),
        cfg.run_dir,
    )
    return value


# config groups a `group=choice` override may name (checked for a YAML before Hydra composes)
GROUPS = (
    "model", "strategy", "task", "optim", "trainer", "logger", "paths", "extras",
    "experiment", "hparams_search", "debug",
)


def check_group_choices(argv: list[str], conf: Path) -> Optional[str]:
    """One line for `group=choice` overrides naming a choice with no YAML (before Hydra's
    multi-line error): e.g. strategy=lorra → the list of strategies that exist."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        for v in value.split(","):
            if v not in choices:
                return f"{key}: unknown {key} '{v}', expected one of {choices}"
    return None


def check_overrides(argv: list[str], conf: Path) -> Optional[str]:
    """Compose the config once before Hydra does, so that a misspelled key or a wrong type
    is one line (Hydra's own report spans several). Sweeps (`-m`, values with commas) are
    checked for key existence only; Hydra checks each job's values when it composes it."""
    from hydra import compose, initialize_config_dir

    multirun = "-m" in argv or "--multirun" in argv or any(a.startswith("hparams_search=") for a in argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    single = [o for o in overrides if not (multirun and "," in o.partition("=")[2])]
    try:
        with initialize_config_dir(str(conf), version_base="1.3"):
            cfg = compose("config", overrides=single)
    except Exception as e:  # noqa: BLE001 - reduce Hydra's multi-line report to one line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "...composing config: Key 'x' not in 'Y'"
        cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ is not None and str(e.__cause__).strip() else ""
        return f"{first} {cause}".strip()
    missing = object()
    for o in overrides:
        key = o.partition("=")[0]
        if key.startswith(("+", "~")) or key in GROUPS or "/" in key or "@" in key:
            continue
        if OmegaConf.select(cfg, key, default=missing) is missing:
            return f"{key}: no such config key (to add a new key use +{o})"
    return None


def main() -> Any:
    """Console-script entry point."""
    argv = sys.argv[1:]
    try:
        register_configs()  # discovers strategies: a broken or colliding strategy file is one line
    except ConfigError as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        sys.exit(2)
    problem = check_group_choices(argv, Path(conf_dir())) or check_overrides(argv, Path(conf_dir()))
    if problem:
        print(f"lorabench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run_job)
    return app()


if __name__ == "__main__":
    main()
