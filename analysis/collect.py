"""Collect run dirs into one table (and a figure): `python analysis/collect.py outputs/multirun/<sweep>`.

Reads every `summary.json` under the given dirs (the local source of truth; no W&B server
needed), groups the completed runs by the columns that distinguish them (strategy, and any
strategy/* or merge settings that vary), and prints mean ± std over seeds as a markdown
table. `--plot FILE.png` also draws the primary metric per group with seed error bars.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

DEFAULT_METRICS = ["eval/accuracy_base", "eval/accuracy", "eval/accuracy_merged", "eval/loss", "eval/loss_merged",
                   "eval/perplexity", "memory/measured_bytes", "train/tokens_per_second", "train/wall_seconds"]


def load_runs(roots: list[Path]) -> pd.DataFrame:
    """One row per summary.json found under `roots` (failed runs included, flagged by status)."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("summary.json")):
            row = json.loads(path.read_text())
            row.update(override_columns(row.get("overrides")))
            # list-valued config keys (strategy/target_modules, ...) as text, so they can be grouped by
            row = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}
            row["run_dir"] = str(path.parent)
            rows.append(row)
    return pd.DataFrame(rows)


def override_columns(overrides: object) -> dict[str, str]:
    """`override/<key>` for every `key=value` a job was launched with, except the seed (the
    runs a group averages over) and the strategy (already a column)."""
    if not isinstance(overrides, list):
        return {}
    out = {}
    for item in overrides:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if sep and key not in ("seed", "strategy") and not key.startswith("hydra"):
            out[f"override/{key}"] = value
    return out


def group_columns(df: pd.DataFrame) -> list[str]:
    """strategy plus every strategy/*, override/* or task column that takes more than one value
    (so an lr sweep stays one row per lr, and seeds are what a row averages over)."""
    cols = ["strategy"]
    for c in df.columns:
        grouping = c.startswith(("strategy/", "override/")) or c in ("task", "merge")
        if grouping and df[c].nunique(dropna=True) > 1:
            cols.append(c)
    return cols


def summarize(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """mean ± std over seeds of each metric, per group of completed runs."""
    done = df[df["status"] == "completed"]
    cols = group_columns(done)
    present = [m for m in metrics if m in done.columns]
    g = done.groupby(cols, dropna=False)
    table = g[present].agg(["mean", "std"])
    table[("seeds", "")] = g.size()
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """`mean ± std` cells, one row per group."""
    metrics = list(dict.fromkeys(m for m, _ in table.columns if m != "seeds"))
    out = pd.DataFrame(index=table.index)
    for m in metrics:
        mean, std = table[(m, "mean")], table[(m, "std")].fillna(0.0)
        scale = 100.0 if "accuracy" in m else 1.0
        out[m] = [f"{a * scale:.1f} ± {s * scale:.1f}" if scale == 100 else f"{a:.4g} ± {s:.2g}" for a, s in zip(mean, std)]
    out["seeds"] = table[("seeds", "")]
    flat = out.reset_index()
    lines = ["| " + " | ".join(flat.columns) + " |", "|" + "---|" * len(flat.columns)]
    lines += ["| " + " | ".join("" if pd.isna(x) else str(x) for x in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join(lines)


def plot(table: pd.DataFrame, metric: str, path: Path) -> None:
    """Bar chart of `metric` per group with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" / ".join(map(str, k if isinstance(k, tuple) else (k,))) for k in table.index]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels)), 3.5))
    ax.bar(labels, table[(metric, "mean")], yerr=table[(metric, "std")].fillna(0), capsize=3)
    ax.set_ylabel(metric)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path, help="run or sweep dirs to scan for summary.json")
    ap.add_argument("--metrics", nargs="*", default=DEFAULT_METRICS, help="summary keys to aggregate")
    ap.add_argument("--plot", type=Path, help="write a bar chart of --plot-metric here")
    ap.add_argument("--plot-metric", default="eval/accuracy", help="metric for --plot")
    ap.add_argument("--csv", type=Path, help="also write every run as one CSV row")
    args = ap.parse_args(argv)
    df = load_runs(args.roots)
    if df.empty:
        print(f"no summary.json under {[str(r) for r in args.roots]}", file=sys.stderr)
        return 1
    failed = int((df["status"] != "completed").sum())
    table = summarize(df, args.metrics)
    print(to_markdown(table))
    if failed:
        print(f"\n{failed} run(s) did not complete (see their error.txt)")
    if args.csv:
        df.to_csv(args.csv, index=False)
    if args.plot:
        plot(table, args.plot_metric, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
