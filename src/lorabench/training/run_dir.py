"""The rules of a run dir, so that reruns can never mix two runs or redo a finished one.

- A run dir whose summary says `completed` is not trained again (`trainer.overwrite=true`
  clears it and starts fresh).
- A run dir records the config of the run it holds (`run_config.json`, and in every checkpoint);
  a rerun under another config is refused with one line naming the first differing key, and
  the dir is left as it was: Hydra rewrites `.hydra/` before any of our code runs, so `admit`
  puts back the copy of Hydra's files kept in `run_config.json`.
- A run dir with a checkpoint resumes from it (its step tells the tracker where to rewind
  metrics.jsonl and the W&B history); one without starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lorabench.errors import ConfigError, RunDirRefused
from lorabench.utils import atomic_write_text

# What a job writes into its run dir (cleared by trainer.overwrite=true before a fresh run).
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt", "error.txt", "final_state.pt", "wandb_run_id.txt", "eval.json")
RUN_DIRS = ("adapter", "merged_intn", "wandb")
CHECKPOINT = "checkpoint.pt"  # the resumable state of an unfinished run
RUN_RECORD = "run_config.json"  # the config record of the run the dir holds, and a copy of its Hydra files
# Keys that may differ between an interrupted run and its resumption (they change no number
# or only where a run is executed and how it is shown).
RESUMABLE_KEYS = ("run_dir", "logger", "extras", "paths", "trainer.progress", "trainer.threads", "trainer.device",
                  "trainer.overwrite", "model.cache_dir")


def completed_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    """The summary of a completed run in `run_dir`, else None."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return summary if summary.get("status") == "completed" else None


def checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the run dir's checkpoint, None without one (or with an unreadable one, which
    the trainer's resume then reports)."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:  # mmap: only the small counters are read, not the tensors
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"]["step"])
    except Exception:  # noqa: BLE001 - a torn file is reported by Trainer.resume, in one line
        return None


def clear(run_dir: Path) -> None:
    """Remove everything an earlier run wrote into `run_dir` (Hydra's own .hydra/ stays)."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def config_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus the keys a resumption may change: what a checkpoint must match."""
    record = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUMABLE_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = record
        for part in parent.split(".") if parent else []:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return record


def first_difference(saved: Any, now: Any, prefix: str = "") -> Optional[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of the first difference, in key order; a changed
    group choice first (`strategy.name`: it explains the other keys two strategies differ in)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(set(saved) | set(now), key=str)
        for key in keys:
            a, b = saved.get(key), now.get(key)
            if isinstance(a, dict) and isinstance(b, dict) and a.get("name") != b.get("name"):
                return f"{prefix}{key}.name", a.get("name", "<absent>"), b.get("name", "<absent>")
        for key in keys:
            found = first_difference(saved.get(key, "<absent>"), now.get(key, "<absent>"), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if saved == now else (prefix.rstrip("."), saved, now)


def check_same_config(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` under another config (one line naming the first differing key)."""
    diff = first_difference(saved, now)
    if diff is not None:
        key, was, is_ = diff
        raise ConfigError(
            f"{key}: the checkpoint {checkpoint} was written with {key}={was}, this run has {key}={is_}; "
            "rerun with the same overrides, use another run dir, or set trainer.overwrite=true"
        )


def checkpoint_config(run_dir: Path) -> Optional[dict[str, Any]]:
    """The config record stored in the run dir's checkpoint (None without a readable one)."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception:  # noqa: BLE001 - a torn file is reported by Trainer.resume, in one line
        return None


def admit(cfg: DictConfig, hydra_subdir: Optional[str] = None, write: bool = True) -> None:
    """Before a job touches its run dir: refuse a rerun under another config than the run the dir
    holds, completed or resumable (`RunDirRefused`, one line naming the first differing key), else record this run's
    config and Hydra's files in `run_config.json` (when `write`: rank 0). On a refusal, and on a
    rerun of a completed run (which the job then skips), Hydra's files in `hydra_subdir` are
    put back as they were. `trainer.overwrite=true` admits any rerun."""
    run_dir = Path(cfg.run_dir)
    record = config_record(cfg)
    path = run_dir / RUN_RECORD
    kept = json.loads(path.read_text()) if path.exists() else None
    if not cfg.trainer.get("overwrite", False):
        done = completed_summary(run_dir)
        saved = None  # a dir with neither a completed run nor a checkpoint has nothing to keep: it starts over
        if done or (run_dir / CHECKPOINT).exists():
            saved = kept["config"] if kept else checkpoint_config(run_dir)
        diff = first_difference(saved, record) if saved is not None else None
        if write and kept and (diff or done):
            for rel, text in kept["hydra_files"].items():  # Hydra rewrote them before this job began
                atomic_write_text(run_dir / rel, text)
        if diff is not None:
            key, was, is_ = diff
            what = "a completed run" if done else "an unfinished run"
            raise RunDirRefused(
                f"{key}: {run_dir} holds {what} with {key}={was}, this run has {key}={is_}; rerun with the "
                "same overrides, use another run dir, or set trainer.overwrite=true (it clears the dir)"
            )
        if done:
            return
    if write:
        hydra_dir = run_dir / hydra_subdir if hydra_subdir else None
        files = sorted(hydra_dir.glob("*.yaml")) if hydra_dir is not None and hydra_dir.is_dir() else []
        hydra_files = {str(f.relative_to(run_dir)): f.read_text() for f in files}
        atomic_write_text(path, json.dumps({"config": record, "hydra_files": hydra_files}, indent=1, sort_keys=True))


def admit_job(cfg: DictConfig) -> None:
    """`admit` for the Hydra job running now: Hydra's files are in its output subdir (none
    outside a Hydra app); under torchrun only rank 0 writes."""
    from hydra.core.hydra_config import HydraConfig

    try:
        subdir = HydraConfig.get().output_subdir
    except ValueError:  # not a Hydra app
        subdir = None
    admit(cfg, subdir, write=int(os.environ.get("RANK", "0") or 0) == 0)
