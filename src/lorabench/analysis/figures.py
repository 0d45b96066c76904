"""Figures from summary metrics (one value per run): a accuracy vs memory, b memory stacked,
c QA-LoRA's bits table, e rank, f memory scaling. Each function takes one study, returns a
`Drawn` (the figure and the exact numbers it plots) or raises `Skip` saying what is missing.
Curves from per-step history (d, g) are in `curves.py`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lorabench.analysis.aggregate import MB, METRICS, aggregate
from lorabench.analysis.collect import RunSet
from lorabench.analysis.style import Drawn, Skip, caption, err, plain_log, strategy_colour

ACC, MEM = "eval/accuracy", "memory/measured_bytes"
PARTS = [("base", "base weights + quant. constants"), ("trainable", "trainable (adapters)"),
         ("grad", "gradients"), ("optimizer", "optimizer state")]
# (column, summary key, bar label): the peak of each phase, each since its own reset (docs/memory.md#peak)
PEAKS = [("peak_load", "memory/peak_load_bytes", "load (build + quantize + wrap)"),
         ("peak_train", "memory/peak_bytes", "train (steps + evals)"),
         ("peak_merge", "memory/peak_merge_bytes", "merge (merge + score)")]


def need(study: pd.DataFrame, *metrics: str) -> None:
    missing = [m for m in metrics if m not in study.columns or study[m].isna().all()]
    if missing:
        raise Skip(f"no run logged {', '.join(missing)}")


MAX_POINTS = 8  # figures a and b: one point / bar per configuration, readable up to this many
MARKERS = "osD^vP*X"  # a strategy's k-th configuration in figure a (its colour is the strategy's)


def few_configurations(agg: pd.DataFrame) -> None:
    """Figures a and b draw one point (bar) per configuration; a rank or size sweep has figures e and f."""
    if len(agg) > MAX_POINTS:
        raise Skip(f"{len(agg)} configurations, more than the {MAX_POINTS} points it keeps readable "
                   "(figure e draws rank sweeps, f size sweeps)")


def markers(strategies: pd.Series) -> list[str]:
    """A marker per configuration: the k-th configuration of a strategy gets MARKERS[k], so two
    configurations of one strategy (one colour) stay apart."""
    seen: dict[str, int] = {}
    out = []
    for s in strategies:
        k = seen[s] = seen.get(s, -1) + 1
        out.append(MARKERS[k % len(MARKERS)])
    return out


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points no other point beats on both axes (less memory and more accuracy)."""
    return np.array([not any((x[j] <= x[i] and y[j] >= y[i]) and (x[j] < x[i] or y[j] > y[i])
                             for j in range(len(x))) for i in range(len(x))])


