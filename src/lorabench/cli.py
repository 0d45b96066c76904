"""The `lorabench` console script (and `python -m lorabench`): a Hydra app over conf/.

Bad input ends here as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lorabench.argv_checks import GROUPS, check_group_choices, check_overrides, check_slurm, torchrun_overrides  # noqa: F401 (GROUPS: re-exported)
from lorabench.checks import register_configs, validate
from lorabench.training.sweep import LAST_SWEEP, expand_jobs, one_line, report, without_values
from lorabench.errors import ConfigError, Interrupted, RunDirRefused
from lorabench.training.preempt import Preempted, requeue_or_exit
from lorabench.training.run_dir import admit_job
from lorabench.utils import atomic_write_text

# Our launcher presets extend the plugins' schemas of the same name on purpose; Hydra warns about
# that pattern (a multi-line deprecation notice) in every job process. Set at import, so the
# launcher's worker processes, which import this module to run a job, are quiet too.
warnings.filterwarnings("ignore", message=r"[\s\S]*validated against ConfigStore schema with the same name")

log = logging.getLogger("lorabench")
# In a sweep dir: one file per job refused by the run dir rules (a sweep summary row each).
REFUSED_DIR = ".refused"


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


def ranking_sweeper() -> bool:
    """Whether this multirun's sweeper ranks the jobs' return values (optuna), unlike the basic one."""
    return is_multirun() and not str(HydraConfig.get().sweeper.get("_target_", "")).endswith("BasicSweeper")


def optimized_value(cfg: DictConfig, summary: dict[str, Any]) -> Optional[float]:
    """The summary's `optimized_metric`, returned to Hydra sweepers. A key the run did not
    produce is one line to a ranking sweeper (it cannot rank None; the completed run stays
    completed) and a warning elsewhere: a grid sweep has nothing to rank."""
    key = cfg.get("optimized_metric")
    if key is None:
        return None
    if key in summary:
        return float(summary[key])
    message = f"optimized_metric: '{key}' is not in the run's summary (e.g. {sorted(k for k in summary if k.startswith('eval/'))})"
    if ranking_sweeper():
        raise ConfigError(message)
    log.warning(message)
    return None


def resume_command(cfg: DictConfig) -> str:
    """The command line that continues this job in its run dir."""
    from lorabench.training.job import launch_overrides

    return " ".join(["lorabench", *launch_overrides(), f"hydra.run.dir={cfg.run_dir}"])


def is_multirun() -> bool:
    """Whether this job is one of a Hydra multirun."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def auto_threads(cfg: DictConfig) -> None:
    """Under the joblib launcher with trainer.threads=0, give each job cores // n_jobs threads
    (at least 1) so parallel jobs do not oversubscribe the CPU; a user-set value is kept."""
    if cfg.trainer.threads or not is_multirun():
        return
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return  # the basic launcher runs one job at a time: it may use every core
    cores = os.cpu_count() or 1
    n_jobs = launcher.get("n_jobs", -1) or 1
    if n_jobs < 0:
        n_jobs = max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one, ...
    with open_dict(cfg):
        cfg.trainer.threads = max(1, cores // n_jobs)


def record_failed(cfg: DictConfig, reason: str) -> None:
    """A summary.json with status failed for a job that failed before training started
    (job.run writes its own for failures inside training)."""
    from lorabench.training.job import launch_overrides

    path = Path(cfg.run_dir) / "summary.json"
    if path.exists() and json.loads(path.read_text()).get("status") == "failed":
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"status": "failed", "error": reason, "strategy": cfg.strategy.get("name"), "seed": cfg.get("seed"),
               "overrides": launch_overrides()}
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True))


