"""Which runs are repetitions of one configuration, and their mean ± std over seeds.

A *study* is one sweep (the `group` column) on one task: runs of different tasks are never
averaged together or drawn on one axis. Inside a study, runs form one configuration when every
config column that varies in the study — except the seed, and bookkeeping keys that do not
change a result (where files go, log cadence, threads) — is equal: a 40-step and a 200-step run
of one strategy are two rows. The seed count is the number of distinct seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from lorabench.analysis.collect import META

SEED = "seed"  # the column a configuration's runs differ in
TASK = "task.name"  # studies never mix tasks
# Config keys that do not change what a run computes (where files go, how often it logs or
# checkpoints, threads, the W&B settings): never a reason to split a configuration.
BOOKKEEPING_PREFIXES = ("paths.", "logger.", "extras.", "hydra.")
BOOKKEEPING_KEYS = {"run_dir", "optimized_metric", "trainer.progress", "trainer.threads", "trainer.overwrite",
                    "trainer.checkpoint_every", "trainer.log_every", "trainer.eval_every", "trainer.eval_batch_size",
                    "trainer.device"}


@dataclass(frozen=True)
class Metric:
    """How one summary metric is shown: the same units in every table and figure."""

    label: str  # axis / column title, unit included
    scale: float  # raw value × scale = shown value
    fmt: str  # format of a shown value
    higher_better: bool  # which cell of a column is bold


MB = 1e-6  # bytes → MB (10^6 bytes)
METRICS: dict[str, Metric] = {
    "eval/accuracy": Metric("exact match (%)", 100.0, "{:.1f}", True),
    "eval/accuracy_merged": Metric("exact match after merge (%)", 100.0, "{:.1f}", True),
    "eval/loss": Metric("eval loss", 1.0, "{:.3f}", False),
    "eval/loss_merged": Metric("eval loss after merge", 1.0, "{:.3f}", False),
    "eval/perplexity": Metric("eval perplexity", 1.0, "{:.2f}", False),
    "params/trainable": Metric("trainable parameters", 1.0, "{:,.0f}", False),
    "memory/measured_bytes": Metric("measured memory (MB)", MB, "{:.2f}", False),
    "memory/formula_bytes": Metric("formula memory (MB)", MB, "{:.2f}", False),
    "memory/activation_bytes": Metric("activations (MB)", MB, "{:.1f}", False),
    "memory/peak_load_bytes": Metric("peak memory, load (MB)", MB, "{:.0f}", False),
    "memory/peak_bytes": Metric("peak memory, train (MB)", MB, "{:.0f}", False),
    "memory/peak_merge_bytes": Metric("peak memory, merge (MB)", MB, "{:.0f}", False),
    "merged/model_bytes": Metric("merged model (MB)", MB, "{:.3f}", False),
    "train/tokens_per_second": Metric("throughput (tokens/s)", 1.0, "{:.0f}", True),
    "train/wall_seconds": Metric("wall time (s)", 1.0, "{:.0f}", False),
}


def config_columns(df: pd.DataFrame) -> list[str]:
    """Dotted config columns (every key of every run's config)."""
    return [c for c in df.columns if c not in META and "/" not in c]


def grouping_columns(df: pd.DataFrame) -> list[str]:
    """Config columns that vary across `df`, except the seed, columns that follow the seed
    (`model.pretrain_seed: ${seed}`) and bookkeeping keys."""
    out = []
    for c in config_columns(df):
        if c == SEED or c in BOOKKEEPING_KEYS or c.startswith(BOOKKEEPING_PREFIXES):
            continue
        if df[c].astype(str).nunique() <= 1:
            continue
        if SEED in df.columns and (df[c].astype(str) == df[SEED].astype(str)).all():
            continue
        out.append(c)
    return out


def studies(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One frame per (sweep, task), named `<group>` or `<group>-<task>` when a sweep mixes tasks."""
    out = {}
    for group, g in df.groupby("group", sort=True):
        tasks = g[TASK].astype(str) if TASK in g.columns else pd.Series("", index=g.index)
        for task, t in g.groupby(tasks, sort=True):
            name = str(group) if tasks.nunique() == 1 else f"{group}-{task}"
            out[name] = t.reset_index(drop=True)
    return out


def launch_overrides(cell: object) -> dict[str, str]:
    """A run's launch overrides (`overrides` column, JSON list of key=value) as a dict."""
    items = json.loads(cell) if isinstance(cell, str) and cell else []
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep and not key.lstrip("+~").startswith("hydra"):
            out[key.lstrip("+~")] = value
    return out


def short(key: str, value: object) -> str:
    """`strategy=lora` → `lora`, `strategy.rank=4` → `rank=4`, `+experiment/x=cell` → `cell`."""
    if key in ("strategy", "strategy.name") or "/" in key:
        return str(value)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def row_keys(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One text key per run from the values of `cols` (NaN and None as text, so they group too)."""
    return pd.Series(["|".join(map(str, t)) for t in df[cols].itertuples(index=False)] if cols else "", index=df.index)


def labels(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """A readable name per run's configuration: the launch overrides that vary in the study
    (except the seed), else the varying config values; made unique with config values."""
    ov = df["overrides"].map(launch_overrides) if "overrides" in df.columns else pd.Series([{}] * len(df))
    keys = sorted({k for d in ov for k in d if k != SEED}, key=lambda k: (k != "strategy", k))  # the strategy first
    varying = [k for k in keys if len({d.get(k) for d in ov}) > 1]
    if varying:
        lab = ov.map(lambda d: " ".join(short(k, d.get(k, "")) for k in varying))
    else:
        lab = df["strategy.name"].astype(str) if "strategy.name" in df.columns else pd.Series("all", index=df.index)
    key = row_keys(df, cols)
    clash = lab.groupby(lab).transform(lambda s: key[s.index].nunique() > 1)
    extra = [c for c in cols if c != "strategy.name"]
    if clash.any() and extra:
        lab = lab.where(~clash, lab + " (" + df[extra].astype(str).apply(
            lambda r: ", ".join(short(c, v) for c, v in r.items()), axis=1) + ")")
    return lab


def aggregate(study: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per configuration: label, strategy, the grouping columns, `seeds` (distinct),
    `runs`, and `<metric>:mean`, `:std` (NaN below 2 values), `:n` (runs that have it)."""
    cols = grouping_columns(study)
    df = study.assign(label=labels(study, cols))
    rows = []
    key = row_keys(df, cols)
    for _, g in df.groupby(key, sort=False):
        first = g.iloc[0]
        row = {"label": first["label"], "strategy": first.get("strategy.name", ""), **{c: first[c] for c in cols}}
        row["seeds"] = int(g[SEED].nunique()) if SEED in g.columns else len(g)
        row["runs"] = len(g)
        for m in metrics:
            vals = pd.to_numeric(g[m], errors="coerce").dropna() if m in g.columns else pd.Series(dtype=float)
            row[f"{m}:mean"] = vals.mean() if len(vals) else float("nan")
            row[f"{m}:std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
            row[f"{m}:n"] = len(vals)
        rows.append(row)
    return pd.DataFrame(rows)


def missing_counts(study: pd.DataFrame, metrics: list[str]) -> dict[str, int]:
    """Runs of the study that lack each metric some of its other runs have."""
    out = {}
    for m in metrics:
        if m in study.columns:
            n = int(study[m].isna().sum())
            if 0 < n < len(study):
                out[m] = n
    return out


def mean_pm_std(mean: float, std: float, fmt: str) -> str:
    """`mean ± std`, or only the mean for a single value (no "± 0" from one seed); '' when absent."""
    if pd.isna(mean):
        return ""
    return fmt.format(mean) if pd.isna(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"
