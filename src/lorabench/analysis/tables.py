"""Tables of a study: one row per configuration, mean ± std over seeds, best cell per column bold.

The cells are built once (`table_cells`) and written twice, as markdown and as LaTeX with
booktabs rules, so both show the same numbers in the same units as the figures (`METRICS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lorabench.analysis.aggregate import METRICS, mean_pm_std


@dataclass
class Table:
    """Header and body cells (text), and which body cells are bold."""

    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]


def table_cells(agg: pd.DataFrame, metrics: list[str]) -> Table:
    """Rows: configuration label, seeds, then `mean ± std` per metric present in the study (a
    single seed shows the mean alone; a configuration without the metric shows an empty cell;
    fewer runs than seeds with the metric shows `(n=k)`). The best mean per column is bold."""
    present = [m for m in metrics if f"{m}:mean" in agg.columns and agg[f"{m}:mean"].notna().any()]
    header = ["configuration", "seeds", *(METRICS[m].label for m in present)]
    rows = [[str(r["label"]), str(int(r["seeds"]))] for _, r in agg.iterrows()]
    bold = [[False, False] for _ in rows]
    for m in present:
        spec = METRICS[m]
        means = agg[f"{m}:mean"] * spec.scale
        best = means.max() if spec.higher_better else means.min()
        for i, (_, r) in enumerate(agg.iterrows()):
            cell = mean_pm_std(r[f"{m}:mean"] * spec.scale, r[f"{m}:std"] * spec.scale, spec.fmt)
            if cell and int(r[f"{m}:n"]) < int(r["runs"]):
                cell += f" (n={int(r[f'{m}:n'])})"
            rows[i].append(cell)
            shown = spec.fmt.format(means.iloc[i]) if pd.notna(means.iloc[i]) else None
            bold[i].append(shown is not None and shown == spec.fmt.format(best))
    return Table(header, rows, bold)


def to_markdown(t: Table) -> str:
    """GitHub markdown; bold cells as **…**."""
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    for row, bold in zip(t.rows, t.bold):
        lines.append("| " + " | ".join(f"**{c}**" if b and c else c for c, b in zip(row, bold)) + " |")
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    """The characters LaTeX treats specially, escaped one by one; ± as $\\pm$."""
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(t: Table, caption: str = "") -> str:
    """A booktabs `tabular` (\\toprule, \\midrule, \\bottomrule); bold cells as \\textbf{…}."""
    cols = "l" + "r" * (len(t.header) - 1)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(latex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    for row, bold in zip(t.rows, t.bold):
        cells = [rf"\textbf{{{latex_escape(c)}}}" if b and c else latex_escape(c) for c, b in zip(row, bold)]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{latex_escape(caption)}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"
