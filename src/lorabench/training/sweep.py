"""Multiruns that survive their bad jobs: up-front validation, failure records, a sweep summary.

Hydra's BasicSweeper re-raises the first failed job's exception after its batch (ending the
sweep without a record), and a bad value composed inside the launcher ends it with a
multi-line report. So `cli.run_job` records a failed job and returns, and `cli.SweepCallback`
(configured under `hydra.callbacks` in conf/hydra/default.yaml) validates every job before the
first one starts, then (with the helpers here) writes `sweep_summary.csv`, prints a table and
sets the sweep's exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import OmegaConf

from lorabench.utils import atomic_write_text

if TYPE_CHECKING:  # pandas is imported where a sweep is summarised, not on every CLI start
    import pandas as pd

# Jobs of the last multirun in this process that did not complete (cli.main turns it into the exit code).
LAST_SWEEP: dict[str, int] = {"jobs": 0, "failed": 0}
# Summary metrics shown in the printed table (all of them go to sweep_summary.csv).
TABLE_METRICS = ("eval/accuracy", "eval/loss", "memory/peak_bytes", "train/wall_seconds")
# The status of a job dir without a readable summary.json (the job was killed before it wrote one).
MISSING = "missing/killed"
# The override that varies between repetitions of one configuration.
SEED_KEY = "seed"


def one_line(e: BaseException) -> str:
    """Hydra's multi-line composition report reduced to one line ("...: Key 'x' not in 'Y'")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    cause = str(e.__cause__).strip().splitlines()[0] if e.__cause__ is not None and str(e.__cause__).strip() else ""
    return f"{first} {cause}".strip()


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs a BasicSweeper launches for these task overrides, in its order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's own expansion, not redone by hand
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def without_values(overrides: list[str], jobs: list[list[str]], bad: set[int]) -> Optional[list[str]]:
    """The sweep's overrides with the swept values that only `bad` jobs have removed, if the
    result expands to exactly the other jobs (in their order); else None (e.g. the failure comes
    from a combination of values, or nothing is left)."""
    good = [job for num, job in enumerate(jobs) if num not in bad]
    if not good:
        return None
    values: dict[str, list[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            if value not in values.setdefault(key, []):
                values[key].append(value)
    kept = {key: [v for v in vs if any(f"{key}={v}" in job for job in good)] for key, vs in values.items()}
    pruned = [f"{key}={','.join(kept[key])}" if len(vs) > 1 else f"{key}={vs[0]}" for key, vs in values.items()]
    try:
        return pruned if expand_jobs(pruned) == good else None
    except Exception:  # noqa: BLE001 - a value that does not survive re-joining: keep the sweep as it was
        return None


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`key=value` strings as a dict (the leading +/~ kept off the key)."""
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job dir under `sweep_dir` (found by its .hydra/overrides.yaml): job number,
    overrides, status, error and every scalar summary metric. A job dir without a summary is
    listed with status `missing/killed` (it counts as failed)."""
    import pandas as pd

    rows = []
    for hydra_dir in sorted(Path(sweep_dir).glob("*/.hydra")):
        if not (hydra_dir / "overrides.yaml").exists():
            continue
        job_dir = hydra_dir.parent
        overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
        num = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num", default=None) \
            if (hydra_dir / "hydra.yaml").exists() else None
        path = job_dir / "summary.json"
        try:
            summary = json.loads(path.read_text()) if path.exists() else None
        except json.JSONDecodeError:
            summary = None
        if summary is None:  # killed (SIGKILL, OOM, node failure) before it could write one
            summary = {"status": MISSING, "error": f"no summary.json in {job_dir}: the job was killed before it "
                       "finished; rerun the sweep to resume it"}
        row: dict[str, Any] = {"job": num, "overrides": " ".join(overrides), "job_dir": str(job_dir)}
        row.update({k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
        if row.get("status") != "completed":
            row["status"] = row.get("status") or "failed"
            row.setdefault("error", f"status {row['status']}")
        row.update({f"override:{k}": v for k, v in parse_overrides(overrides).items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty and df["job"].notna().all():
        df = df.sort_values("job", kind="stable").reset_index(drop=True)
    return df


def mean_std(values: pd.Series) -> str:
    """'mean ± std' (sample std over seeds), or just the mean for a single seed."""
    values = values.dropna().astype(float)
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.4g}"
    return f"{values.mean():.4g} ± {values.std(ddof=1):.4g}"


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of completed jobs: every varying override except the seed,
    mean ± std of each table metric, and the number of seeds."""
    import pandas as pd

    override_cols = [c for c in df.columns if c.startswith("override:")]
    varying = [c for c in override_cols if c != f"override:{SEED_KEY}" and df[c].nunique(dropna=False) > 1]
    done = df[df["status"] == "completed"]
    if done.empty:
        return pd.DataFrame()
    metrics = [m for m in TABLE_METRICS if m in done.columns]
    keys = varying or [lambda _: "all"]
    rows = []
    for name, group in done.groupby(keys, dropna=False, sort=False):
        name = name if isinstance(name, tuple) else (name,)
        row = {c.removeprefix("override:"): v for c, v in zip(varying, name)} if varying else {"config": "all"}
        row.update({m: mean_std(group[m]) for m in metrics})
        row["seeds"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)


def report(sweep_dir: Path, not_run: Optional[list[dict[str, Any]]] = None) -> tuple[int, int]:
    """Write `sweep_summary.csv`, print the table and the failed jobs; (jobs, failed).
    `not_run`: rows for jobs left out of the sweep (no job dir) or refused by their run dir."""
    import pandas as pd

    df = collect(sweep_dir)
    if not_run and not df.empty:  # a job refused by its run dir: its row replaces the row of the run the dir holds
        refused = {str(Path(row["job_dir"]).resolve()) for row in not_run if row.get("job_dir")}
        df = df[~df["job_dir"].map(lambda d: str(Path(d).resolve())).isin(refused)].reset_index(drop=True)
    if not_run:
        extra = [{**row, **{f"override:{k}": v for k, v in parse_overrides(row["overrides"].split()).items()}}
                 for row in not_run]
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    if df.empty:
        print(f"lorabench: no job dirs under {sweep_dir}", file=sys.stderr)
        return 0, 0
    out = df.drop(columns=[c for c in df.columns if c.startswith("override:")])
    atomic_write_text(Path(sweep_dir) / "sweep_summary.csv", out.to_csv(index=False))
    t = table(df)
    print(f"sweep summary {sweep_dir}: {len(df)} jobs, {int((df['status'] != 'completed').sum())} failed")
    if not t.empty:
        print(t.to_string(index=False))
    failed = df[df["status"] != "completed"]
    swept = [c for c in df.columns if c.startswith("override:") and df[c].nunique(dropna=False) > 1]
    for _, r in failed.iterrows():
        which = " ".join(f"{c.removeprefix('override:')}={r[c]}" for c in swept) or r["overrides"]
        job = f"job {int(r['job'])}" if pd.notna(r["job"]) else "not run"
        print(f"{r['status']}: {job} ({which}): {r.get('error', '')}")
    print(f"wrote {Path(sweep_dir) / 'sweep_summary.csv'}")
    return len(df), len(failed)
