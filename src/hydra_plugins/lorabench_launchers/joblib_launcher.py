"""hydra-joblib-launcher's launcher, made to outlive a worker that dies (conf/hydra/launcher/joblib.yaml).

When one loky worker dies (SIGKILL, the OOM killer), loky breaks its whole pool: the jobs still
running in the other workers are terminated too, and the plugin raises TerminatedWorkerError,
which ends the sweep with a traceback and no sweep summary. No joblib setting keeps the siblings
alive, so this launcher relaunches the sweep's jobs once in a fresh pool: completed jobs are
skipped by the run-dir rules (they return their recorded result), the interrupted ones resume
from their checkpoints. If a worker dies again (an OOM that recurs), the jobs go on one at a
time, each alone in its pool, so the job that keeps dying no longer takes the others down with
it: it is left without a `summary.json`, the sweep summary lists it as missing/killed and the
exit code says a job failed. For jobs that must never be retried, use
hydra/launcher=submitit_local (one process per job).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as PluginLauncher
from joblib.externals.loky.process_executor import TerminatedWorkerError


class JoblibLauncher(PluginLauncher):
    """Local processes through joblib; a dead worker costs its own job, not the sweep."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return super().launch(job_overrides, initial_job_idx)
        except TerminatedWorkerError as e:
            print(f"lorabench: a joblib worker died ({one_line(e)}); loky stopped the jobs running beside it: "
                  "relaunching the unfinished jobs once (completed ones are skipped, the others resume)",
                  file=sys.stderr)
        try:
            return super().launch(job_overrides, initial_job_idx)
        except TerminatedWorkerError as e:
            print(f"lorabench: a joblib worker died again ({one_line(e)}); going on one job at a time, each alone "
                  "in its pool, so a job that keeps dying costs only itself", file=sys.stderr)
        return [self.launch_alone(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]

    def launch_alone(self, overrides: list[str], job_idx: int) -> JobReturn:
        """One job in a pool of its own; a worker death here is that job's (listed missing/killed)."""
        try:
            return super().launch([overrides], job_idx)[0]
        except TerminatedWorkerError as e:
            print(f"lorabench: job {job_idx}'s worker died when it ran alone ({one_line(e)}); it is listed "
                  "missing/killed in the sweep summary; rerun the sweep to resume it", file=sys.stderr)
            # no return value: the sweep summary reads what the job's run dir holds (no summary.json)
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)


def one_line(error: Exception) -> str:
    """loky's message without its multi-line detail (it names the workers' exit codes)."""
    text = " ".join(str(error).split())
    return text[:200]
