"""The rules of a run dir, so that reruns can never mix two runs or redo a finished one.

- A run dir whose summary says `completed` is not trained again (`trainer.overwrite=true`
  clears it and starts fresh).
- A checkpoint carries the resolved config it was written under; resuming under another
  config is refused with one line naming the first differing key.
- A run dir with a checkpoint resumes from it (its step tells the tracker where to rewind
  metrics.jsonl and the W&B history); one without starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lorabench.errors import ConfigError

# What a job writes into its run dir (cleared by trainer.overwrite=true before a fresh run).
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt", "error.txt", "final_state.pt", "wandb_run_id.txt", "eval.json")
RUN_DIRS = ("adapter", "merged_intn", "wandb")
CHECKPOINT = "checkpoint.pt"  # the resumable state of an unfinished run
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
    """(dotted key, saved value, current value) of the first difference, in key order."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in sorted(set(saved) | set(now), key=str):
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
