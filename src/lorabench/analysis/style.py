"""What every figure shares: one colour per strategy, the figure result type, atomic PNG + PDF.

Colours are fixed per strategy name (not per figure), so lora is the same orange in every
figure; configurations of one strategy (ReLoRA's cells) get shades and line styles of its colour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
import pandas as pd  # noqa: E402

STRATEGY_COLOURS = {"full": "tab:blue", "lora": "tab:orange", "qlora": "tab:green", "qalora": "tab:red",
                    "relora": "tab:purple", "peft_lora": "tab:brown", "peft_qlora": "tab:pink"}
SPARE_COLOURS = ["tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal"]  # strategies from other packages
LINESTYLES = ["-", "--", ":", "-."]
FORMATS = ("png", "pdf")  # PNG for looking, PDF for papers


class Skip(Exception):
    """The runs do not support this figure; the message says why (printed, never an error)."""


@dataclass
class Drawn:
    """A finished figure, the data it plots (what the tests compare) and its one-line caption."""

    fig: plt.Figure
    data: dict[str, pd.DataFrame]
    caption: str
    notes: list[str] = field(default_factory=list)  # printed lines about parts left out


def strategy_colour(strategy: str) -> str:
    """The strategy's colour in every figure (unknown names: a spare colour chosen by the name)."""
    if strategy in STRATEGY_COLOURS:
        return STRATEGY_COLOURS[strategy]
    return SPARE_COLOURS[sum(map(ord, strategy)) % len(SPARE_COLOURS)]


def shade(colour: str, k: int, n: int) -> tuple[float, float, float]:
    """The k-th of n shades of `colour` (k = 0 is the colour itself; then lighter and darker)."""
    rgb = mcolors.to_rgb(colour)
    if n <= 1 or k == 0:
        return rgb
    t = [0.0, 0.45, -0.35, 0.25, -0.2, 0.6][k % 6]
    return tuple(c + (1 - c) * t if t > 0 else c * (1 + t) for c in rgb)  # type: ignore[return-value]


def styles(agg: pd.DataFrame) -> list[tuple[tuple[float, float, float], str]]:
    """(colour, line style) per configuration row: its strategy's colour, shaded apart when a
    strategy has several configurations."""
    out, seen = [], {}
    counts = agg["strategy"].value_counts()
    for s in agg["strategy"]:
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.append((shade(strategy_colour(str(s)), k, int(counts[s])), LINESTYLES[k % len(LINESTYLES)]))
    return out


def seeds_text(agg: pd.DataFrame) -> str:
    """'3 seeds each' or '1–3 seeds' (distinct seeds per configuration)."""
    lo, hi = int(agg["seeds"].min()), int(agg["seeds"].max())
    return f"{hi} seed{'s' if hi > 1 else ''} each" if lo == hi else f"{lo}–{hi} seeds"


def caption(what: str, study: str, study_df: pd.DataFrame, agg: pd.DataFrame) -> str:
    """One line: what the figure shows, which runs, how many seeds."""
    return f"{what}: {len(study_df)} runs of `{study}`, {len(agg)} configurations, {seeds_text(agg)} (mean ± std over seeds)."


def err(std: float) -> float | None:
    """An error bar only where there is a spread to show (one seed, or identical seeds: no bar, not a zero bar)."""
    return None if pd.isna(std) or std == 0 else float(std)


def plain_log(ax: plt.Axes, which: str = "y") -> None:
    """A log axis labelled with plain numbers (0.5, 1, 2, 20) instead of 2×10^1."""
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))  # 2, 3, 5 × 10^k


def save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    """`name`.png and .pdf, each written to a temp file and renamed; no timestamps in the PDF."""
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        tmp = path.with_name(f".{path.name}.tmp")
        meta = {"CreationDate": None} if fmt == "pdf" else {}
        fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight", metadata=meta)
        os.replace(tmp, path)
        paths.append(path)
    plt.close(fig)
    return paths