def accuracy_vs_memory(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """a: exact match vs measured memory, one point per configuration (mean ± std), Pareto front."""
    need(study, ACC, MEM)
    agg = aggregate(study, [ACC, MEM])
    few_configurations(agg)
    d = pd.DataFrame({"label": agg["label"], "strategy": agg["strategy"], "seeds": agg["seeds"],
                      "memory_mb": agg[f"{MEM}:mean"] * MB, "memory_std": agg[f"{MEM}:std"] * MB,
                      "accuracy": agg[f"{ACC}:mean"] * 100, "accuracy_std": agg[f"{ACC}:std"] * 100}).dropna(
        subset=["memory_mb", "accuracy"]).reset_index(drop=True)
    d["pareto"] = pareto(d["memory_mb"].to_numpy(), d["accuracy"].to_numpy())
    d["marker"] = markers(d["strategy"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in d.iterrows():
        ax.errorbar(r["memory_mb"], r["accuracy"], xerr=err(r["memory_std"]), yerr=err(r["accuracy_std"]), fmt=r["marker"],
                    ms=7, capsize=3, color=strategy_colour(r["strategy"]), label=f"{r['label']} (n={r['seeds']})")
    front = d[d["pareto"]].sort_values("memory_mb")
    ax.plot(front["memory_mb"], front["accuracy"], drawstyle="steps-post", color="k", lw=1, ls="--",
            label="Pareto front", zorder=0)
    plain_log(ax, "x")
    ax.set_xlabel(f"{METRICS[MEM].label}, log scale")
    ax.set_ylabel(METRICS[ACC].label)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return Drawn(fig, {"points": d}, caption("Exact match vs measured memory (weights, gradients, optimizer "
                                              "state), Pareto front dashed", name, study, agg))


def memory_stack(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """b: measured memory per configuration stacked by what holds it, the seed formula beside it;
    middle panel adds the first step's activations; when the runs record peaks, a third panel
    gives each phase's peak (load, train, merge) as its own named bar."""
    parts = [f"memory/measured_{p}_bytes" for p, _ in PARTS]
    need(study, *parts, "memory/formula_bytes")
    act = "memory/activation_bytes"
    peak_keys = [k for _, k, _ in PEAKS if k in study.columns and study[k].notna().any()]
    agg = aggregate(study, [*parts, act, "memory/formula_bytes", *peak_keys])
    few_configurations(agg)
    d = pd.DataFrame({"label": agg["label"], "strategy": agg["strategy"], "seeds": agg["seeds"]})
    for p, _ in PARTS:
        d[p] = agg[f"memory/measured_{p}_bytes:mean"] * MB
    d["activation"] = agg[f"{act}:mean"] * MB if f"{act}:mean" in agg else np.nan
    d["formula"] = agg["memory/formula_bytes:mean"] * MB
    for col, key, _ in PEAKS:
        d[col] = agg[f"{key}:mean"] * MB if key in peak_keys else np.nan
    fig, axes = plt.subplots(1, 3 if peak_keys else 2, figsize=(16.5 if peak_keys else 11, 4.2))
    x = np.arange(len(d))
    colours = ["0.25", "0.5", "0.7", "0.85", "white"]  # greys: the strategy colours stay the strategies'
    hatches = ["", "//", "", "..", "xx"]
    for ax, with_act in zip(axes[:2], (False, True)):
        bottom = np.zeros(len(d))
        keys = [*PARTS, ("activation", "activations (first step)")] if with_act else PARTS
        for (p, label), c, h in zip(keys, colours, hatches):
            vals = d[p].fillna(0).to_numpy()
            ax.bar(x - 0.15, vals, 0.5, bottom=bottom, color=c, hatch=h, label=label, edgecolor="k", lw=0.4)
            bottom += vals
        ax.scatter(x + 0.2, d["formula"], marker="D", s=40, color=[strategy_colour(s) for s in d["strategy"]],
                   edgecolor="k", zorder=3, label="seed formula (4N+16M, 0.5N+16M, …)")
        ax.set_xticks(x, [f"{lab}\n(n={n})" for lab, n in zip(d["label"], d["seeds"])], fontsize=8)
        for tick, s in zip(ax.get_xticklabels(), d["strategy"]):
            tick.set_color(strategy_colour(s))
        ax.set_ylabel("memory (MB)")
        ax.set_title("weights, gradients, optimizer state" + (" + activations" if with_act else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.12))
    if peak_keys:
        peak_panel(axes[2], d)
    return Drawn(fig, {"bars": d}, caption("Measured memory per configuration by what holds it, seed formula as ◆"
                                           + ("; right: peak per phase" if peak_keys else ""), name, study, agg))


def peak_panel(ax: plt.Axes, d: pd.DataFrame) -> None:
    """Grouped bars: per configuration, the peak of each phase (CUDA max allocated or process
    peak RSS, each since its phase's reset), labelled with the phase; a phase a run did not
    have (no merge) has no bar."""
    x = np.arange(len(d))
    width = 0.8 / len(PEAKS)
    for k, ((col, _, label), shade) in enumerate(zip(PEAKS, ("0.3", "0.6", "0.9"))):
        ax.bar(x - 0.4 + width * (k + 0.5), d[col].to_numpy(), width, color=shade, edgecolor="k", lw=0.4,
               label=f"peak: {label}")
    ax.set_xticks(x, [f"{lab}\n(n={n})" for lab, n in zip(d["label"], d["seeds"])], fontsize=8)
    for tick, s in zip(ax.get_xticklabels(), d["strategy"]):
        tick.set_color(strategy_colour(s))
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("peak per phase (GPU: max allocated; CPU: process RSS)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def qalora_bits(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """c: exact match after merge vs bits: QA-LoRA merged into INT-N vs QLoRA merged then
    quantized to INT-N, against QLoRA merged in 16 bits; merged model size on a second axis."""
    need(study, "eval/accuracy_merged")
    if "strategy.merge" not in study.columns or not study["strategy.merge"].isin(["zeros", "intn"]).any():
        raise Skip("no run merged into INT-N (strategy.merge=zeros or intn)")
    acc, size = "eval/accuracy_merged", "merged/model_bytes"
    series = [("QA-LoRA merged (INT-N, {q})", "qalora", "zeros", "strategy.bits", "strategy.quantizer"),
              ("QLoRA merged → INT-N ({q})", "qlora", "intn", "strategy.merge_bits", "strategy.merge_quantizer")]
    rows = []
    for template, strategy, merge, bits_col, quantizer_col in series:
        part = study[(study["strategy.merge"] == merge) & (study["strategy.name"] == strategy)]
        if part.empty:
            continue
        # which quantizer chose the INT-N codes (runs from before the key existed used RTN)
        q = part[quantizer_col].dropna().astype(str) if quantizer_col in part.columns else pd.Series(dtype=str)
        title = template.format(q="/".join(sorted(q.str.upper().unique())) or "RTN")
        for bits, sub in part.groupby(bits_col):
            agg = aggregate(sub, [acc, size])
            if len(agg) != 1:
                raise Skip(f"{strategy} runs at {int(bits)} bits differ in more than the seed")
            r = agg.iloc[0]
            rows.append({"series": title, "strategy": strategy, "bits": int(bits), "seeds": r["seeds"],
                         "accuracy": r[f"{acc}:mean"] * 100, "accuracy_std": r[f"{acc}:std"] * 100,
                         "size_mb": r[f"{size}:mean"] * MB})
    d = pd.DataFrame(rows).sort_values(["series", "bits"], ascending=[True, False]).reset_index(drop=True)
    if d["bits"].nunique() < 2:
        raise Skip(f"INT-N merges at {d['bits'].iloc[0]} bits only (a bits axis needs two widths: experiment=qalora_table1)")
    ref = study[study["strategy.merge"] == "16bit"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    for title, g in d.groupby("series", sort=False):
        c = strategy_colour(g["strategy"].iloc[0])
        ax.errorbar(g["bits"], g["accuracy"], yerr=g["accuracy_std"].where(g["seeds"] > 1), fmt="o-", color=c,
                    capsize=3, label=f"{title} (n={g['seeds'].min()})")
        if g["size_mb"].notna().any():
            ax2.plot(g["bits"], g["size_mb"], "s:", color=c, alpha=0.7, label=f"{title}: size")
    data = {"series": d}
    if "merged/model_bytes_16bit" in study.columns and study["merged/model_bytes_16bit"].notna().any():
        full16 = study["merged/model_bytes_16bit"].mean() * MB  # the same model held in 16 bits, for scale
        ax2.axhline(full16, color="0.4", ls=":", lw=1, label="16-bit model: size")
        data["size_16bit_mb"] = pd.DataFrame({"size_mb": [full16]})
    if not ref.empty:
        ra = aggregate(ref, [acc, "merged/model_bytes_16bit"])
        m, s, n = ra[f"{acc}:mean"].iloc[0] * 100, ra[f"{acc}:std"].iloc[0] * 100, int(ra["seeds"].iloc[0])
        ax.axhline(m, color="k", ls="--", lw=1, label=f"QLoRA merged, 16-bit (n={n})")
        if pd.notna(s):
            ax.axhspan(m - s, m + s, color="k", alpha=0.08)
        data["reference"] = pd.DataFrame({"accuracy": [m], "accuracy_std": [s], "seeds": [n]})
    ax.set_xticks([4, 3, 2])
    ax.set_xlim(4.4, 1.6)
    ax.set_ylim(0, max(d["accuracy"].max(), data["reference"]["accuracy"].iloc[0] if "reference" in data else 0) * 1.25 + 1)
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.1)
    ax.set_xlabel("bits of the merged model (INT-N, g=32)")
    ax.set_ylabel(METRICS[acc].label)
    ax2.set_ylabel(f"{METRICS[size].label} (dotted)")
    h1, n1 = ax.get_legend_handles_labels()
    h2, n2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, n1 + n2, fontsize=7, loc="lower left", framealpha=0.9)
    ax.grid(alpha=0.3)
    agg_all = aggregate(study, [acc])
    return Drawn(fig, data, caption("QA-LoRA Table 1 in miniature: exact match of the merged model vs bits",
                                    name, study, agg_all))


def accuracy_memory_vs_rank(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """e: exact match and measured memory vs adapter rank, one line per strategy; a strategy
    without a rank (full fine-tuning) is the reference: a horizontal line with its ± std band."""
    need(study, ACC, MEM)
    if "strategy.rank" not in study.columns:
        raise Skip("no run has a strategy.rank")
    agg = aggregate(study, [ACC, MEM])
    if "strategy.rank" not in agg.columns or len(agg) != len(agg[["strategy", "strategy.rank"]].drop_duplicates()):
        raise Skip("strategy.rank does not vary, or more than strategy and rank vary")
    d = agg[["label", "strategy", "strategy.rank", "seeds"]].rename(columns={"strategy.rank": "rank"}).copy()
    d["accuracy"], d["accuracy_std"] = agg[f"{ACC}:mean"] * 100, agg[f"{ACC}:std"] * 100
    d["memory_mb"], d["memory_std"] = agg[f"{MEM}:mean"] * MB, agg[f"{MEM}:std"] * MB
    ref = d[d["rank"].isna()].drop(columns="rank").reset_index(drop=True)
    d = d.dropna(subset=["rank"]).astype({"rank": int}).sort_values(["strategy", "rank"]).reset_index(drop=True)
    if d.empty or d.groupby("strategy")["rank"].nunique().max() < 2:
        raise Skip("strategy.rank does not vary within any strategy")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s, g in d.groupby("strategy", sort=True):
        c, n = strategy_colour(s), g["seeds"].min()
        name_ = s if len(g) > 1 else g["label"].iloc[0]  # a single point is named by its configuration
        axes[0].errorbar(g["rank"], g["accuracy"], yerr=g["accuracy_std"], fmt="o-", color=c, capsize=3, label=f"{name_} (n={n})")
        axes[1].errorbar(g["rank"], g["memory_mb"], yerr=g["memory_std"], fmt="o-", color=c, capsize=3, label=f"{name_} (n={n})")
    for _, r in ref.iterrows():  # no rank: the same value at every r
        c, lab = strategy_colour(r["strategy"]), f"{r['label']} (n={r['seeds']})"
        for ax, col in zip(axes, ("accuracy", "memory")):
            mean, std = r[col if col == "accuracy" else "memory_mb"], r[f"{col}_std"]
            ax.axhline(mean, color=c, ls="--", lw=1.2, label=lab)
            if not pd.isna(std):
                ax.axhspan(mean - std, mean + std, color=c, alpha=0.15, lw=0)
    for ax, m in zip(axes, (ACC, MEM)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapter rank r (α fixed)")
        ax.set_ylabel(METRICS[m].label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Drawn(fig, {"lines": d, "reference": ref}, caption("Exact match and measured memory vs rank", name, study, agg))


def memory_scaling(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """f: measured bytes vs parameters held (N + M) per strategy, the seed formula as dashed lines."""
    need(study, MEM, "memory/formula_bytes", "params/base", "params/trainable")
    study = study.assign(**{"params/held": study["params/base"] + study["params/trainable"]})
    agg = aggregate(study, [MEM, "memory/formula_bytes", "params/held"])
    sizes = agg.groupby("strategy")["params/held:mean"].nunique()
    if (sizes < 2).all():
        raise Skip("the model size does not vary within a strategy (run experiment=memory_scaling)")
    d = pd.DataFrame({"strategy": agg["strategy"], "seeds": agg["seeds"], "params": agg["params/held:mean"],
                      "measured_mb": agg[f"{MEM}:mean"] * MB, "formula_mb": agg["memory/formula_bytes:mean"] * MB})
    d = d.sort_values(["strategy", "params"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s, g in d.groupby("strategy", sort=True):
        c = strategy_colour(s)
        ax.plot(g["params"], g["measured_mb"], "o-", color=c, label=f"{s} measured")
        ax.plot(g["params"], g["formula_mb"], "--", color=c, alpha=0.8, label=f"{s} formula")
    plain_log(ax, "x")
    plain_log(ax, "y")
    ax.set_xlabel("parameters held, N + M (log scale)")
    ax.set_ylabel("memory (MB, log scale)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return Drawn(fig, {"lines": d}, caption("Measured bytes (markers) vs the seed formula (dashed) as the model grows",
                                            name, study, agg))
