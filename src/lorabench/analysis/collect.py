"""Runs → one tidy DataFrame, from local run dirs or from W&B, with the same columns either way.

One row per run: `run` (its dir or W&B path), `group` (the sweep: the sweep dir's name, which is
also the W&B group), `status`, every config key as a dotted column (`strategy.rank`,
`trainer.max_steps`, `seed`), every summary metric as a slashed column (`eval/accuracy`,
`memory/measured_bytes`), and what produced the run (`provenance/torch`, text too). A W&B run
summary holds the last logged value of every history key updated with summary.json, so the
local loader adds the last metrics.jsonl value of each key summary.json lacks: both sources
give the same columns. Per-step history is read on demand
(`RunSet.history`), never for the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from omegaconf import OmegaConf

from lorabench.errors import ConfigError

SUMMARY = "summary.json"  # written by the tracker at the end of a run (status included)
METRICS = "metrics.jsonl"  # one JSON line per logged step
CONFIG = Path(".hydra") / "config.yaml"  # the job's composed config (interpolations unresolved)
SWEEP_MARK = "multirun.yaml"  # Hydra writes it into every sweep dir: its name is the W&B group
META = ("run", "group", "status", "error", "overrides")  # columns that are neither config nor metric
PROVENANCE = "provenance/"  # what produced a run (lorabench.provenance): kept whatever its type


@dataclass
class RunSet:
    """The runs (completed ones only) and how to read one run's per-step history."""

    runs: pd.DataFrame
    history_of: Callable[[str], pd.DataFrame]  # run id → rows with `step` and metric columns
    dropped: int = 0  # failed or incomplete runs left out
    sources: list[str] = field(default_factory=list)

    def history(self, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
        """Long table: run, step, and `keys` (rows where at least one of them was logged)."""
        frames = []
        for rid in run_ids:
            h = self.history_of(rid)
            have = [k for k in keys if k in h.columns]
            if not have:
                continue
            h = h[["step", *have]].dropna(subset=have, how="all").copy()
            h.insert(0, "run", rid)
            frames.append(h)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "step", *keys])


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text (hashable, so they can be grouped by)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    return {key: json.dumps(tree) if isinstance(tree, list) else tree}


def resolved_config(path: Path) -> dict[str, Any]:
    """The job's config with interpolations resolved (as the tracker sends it to W&B); a key whose
    interpolation cannot be resolved here keeps its raw text."""
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an env var or resolver missing here: resolve key by key
        raw = OmegaConf.to_container(cfg, resolve=False)
        out = {}
        for key, value in flatten(raw).items():
            try:
                out[key] = OmegaConf.select(cfg, key)
            except Exception:
                out[key] = value
        return out


