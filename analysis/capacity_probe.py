"""Is the fact table (task=facts) capacity-bound? Final value loss per rank and per ReLoRA cell, as a table and a figure.

Run: python analysis/capacity_probe.py outputs/capacity/p3 outputs/capacity/p6 ... [--out docs/figures/capacity_rank.png]

Reads finished run dirs or sweep dirs (lorabench.analysis.collect, the report's loader) and
prints one markdown row per configuration (task size, table seed, strategy, rank, reset period,
warm start): the final eval/loss and eval/perplexity of the value tokens (mean ± std over
seeds), token accuracy, trainable parameters and the measured rank of the accumulated low-rank
update (relora/update_rank_mean, computed by the strategy at the end of the run). With --out it
draws final eval/loss against the LoRA rank (single-cycle LoRA runs, one line per task size),
the full-rank runs as dashed horizontal lines, and the chance level. The experiments
themselves are launched with `lorabench -m` (docs/reproductions.md gives the commands).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from lorabench.analysis.collect import RunSet, load

VALUE_DIGITS = 4  # lorabench.data.facts.VALUE_LENGTH: the value tokens scored, plus eos
CHANCE_LOSS = VALUE_DIGITS * math.log(10) / (VALUE_DIGITS + 1)  # uniform digits, a known eos: 1.842 nats
KEYS = ["task.train_size", "task.table_seed", "strategy.name", "strategy.rank", "strategy.reset_every",
        "strategy.warm_start_steps", "trainer.max_steps", "strategy.lr"]
METRICS = ["eval/loss", "eval/perplexity", "eval/token_accuracy", "params/trainable", "relora/update_rank_mean"]


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: the KEYS present, seeds, and mean/std of each metric."""
    keys = [k for k in KEYS if k in runs.columns]
    rows = []
    for cfg, g in runs.groupby([runs[k].fillna(-1) for k in keys], sort=True):
        row = dict(zip(keys, cfg if isinstance(cfg, tuple) else (cfg,)))
        row["seeds"] = int(g["seed"].nunique())
        for m in METRICS:
            vals = pd.to_numeric(g[m], errors="coerce").dropna() if m in g.columns else pd.Series(dtype=float)
            row[m] = vals.mean() if len(vals) else float("nan")
            row[m + ":std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def pm(mean: float, std: float, fmt: str) -> str:
    if pd.isna(mean):
        return ""
    return fmt.format(mean) if pd.isna(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"


def markdown(t: pd.DataFrame) -> str:
    head = ("| facts | table_seed | cell | rank | T | warm start | steps | lr | seeds | eval loss | value ppl "
            "| token acc | trainable | update rank |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, r in t.iterrows():
        full = r["strategy.name"] == "full"
        rank = "" if full else str(int(r["strategy.rank"]))
        period = "" if full else str(int(r["strategy.reset_every"]))
        warm = "" if full else str(int(r["strategy.warm_start_steps"]))
        lines.append(
            f"| {int(r['task.train_size'])} | {int(r['task.table_seed'])} | {r['strategy.name']} | {rank} | {period} "
            f"| {warm} | {int(r['trainer.max_steps'])} | {r['strategy.lr']:g} | {r['seeds']} "
            f"| {pm(r['eval/loss'], r['eval/loss:std'], '{:.3f}')} | {pm(r['eval/perplexity'], r['eval/perplexity:std'], '{:.3f}')} "
            f"| {pm(r['eval/token_accuracy'], r['eval/token_accuracy:std'], '{:.3f}')} | {int(r['params/trainable'])} "
            f"| {pm(r['relora/update_rank_mean'], r['relora/update_rank_mean:std'], '{:.1f}')} |"
        )
    return "\n".join(lines)


def plot(t: pd.DataFrame, out: Path, full_lr: float, lora_lr: float) -> list[Path]:
    """Final eval/loss vs LoRA rank (one cycle, no warm start, at `lora_lr`), full-rank (at `full_lr`)
    as dashed lines, chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorabench.analysis.style import save

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    lora = t[(t["strategy.name"] == "relora") & (t["strategy.reset_every"] == t["trainer.max_steps"])
             & (t["strategy.warm_start_steps"] == 0) & (t["strategy.lr"] - lora_lr).abs().lt(1e-12)]
    for i, (n, g) in enumerate(lora.groupby("task.train_size")):
        g = g.sort_values("strategy.rank")
        colour = f"C{i}"
        ax.errorbar(g["strategy.rank"], g["eval/loss"], yerr=g["eval/loss:std"].fillna(0), marker="o", color=colour,
                    label=f"LoRA, {int(n)} facts")
        full = t[(t["strategy.name"] == "full") & (t["task.train_size"] == n) & (t["strategy.lr"] - full_lr).abs().lt(1e-12)]
        for _, f in full.iterrows():
            ax.axhline(f["eval/loss"], color=colour, ls="--", lw=1, label=f"full rank (lr {f['strategy.lr']:g}), {int(n)} facts")
    ax.axhline(CHANCE_LOSS, color="grey", ls=":", lw=1, label=f"chance ({CHANCE_LOSS:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"LoRA rank r (one cycle, lr {lora_lr:g})")
    ax.set_ylabel("final eval loss, value tokens (nats)")
    seeds = sorted(int(v) for v in t["task.table_seed"].unique())
    ax.set_title(f"fact table_seed {seeds}, {int(t['trainer.max_steps'].max())} steps, runs per point: "
                 f"{int(t['seeds'].max())}", fontsize=8)
    ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, out.parent, out.stem)


def label(r: pd.Series) -> str:
    if r["strategy.name"] == "full":
        return "full rank"
    ws = int(r["strategy.warm_start_steps"])
    cycles = (int(r["trainer.max_steps"]) - ws) // int(r["strategy.reset_every"])
    name = "LoRA" if cycles == 1 else f"ReLoRA ({cycles} cycles)"
    return f"{name}, r={int(r['strategy.rank'])}" + (f", warm start {ws}" if ws else "")


def plot_curves(rs: RunSet, out: Path) -> list[Path]:
    """eval/perplexity vs step, mean over seeds (band: min..max), one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorabench.analysis.style import plain_log, save

    runs = rs.runs[rs.runs["task.name"] == "facts"]
    keys = [k for k in KEYS if k in runs.columns]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for i, (_, g) in enumerate(runs.groupby([runs[k].fillna(-1) for k in keys], sort=True)):
        h = rs.history(list(g["run"]), ["eval/perplexity"]).dropna(subset=["eval/perplexity"])
        stats = h.groupby("step")["eval/perplexity"].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], marker="o", ms=3, color=f"C{i}",
                label=f"{label(g.iloc[0])} ({g['seed'].nunique()} seeds)")
        ax.fill_between(stats.index, stats["min"], stats["max"], color=f"C{i}", alpha=0.15, lw=0)
    ax.axhline(math.exp(CHANCE_LOSS), color="grey", ls=":", lw=1, label=f"chance ({math.exp(CHANCE_LOSS):.2f})")
    plain_log(ax, "y")
    ax.set_ylim(top=8)
    ax.set_title(f"fact table_seed {sorted(int(v) for v in runs['task.table_seed'].unique())}, "
                 f"{sorted(int(v) for v in runs['task.train_size'].unique())} facts; band: min..max over seeds", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("eval perplexity, value tokens (the table itself)")
    ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, out.parent, out.stem)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="run or sweep dirs")
    ap.add_argument("--out", type=Path, help="write the loss-vs-rank figure here (PNG, and a PDF beside it)")
    ap.add_argument("--curves", type=Path, help="write eval perplexity vs step per configuration here (PNG + PDF)")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="the figure draws full-rank runs at this lr")
    ap.add_argument("--lora-lr", type=float, default=3e-3, help="the figure draws LoRA runs at this lr")
    args = ap.parse_args(argv)
    rs = load([str(s) for s in args.sources])
    runs = rs.runs
    if runs.empty:
        print(f"capacity_probe: no completed runs under {args.sources}", file=sys.stderr)
        return 1
    t = table(runs[runs["task.name"] == "facts"])
    print(markdown(t))
    if args.out:
        print("wrote " + " ".join(str(p) for p in plot(t, args.out, args.full_lr, args.lora_lr)))
    if args.curves:
        print("wrote " + " ".join(str(p) for p in plot_curves(rs, args.curves)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
