"""hydra-submitit-launcher's launchers, made to outlive a job that dies (conf/hydra/launcher/submitit_*.yaml).

The plugin waits for its jobs in order and raises on the first one that left no result (killed
by SIGKILL, the OOM killer or a node failure), which ends the sweep: no sweep summary, and the
exception hides the jobs that are still running. These subclasses wait for every job and turn a
dead one into a line on stderr; its run dir then has no `summary.json`, so the sweep summary
lists it as missing and the exit code says a job failed. Rerunning the sweep (same overrides,
same sweep dir) skips the completed jobs and resumes the dead one from its checkpoint.
Preempted jobs never get here: submitit requeues them (`preempt`).
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin


def dead_job_return(num: int, job: Any, overrides: list[str]) -> Any:
    """A JobReturn the sweeper accepts for a job that died without a result (SIGKILL, OOM killer,
    node failure). Its run dir has no `summary.json`, so the sweep summary lists it as missing and
    the sweep's exit code says it failed; rerunning the sweep resumes it from its checkpoint."""
    import sys

    from hydra.core.utils import JobReturn, JobStatus

    print(f"lorabench: error: job {num} died without a result (submitit job {job.job_id}, logs in "
          f"{job.paths.folder}); rerun the sweep to resume it", file=sys.stderr)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)


def launch_outliving_dead_jobs(launcher: Any, parent: type, job_overrides: Any, initial_job_idx: int) -> Any:
    """The plugin's `launch`, except that every job is waited for and one that died is recorded
    instead of raised (the plugin raises on the first, ending the sweep while others still run).

    The plugin builds its executor inside `launch` and returns `[job.results()[0] ...]`; its
    `map_array` is intercepted (scoped to this call, in the launching thread) to keep the jobs
    and hand back none, so the results are gathered here."""
    from unittest import mock

    import submitit
    from submitit.core.utils import FailedJobError, UncompletedJobError

    jobs: list[Any] = []
    real_map_array = submitit.AutoExecutor.map_array

    def keep_jobs(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
        jobs.extend(real_map_array(executor, fn, *iterables))
        return []

    with mock.patch.object(submitit.AutoExecutor, "map_array", keep_jobs):
        parent.launch(launcher, job_overrides, initial_job_idx)
    results = []
    for num, (job, overrides) in enumerate(zip(jobs, job_overrides), start=initial_job_idx):
        try:
            results.append(job.results()[0])
        except (UncompletedJobError, FailedJobError):
            results.append(dead_job_return(num, job, list(overrides)))
    return results


class LocalLauncher(plugin.LocalLauncher):
    """Jobs as local subprocesses through submitit; a job that dies is recorded, the others finish."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        return launch_outliving_dead_jobs(self, plugin.LocalLauncher, job_overrides, initial_job_idx)


class SlurmLauncher(plugin.SlurmLauncher):
    """One SLURM job per sweep job; a job that dies is recorded, the others finish."""

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        return launch_outliving_dead_jobs(self, plugin.SlurmLauncher, job_overrides, initial_job_idx)
