"""Checks of the command line before Hydra composes it: each bad override becomes one line.

Hydra's own reports span several lines (or a traceback); these run first, on argv alone or on
one compose of the config, so a typo is refused with one line naming the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from lorabench.training.sweep import one_line

# config groups a `group=choice` override may name (checked for a YAML before Hydra composes)
GROUPS = (
    "model", "strategy", "task", "optim", "trainer", "logger", "paths", "extras",
    "experiment", "hparams_search", "debug",
)


def check_group_choices(argv: list[str], conf: Path, sweep: bool = False) -> Optional[str]:
    """One line for `group=choice` overrides naming a choice with no YAML (before Hydra's
    multi-line error): e.g. strategy=lorra → the list of strategies that exist. In a sweep
    (`sweep=True`) a list with some existing choices passes: SweepCallback drops the bad ones."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        choices = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        values = value.split(",")
        if sweep and len(values) > 1 and any(v in choices for v in values):
            continue
        for v in values:
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
        return one_line(e)
    missing = object()
    for o in overrides:
        key = o.partition("=")[0]
        if key.startswith(("+", "~")) or key in GROUPS or "/" in key or "@" in key:
            continue
        if OmegaConf.select(cfg, key, default=missing) is missing:
            return f"{key}: no such config key (to add a new key use +{o})"
    return None


def check_slurm(argv: list[str]) -> Optional[str]:
    """One line, before Hydra starts, for the SLURM launcher on a machine without SLURM."""
    if any(a.lstrip("+").startswith("hydra/launcher=submitit_slurm") for a in argv) and shutil.which("srun") is None:
        return ("hydra/launcher=submitit_slurm: no `srun` on this machine; launch from a SLURM login node "
                "(hydra/launcher=submitit_local runs the same code path locally)")
    return None


def torchrun_overrides(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """(extra overrides, problem) under torchrun, where every rank is a Hydra app of the same run:
    one run dir for all ranks (named by torchrun's run id unless hydra.run.dir is given), and only
    rank 0 writes Hydra's files, logs and prints the config. Nothing outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return [], None
    if "-m" in argv or "--multirun" in argv:
        return [], "torchrun trains one run over several processes; drop -m/--multirun (sweep with a launcher instead)"
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")[:8]
        extra.append(f"hydra.run.dir=${{paths.output_dir}}/runs/torchrun_{run_id}_${{strategy.name}}_s${{seed}}")
    if int(os.environ.get("RANK", "0") or 0) != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "extras.print_config=false"]
    return extra, None