def metric_row(summary: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Summary metrics (numbers under a `/` key, the strategy's config copies left out) over the
    last history values, W&B's summary semantics."""
    merged = {**last, **summary}
    return {k: v for k, v in merged.items() if "/" in k and not k.startswith(("strategy/", "_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def make_row(run: str, group: str, summary: dict[str, Any], last: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run, "group": group, "status": summary.get("status"),
                           "error": summary.get("error"), "overrides": json.dumps(summary.get("overrides") or [])}
    row.update(flatten(config))
    row.update(metric_row(summary, last))
    row.update({k: v for k, v in summary.items() if k.startswith(PROVENANCE)})  # text too: versions, hashes
    return row


def read_jsonl(path: Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (empty when missing); a torn last line is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return pd.DataFrame(rows, columns=None if rows else ["step"])


def last_values(hist: pd.DataFrame) -> dict[str, Any]:
    """The last logged value of every metric (W&B's summary of a history)."""
    out = {}
    for k in hist.columns:
        if k != "step":
            s = hist[k].dropna()
            if len(s):
                out[k] = s.iloc[-1].item() if hasattr(s.iloc[-1], "item") else s.iloc[-1]
    return out


def group_of(run_dir: Path, root: Path) -> str:
    """The sweep a run belongs to: the nearest dir above it holding multirun.yaml, else the root."""
    for parent in [run_dir, *run_dir.parents]:
        if (parent / SWEEP_MARK).exists():
            return parent.name
        if parent == root:
            break
    return root.name if root != run_dir else run_dir.parent.name


def local_run_dirs(root: Path) -> list[Path]:
    """Every dir under `root` (itself included) that holds a summary.json or a job config."""
    found = {p.parent for p in root.rglob(SUMMARY)} | {p.parent.parent for p in root.rglob(str(CONFIG))}
    return sorted(d for d in found if "wandb" not in d.parts)


def load_local(roots: list[Path]) -> RunSet:
    """Completed runs under the given run or sweep dirs."""
    rows, dropped, dirs = [], 0, {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"{root}: not a directory (expected a run or sweep dir, or wandb:entity/project[/group])")
        for d in local_run_dirs(root):
            summary = json.loads((d / SUMMARY).read_text()) if (d / SUMMARY).exists() else {}
            if summary.get("status") != "completed" or not (d / CONFIG).exists():
                dropped += 1
                continue
            config = resolved_config(d / CONFIG)
            rows.append(make_row(str(d), group_of(d, root), summary, last_values(read_jsonl(d / METRICS)), config))
            dirs[str(d)] = d
    return RunSet(finish(rows), lambda rid: read_jsonl(dirs[rid] / METRICS), dropped, [str(r) for r in roots])


def finish(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → DataFrame with metadata first, then config (dotted) and metric (slashed) columns sorted."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    config = sorted(c for c in df.columns if c not in META and "/" not in c)
    metrics = sorted(c for c in df.columns if "/" in c)
    return df[[*META, *config, *metrics]].sort_values("run", kind="stable").reset_index(drop=True)


def parse_wandb(spec: str) -> tuple[str, str | None]:
    """`wandb:entity/project[/group]` → ("entity/project", group or None)."""
    parts = spec.removeprefix("wandb:").strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"{spec}: expected wandb:entity/project or wandb:entity/project/group")
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def load_wandb(spec: str, api: Any = None) -> RunSet:
    """Completed runs of a W&B project (or one group of it). `api`: a `wandb.Api()` (tests pass a fake)."""
    path, group = parse_wandb(spec)
    try:
        if api is None:
            import wandb

            api = wandb.Api(timeout=30)  # seconds per request: an unreachable server fails, not hangs
        runs = list(api.runs(path, filters={"group": group} if group else {}))
    except ConfigError:
        raise
    except Exception as e:  # the server is unreachable, the project missing, no API key: one line
        raise ConfigError(f"{spec}: cannot read runs from W&B ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    rows, dropped, by_id = [], 0, {}
    for r in runs:
        summary = dict(getattr(r, "summary_metrics", None) or {})
        if summary.get("status", "completed" if r.state == "finished" else r.state) != "completed":
            dropped += 1
            continue
        rid = "/".join(r.path) if isinstance(r.path, (list, tuple)) else str(r.path)
        rows.append(make_row(rid, r.group or path.split("/")[1], summary, {}, dict(r.config)))
        by_id[rid] = r
    return RunSet(finish(rows), lambda rid: wandb_history(by_id[rid]), dropped, [spec])


def wandb_history(run: Any) -> pd.DataFrame:
    """A W&B run's history as metrics.jsonl rows (`_step` → `step`, W&B's own `_*` keys dropped)."""
    rows = []
    for rec in run.scan_history():
        row = {k: v for k, v in rec.items() if not k.startswith("_") and v is not None
               and not (isinstance(v, float) and math.isnan(v))}
        if len(row):
            rows.append({"step": rec["_step"], **row})
    return pd.DataFrame(rows, columns=None if rows else ["step"])


def load(sources: list[str], api: Any = None) -> RunSet:
    """Local dirs and `wandb:` specs together (a W&B spec alone, or dirs alone, is the usual case)."""
    sets = [load_wandb(s, api) if s.startswith("wandb:") else load_local([Path(s)]) for s in sources]
    if len(sets) == 1:
        return sets[0]
    owners = {rid: s for s in sets for rid in s.runs.get("run", [])}
    runs = finish([row for s in sets for row in s.runs.to_dict("records")])
    return RunSet(runs, lambda rid: owners[rid].history_of(rid), sum(s.dropped for s in sets), list(sources))
