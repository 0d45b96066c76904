"""Tracking: W&B (offline by default) plus local `metrics.jsonl` and `summary.json` in the run dir.

The local files are the source of truth for `analysis/` (no W&B server needed); W&B mirrors
them for dashboards. The W&B run id is kept in the run dir so a resumed job continues the
same run, and `finish()` is always called so multirun jobs never share a run.

A job resumed from its checkpoint at step N re-logs the steps after N (a kill lost or left
them half-written), so both sinks are rewound first. metrics.jsonl (written synchronously) drops
its lines after N. W&B may have lost more: a SIGKILL also loses the rows its service had not
written yet, the checkpoint's own step among them. So the W&B run is rewound to the last step
its local record (the `run-<id>.wandb` files in the run dir, read by `wandb_offline`) holds at or
before N, K, with `resume_from="<id>?_step=K"` (W&B's rewind: the server truncates the history
at K before appending; offline, the new segment's run record carries the branch point, which
`wandb_offline.merged_history` applies), and metrics.jsonl's rows after K are logged again
before training goes on: the history equals an uninterrupted run's. With no row of the run left
at all, a new W&B run starts and gets every row. A server without rewind refuses it; the run is
then continued with `resume="allow"` (the server keeps the steps it already has and drops
re-logged ones up to its last step: the same values, since a resume is exact). A job rerun
without a checkpoint starts over, as a new W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lorabench.utils import atomic_write_text
from lorabench.wandb_agent import adopt_agent_run

WANDB_ID_FILE = "wandb_run_id.txt"
log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return v


def _number(v: Any) -> Any:
    """Undo `_jsonable` for a re-logged value: "nan"/"inf"/"-inf" were floats."""
    return float(v) if v in ("nan", "inf", "-inf") else v


def _rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line (the process was killed mid-write) is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def durable_step(run_dir: Path, run_id: str, upto: int) -> Optional[int]:
    """The last step at or before `upto` that the local record of W&B run `run_id` holds (None:
    no row of it survived). Rows reach the record in order, so every earlier row is there too."""
    from lorabench.wandb_offline import merged_history

    steps = [int(r["_step"]) for r in merged_history(run_dir, run_id=run_id) if "_step" in r]
    steps = [s for s in steps if s <= upto]
    return max(steps) if steps else None


class Tracker:
    """One job's sinks: metrics.jsonl (appended per logged step), summary.json, and W&B."""

    def __init__(
        self, cfg: DictConfig, run_dir: Path, tags: Optional[list[str]] = None, name: str = "",
        resume_step: Optional[int] = None,
    ) -> None:
        """`resume_step`: the step of the checkpoint the job resumes from (None: it starts over)."""
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.wandb_run = None
        self.truncate_after(-1 if resume_step is None else resume_step)
        lc = cfg.logger
        if lc.backend == "wandb" and lc.mode != "disabled":
            import wandb

            id_file = run_dir / WANDB_ID_FILE
            previous = id_file.read_text().strip() if id_file.exists() else None
            rewind = durable_step(run_dir, previous, resume_step) if previous and resume_step is not None else None
            run_id = previous if rewind is not None else secrets.token_hex(4)
            atomic_write_text(id_file, run_id)
            init = dict(
                project=lc.project,
                entity=lc.entity,
                group=lc.group,
                job_type=lc.job_type,
                name=lc.name or name,
                tags=list(lc.tags) + list(tags or []),
                config=OmegaConf.to_container(cfg, resolve=True),
                dir=str(run_dir),
                id=run_id,
                mode=lc.mode,
                reinit="create_new",
            )

            def settings() -> Any:  # fresh per call: wandb.init writes resume/resume_from into the object it is given
                return wandb.Settings(console="off", silent=True)

            if rewind is not None:
                try:  # rewind the run to its last durable step before re-logging the steps after it
                    self.wandb_run = wandb.init(**init, settings=settings(), resume_from=f"{run_id}?_step={rewind}")
                except Exception as e:  # noqa: BLE001 - a server without rewind: continue the run as it is
                    log.warning("W&B refused to rewind run %s (%s); continuing it with resume='allow'", run_id, e)
            if self.wandb_run is None:
                self.wandb_run = wandb.init(**init, settings=settings(), resume="allow")
            self.wandb_run = adopt_agent_run(self.wandb_run, cfg)  # under `wandb agent`: checked params, resolved config
            if resume_step is not None:
                self._relog_after(-1 if rewind is None else rewind)

    def _relog_after(self, step: int) -> None:
        """Log metrics.jsonl's rows after `step` to W&B again (rows of one step merge into one)."""
        if not self.metrics_path.exists():
            return
        for row in _rows(self.metrics_path):
            if row.get("step", 0) > step:
                self.wandb_run.log({k: _number(v) for k, v in row.items() if k != "step"}, step=row["step"])

    def truncate_after(self, step: int) -> None:
        """Drop metric lines logged after `step` (work a crash lost and a resume will redo)."""
        if not self.metrics_path.exists():
            return
        keep = [json.dumps(row) for row in _rows(self.metrics_path) if row.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Append one line to metrics.jsonl and mirror it to W&B."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def add_config(self, extra: dict[str, Any]) -> None:
        """Keys known only once the backbone and data are built (the job's `provenance/*`) join the W&B config."""
        if self.wandb_run is not None:
            self.wandb_run.config.update(extra, allow_val_change=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, atomically; mirrored into the W&B run summary."""
        clean = {k: _jsonable(v) for k, v in summary.items()}
        atomic_write_text(self.summary_path, json.dumps(clean, indent=2, sort_keys=True))
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})

    def finish(self, failed: bool, preempted: bool = False) -> None:
        """Always called (also on failure) so the next multirun job gets its own W&B run; a
        preempted run is marked so (W&B shows it as preempted, not crashed)."""
        if self.wandb_run is not None:
            if preempted:
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