def run_job(cfg: DictConfig) -> Optional[float]:
    """Validate, train, report. Returns the summary's `optimized_metric` for Hydra sweepers.

    A single run's bad input exits 2 (one line). In a multirun a failed job is recorded
    (summary.json, status failed) and returns None so the other jobs run; SweepCallback turns
    failures into the sweep's exit code. Sweepers that rank results (optuna) get the exception.
    A rerun refused by the run dir rules (`run_dir.admit`) writes nothing into the run dir: in a
    multirun it is recorded in the sweep dir instead (`REFUSED_DIR`).
    """
    from lorabench.training import job

    fill_runtime_keys(cfg)
    multirun = is_multirun()
    try:
        validate(cfg)
        admit_job(cfg)  # the run dir rules, before the job touches its dir
        auto_threads(cfg)
        if cfg.extras.print_config:
            print_config_tree(cfg)
        summary = job.run(cfg)
    except RunDirRefused as e:  # the run dir holds another run: left as it was, no failure written into it
        if not multirun:
            print(f"lorabench: error: {e}", file=sys.stderr)
            sys.exit(2)
        return job_refused(cfg, str(e), e)
    except ConfigError as e:
        if not multirun:
            print(f"lorabench: error: {e}", file=sys.stderr)
            sys.exit(2)
        return job_failed(cfg, str(e), e)
    except Preempted as e:  # checkpointed at a step boundary: requeue under submitit, else exit 128 + signal
        if multirun and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower():
            # a joblib worker: the signal was aimed at this job (a signal to the sweep reaches its main
            # process too); recorded as preempted, the others run, and a rerun of the sweep resumes it
            print(f"lorabench: job {HydraConfig.get().job.num} {e}; rerun the sweep to resume it", file=sys.stderr)
            return None
        requeue_or_exit(e, lambda: f"{e}; resume with: {resume_command(cfg)}")
    except Interrupted as e:
        print(f"lorabench: {e}; resume with: {resume_command(cfg)}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - one failed job of a multirun must not end the sweep
        if not multirun:
            raise
        return job_failed(cfg, f"{type(e).__name__}: {e}", e)
    if "rank" in summary:  # a torchrun rank other than 0: rank 0 reports the run
        return None
    value = optimized_value(cfg, summary)  # outside the try: a missing objective never rewrites a completed run
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


def job_refused(cfg: DictConfig, reason: str, error: Exception) -> None:
    """Print one refused multirun job's line and record it in the sweep dir (its own run dir
    stays as it was), for SweepCallback's summary; re-raise for ranking sweepers."""
    hc = HydraConfig.get()
    print(f"lorabench: error: job {hc.job.num} refused (run dir {cfg.run_dir}): {reason}", file=sys.stderr)
    row = {"job": hc.job.num, "overrides": " ".join(str(o) for o in hc.overrides.task), "status": "failed",
           "error": reason, "job_dir": str(cfg.run_dir)}
    atomic_write_text(Path(hc.sweep.dir) / REFUSED_DIR / f"{hc.job.num}.json", json.dumps(row))
    if ranking_sweeper():
        raise error
    return None


def job_failed(cfg: DictConfig, reason: str, error: Exception) -> None:
    """Record one failed multirun job and print its line; re-raise for ranking sweepers."""
    record_failed(cfg, reason)
    print(f"lorabench: error: job {HydraConfig.get().job.num} failed (run dir {cfg.run_dir}): {reason}", file=sys.stderr)
    if ranking_sweeper():
        raise error
    return None


def job_problem(config_name: str, overrides: list[str]) -> tuple[Optional[str], bool]:
    """(one-line reason or None, whether it is a composition error) for one job's overrides."""
    from hydra import compose

    unknown = check_group_choices(overrides, Path(conf_dir()))
    if unknown:
        return unknown, True
    try:
        cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - any composition failure is one line
        return one_line(e), True
    try:
        validate(cfg)
    except ConfigError as e:
        return str(e), False
    return None, False


class SweepCallback(Callback):
    """Validates every job of a multirun before the first one starts; summarises it at the end."""

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None
        self.not_run: list[dict[str, Any]] = []  # jobs dropped because they do not compose

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        LAST_SWEEP.update(jobs=0, failed=0)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))  # resolved once: ${now:} is cached
        shutil.rmtree(self.sweep_dir / REFUSED_DIR, ignore_errors=True)  # an earlier sweep's refusals
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return  # other sweepers (optuna) choose their jobs as they go
        overrides = [str(o) for o in config.hydra.overrides.task]
        self.not_run = []
        problems, uncomposable = [], {}
        jobs = expand_jobs(overrides)
        swept = [o for o in jobs[0] if any(o not in job for job in jobs)] if len(jobs) > 1 else []
        swept_keys = {o.partition("=")[0] for o in swept}
        for num, job in enumerate(jobs):
            reason, bad_compose = job_problem(kwargs.get("config_name") or "config", job)
            if reason:
                which = " ".join(o for o in job if o.partition("=")[0] in swept_keys) or " ".join(job)
                problems.append(f"lorabench: error: job {num} ({which}): {reason}")
                if bad_compose:
                    uncomposable[num] = reason
        for line in problems:
            print(line, file=sys.stderr)
        if uncomposable:
            # Hydra composes every job of a sweep before launching any and stops at the first that
            # does not compose, so such jobs are taken out of the sweep: its swept values that only
            # failing jobs have are dropped, when what remains is exactly the other jobs.
            pruned = without_values(overrides, jobs, set(uncomposable))
            if pruned is None:
                why = ("no job of the sweep composes" if len(uncomposable) == len(jobs) else
                       "these jobs fail by a combination of values and cannot be left out alone")
                print(f"lorabench: {why}; nothing ran", file=sys.stderr)
                sys.exit(2)
            with read_write(config.hydra.overrides):
                config.hydra.overrides.task = pruned
            self.not_run = [{"job": None, "overrides": " ".join(jobs[n]), "status": "failed", "error": reason}
                            for n, reason in uncomposable.items()]
            print(f"lorabench: {len(uncomposable)} job(s) that do not compose are left out and recorded as failed; "
                  f"the others run ({' '.join(o for o in pruned if o.partition('=')[0] in swept_keys)})", file=sys.stderr)
        if len(problems) > len(uncomposable):
            print(f"lorabench: {len(problems) - len(uncomposable)} invalid job(s) are recorded as failed without "
                  "running; the others run", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return
        refused = [json.loads(p.read_text()) for p in sorted((self.sweep_dir / REFUSED_DIR).glob("*.json"))]
        jobs, failed = report(self.sweep_dir, self.not_run + refused)
        LAST_SWEEP.update(jobs=jobs, failed=failed)


def main() -> Any:
    """Console-script entry point."""
    extra, problem = torchrun_overrides(sys.argv[1:])
    if problem:
        print(f"lorabench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv += extra  # Hydra reads its overrides from sys.argv
    argv = sys.argv[1:]
    try:
        register_configs()  # discovers strategies: a broken or colliding strategy file is one line
    except ConfigError as e:
        print(f"lorabench: error: {e}", file=sys.stderr)
        sys.exit(2)
    problem = (
        check_group_choices(argv, Path(conf_dir()), sweep="-m" in argv or "--multirun" in argv) or check_slurm(argv) or check_overrides(argv, Path(conf_dir()))
    )
    if problem:
        print(f"lorabench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    app = hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")(run_job)
    LAST_SWEEP.update(jobs=0, failed=0)
    result = app()
    if LAST_SWEEP["failed"]:
        print(f"lorabench: {LAST_SWEEP['failed']} of {LAST_SWEEP['jobs']} jobs failed", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
