"""Optuna searches that survive bad trials: every trial is told to the study and recorded.

hydra-optuna-sweeper 1.2 ends the whole study at the first trial that fails, returns None or
returns NaN (it marks that trial FAIL and re-raises), and writes only the best trial. A search
over ranks and learning rates meets such trials routinely (an invalid combination, a diverged
run), so this sweeper runs the same ask → launch → tell loop over the plugin's own search-space
helpers, but tells each trial's real outcome and goes on:

- the job returned a finite number → COMPLETE with that value;
- the job's config was invalid (ConfigError), or it returned None / NaN / inf → PRUNED: Optuna's
  TPE ranks a pruned trial without intermediate values below every complete one, so the search
  steers away from that region instead of sampling it again;
- any other failure (exception, OOM, killed worker) → FAIL: TPE ignores it (it may not be the
  point's fault).

Hydra cannot prune a trial mid-run (a job reports only when it ends), so PRUNED here means
"ended without a usable objective". `<sweep dir>/optimization_results.yaml` keeps the plugin's
`best_params`/`best_value` (absent when no trial completed) and adds every trial with its state.
The loop is hand-written because the plugin's loop has no hook for a trial's outcome.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from lorabench.errors import ConfigError
from lorabench.utils import atomic_write_text

log = logging.getLogger("lorabench")

RESULTS_FILE = "optimization_results.yaml"


@dataclass
class Outcome:
    """What a finished job means to the study: its state, its objective value(s), why not complete."""

    state: TrialState
    values: Optional[list[float]]
    reason: str = ""


def trial_outcome(ret: JobReturn, n_objectives: int) -> Outcome:
    """Classify one job's return (see the module docstring for the rules)."""
    if ret.status != JobStatus.COMPLETED:
        error = ret._return_value  # noqa: SLF001 - the public getter re-raises; we only classify it
        reason = str(error) if isinstance(error, ConfigError) else f"{type(error).__name__}: {error}"
        state = TrialState.PRUNED if isinstance(error, ConfigError) else TrialState.FAIL
        return Outcome(state, None, reason)
    raw = ret.return_value
    raws = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    try:
        values = [float(v) for v in raws]
    except (TypeError, ValueError):
        return Outcome(TrialState.PRUNED, None, f"the job returned {raw!r}, not a number")
    if len(values) != n_objectives:
        return Outcome(TrialState.FAIL, None, f"the job returned {len(values)} values for {n_objectives} objectives")
    if not all(math.isfinite(v) for v in values):
        return Outcome(TrialState.PRUNED, None, f"the objective is not finite ({raw!r})")
    return Outcome(TrialState.COMPLETE, values)


class RecordingOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's sweeper with a loop that records failed and pruned trials instead of stopping."""

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        for name in fixed:
            space.pop(name, None)
        if not callable(getattr(self.sampler, "sample_relative", None)):
            raise ConfigError("hydra.sweeper.sampler: expected an Optuna sampler such as TPESampler "
                              "(for a grid, run a plain multirun: lorabench -m key=a,b,c)")
        directions = self._get_directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    directions=directions, load_if_exists=True)
        records: list[dict[str, Any]] = []
        left = self.n_trials
        while left > 0:
            trials = [study.ask() for _ in range(min(left, self.n_jobs))]
            returns = self.launcher.launch(self._configure_trials(trials, space, fixed), initial_job_idx=self.job_idx)
            for offset, (trial, ret) in enumerate(zip(trials, returns)):
                outcome = trial_outcome(ret, len(directions))
                study.tell(trial, values=outcome.values, state=outcome.state)
                records.append(trial_record(trial, ret, outcome, job=self.job_idx + offset))
                if outcome.state != TrialState.COMPLETE:
                    log.warning("trial %d %s: %s", trial.number, outcome.state.name.lower(), outcome.reason)
            self.job_idx += len(returns)
            left -= len(trials)
        path = Path(str(self.config.hydra.sweep.dir)) / RESULTS_FILE
        atomic_write_text(path, yaml.safe_dump(results(study, records), sort_keys=False))
        log.info("search results: %s", path)


def trial_record(trial: optuna.trial.Trial, ret: JobReturn, outcome: Outcome, job: int) -> dict[str, Any]:
    """One trial as written to optimization_results.yaml."""
    record: dict[str, Any] = {"number": trial.number, "job": job, "state": outcome.state.name,
                              "params": dict(trial.params)}
    if outcome.values is not None:
        record["value" if len(outcome.values) == 1 else "values"] = (
            outcome.values[0] if len(outcome.values) == 1 else outcome.values)
    if outcome.reason:
        record["reason"] = outcome.reason
    output_dir = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
    if output_dir:
        record["run_dir"] = Path(output_dir).name  # the job's dir inside the sweep dir
    return record


def results(study: optuna.Study, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The plugin's keys (best_params/best_value, or best_trials for several objectives) when a
    trial completed, the count per state, and every trial."""
    out: dict[str, Any] = {"name": "optuna"}
    complete = [r for r in records if r["state"] == "COMPLETE"]
    if complete and len(study.directions) == 1:
        best = study.best_trial
        out.update(best_params=dict(best.params), best_value=best.value)
    elif complete:
        out["best_trials"] = [{"params": dict(t.params), "values": list(t.values)} for t in study.best_trials]
    out["n_trials"] = {s: sum(r["state"] == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")}
    out["trials"] = list(records)
    return out
