"""Figures from per-step history (read on demand): d ReLoRA's perplexity with the jagged lr and
its merges, g training curves vs step and vs wall time. Seeds are averaged step by step
(a band of ± std where there are two or more); the data each figure plots is returned with it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from lorabench.analysis.aggregate import aggregate, grouping_columns, labels
from lorabench.analysis.collect import RunSet
from lorabench.analysis.style import Drawn, Skip, caption, plain_log, styles

MAX_CURVES = 12  # more configurations than this on one axis are unreadable
MIN_EVALS = 5  # evaluations per run that make a perplexity curve (before, after and a mid-run one do not)


def configurations(study: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The study's configurations (aggregate rows) and, per label, the run ids it averages."""
    agg = aggregate(study, [])
    lab = labels(study, grouping_columns(study))
    return agg, {label: study.loc[lab == label, "run"].tolist() for label in agg["label"]}


def mean_curve(hist: pd.DataFrame, key: str, x: str = "step") -> pd.DataFrame:
    """Per step: mean and sample std of `key` over the runs (std NaN where one run has it), the
    mean of `x` (the step itself, or the elapsed wall time), and how many runs were averaged."""
    h = hist.dropna(subset=[key])
    g = h.groupby("step")
    out = pd.DataFrame({"x": g[x].mean() if x != "step" else g["step"].first(), "mean": g[key].mean(),
                        "std": g[key].std(ddof=1), "n": g[key].count()}).reset_index()
    return out


def band(ax: plt.Axes, c: pd.DataFrame, colour: object, ls: str, label: str) -> None:
    ax.plot(c["x"], c["mean"], color=colour, ls=ls, label=label)
    spread = c.dropna(subset=["std"])
    if len(spread):
        ax.fill_between(spread["x"], spread["mean"] - spread["std"], spread["mean"] + spread["std"], color=colour, alpha=0.15)


def merge_steps(hist: pd.DataFrame) -> list[int]:
    """Steps where a ReLoRA merge happened (`relora/merges` rose), from one run's history."""
    if "relora/merges" not in hist.columns:
        return []
    m = hist.dropna(subset=["relora/merges"]).sort_values("step")
    prev = m["relora/merges"].shift(fill_value=0)
    return m.loc[m["relora/merges"] > prev, "step"].astype(int).tolist()


def relora_perplexity(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """d: eval perplexity vs step per configuration, the lr schedule beneath on a shared x axis,
    merges marked as vertical lines."""
    if "strategy.name" not in study.columns or not (study["strategy.name"] == "relora").any():
        raise Skip("no ReLoRA runs")
    agg, members = configurations(study)
    hist = runs.history(study["run"].tolist(), ["eval/perplexity", "train/lr", "relora/merges"])
    if "eval/perplexity" not in hist.columns or hist.groupby("run")["eval/perplexity"].count().max() < MIN_EVALS:
        raise Skip(f"eval/perplexity was logged at fewer than {MIN_EVALS} steps (a curve needs trainer.eval_every)")
    if "train/lr" not in hist.columns:
        raise Skip("no train/lr in the runs' history")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    ppl, lrs, merges = [], [], []
    for (_, r), (colour, ls) in zip(agg.iterrows(), styles(agg)):
        h = hist[hist["run"].isin(members[r["label"]])]
        c = mean_curve(h, "eval/perplexity").assign(label=r["label"], seeds=r["seeds"])
        band(top, c, colour, ls, f"{r['label']} (n={r['seeds']})")
        first = h[h["run"] == members[r["label"]][0]]  # the schedule is the same for every seed
        lr = first.dropna(subset=["train/lr"])[["step", "train/lr"]].assign(label=r["label"])
        bottom.plot(lr["step"], lr["train/lr"], color=colour, ls=ls, lw=1)
        for s in merge_steps(first):
            for ax in (top, bottom):
                ax.axvline(s, color=colour, ls=":", lw=0.8, alpha=0.7)
            merges.append({"label": r["label"], "step": s})
        ppl.append(c)
        lrs.append(lr)
    plain_log(top, "y")
    top.set_ylabel("eval perplexity (log scale)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step (dotted verticals: merges)")
    bottom.grid(alpha=0.3)
    data = {"perplexity": pd.concat(ppl, ignore_index=True), "lr": pd.concat(lrs, ignore_index=True),
            "merges": pd.DataFrame(merges, columns=["label", "step"])}
    return Drawn(fig, data, caption("ReLoRA Table 2 in miniature: eval perplexity vs step, lr beneath, merges dotted",
                                    name, study, agg))


def training_curves(name: str, study: pd.DataFrame, runs: RunSet) -> Drawn:
    """g: train loss vs step and vs elapsed wall time, one curve per configuration."""
    agg, members = configurations(study)
    if len(agg) > MAX_CURVES:
        raise Skip(f"{len(agg)} configurations (more than {MAX_CURVES} curves on one axis)")
    hist = runs.history(study["run"].tolist(), ["train/loss", "train/wall_seconds"])
    if "train/loss" not in hist.columns or hist.empty:
        raise Skip("no train/loss in the runs' history")
    timed = "train/wall_seconds" in hist.columns and hist["train/wall_seconds"].notna().any()
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6.4, 4), squeeze=False, sharey=True)
    by_step, by_time = [], []
    for (_, r), (colour, ls) in zip(agg.iterrows(), styles(agg)):
        h = hist[hist["run"].isin(members[r["label"]])]
        c = mean_curve(h, "train/loss").assign(label=r["label"], seeds=r["seeds"])
        band(axes[0, 0], c, colour, ls, f"{r['label']} (n={r['seeds']})")
        by_step.append(c)
        if timed:
            t = mean_curve(h.dropna(subset=["train/wall_seconds"]), "train/loss", x="train/wall_seconds")
            band(axes[0, 1], t, colour, ls, r["label"])
            by_time.append(t.assign(label=r["label"]))
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("train loss (log scale)")
    for ax in axes[0]:
        plain_log(ax, "y")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    data = {"by_step": pd.concat(by_step, ignore_index=True)}
    notes = []
    if timed:
        axes[0, 1].set_xlabel("wall time (s, mean over seeds; evaluations included)")
        data["by_time"] = pd.concat(by_time, ignore_index=True)
    else:
        notes.append(f"{name}: no train/wall_seconds in the history: loss vs wall time left out")
    drawn = Drawn(fig, data, caption("Training loss vs step" + (" and vs wall time" if timed else ""), name, study, agg))
    drawn.notes = notes
    return drawn

