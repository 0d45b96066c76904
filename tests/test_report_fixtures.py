"""Run dirs with known numbers for the report tests (what a lorabench job writes: .hydra/config.yaml,
summary.json, metrics.jsonl), and a fake W&B API that serves the same runs. No tests here."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import yaml


def make_run(sweep: Path, name: str, *, strategy: str, seed: int, summary: dict[str, Any],
             history: Optional[list[dict[str, Any]]] = None, config: Optional[dict[str, Any]] = None,
             overrides: Optional[list[str]] = None, status: str = "completed") -> Path:
    """One job dir under `sweep` (a sweep dir: multirun.yaml is written too)."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    cfg: dict[str, Any] = {"seed": seed, "run_dir": str(run), "optimized_metric": "eval/accuracy",
                           "model": {"name": "tiny", "pretrain_seed": seed},
                           "strategy": {"name": strategy, "rank": 8}, "task": {"name": "sort"},
                           "trainer": {"max_steps": 200, "threads": 1, "log_every": 10}, "paths": {"output_dir": str(sweep)},
                           "optim": {"lr": "${strategy.lr}", "betas": [0.9, 0.999]}}
    cfg["strategy"]["lr"] = 3e-3
    for key, value in (config or {}).items():  # dotted keys
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    full = {"status": status, "strategy": strategy, "seed": seed, "task": "sort", "strategy/rank": 8,
            "overrides": overrides if overrides is not None else [f"strategy={strategy}", f"seed={seed}"], **summary}
    (run / "summary.json").write_text(json.dumps(full))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history or []))
    return run


class FakeRun:
    """What the report reads of a `wandb.apis.public.Run`: path, group, state, config, summary, history."""

    def __init__(self, run_dir: Path, group: str) -> None:
        from omegaconf import OmegaConf

        self.path = ["me", "proj", run_dir.name]
        self.group = group
        summary = json.loads((run_dir / "summary.json").read_text())
        self.state = "finished" if summary.get("status") == "completed" else "failed"
        self.config = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
        self.rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last: dict[str, Any] = {}
        for r in self.rows:  # W&B's summary: last value of every logged key, then the run's summary update
            last.update({k: v for k, v in r.items() if k != "step"})
        self.summary_metrics = {**last, **summary, "_step": self.rows[-1]["step"] if self.rows else 0, "_runtime": 3.0}

    def scan_history(self) -> list[dict[str, Any]]:
        return [{"_step": r["step"], "_runtime": 1.0, **{k: v for k, v in r.items() if k != "step"}} for r in self.rows]


class FakeApi:
    """`wandb.Api()` stand-in: `runs(path, filters)` over run dirs, grouped by their sweep dir name."""

    def __init__(self, sweeps: list[Path], fail: Optional[Exception] = None) -> None:
        self.sweeps, self.fail, self.calls = sweeps, fail, []

    def runs(self, path: str, filters: Optional[dict[str, Any]] = None) -> list[FakeRun]:
        self.calls.append((path, copy.deepcopy(filters)))
        if self.fail is not None:
            raise self.fail
        group = (filters or {}).get("group")
        return [FakeRun(d.parent, s.name) for s in self.sweeps for d in sorted(s.glob("*/summary.json"))
                if group in (None, s.name)]


def namespace(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(**kw)
