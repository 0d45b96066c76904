"""`lorabench-report <sweep dir(s) | wandb:entity/project[/group]> --out DIR`: every figure and
table the given runs support, from logged runs only (it never trains), identically every time.

Per study (one sweep on one task): a table (markdown + LaTeX) of every configuration, and the
figures a–g whose runs are there; a figure the runs do not support is skipped with one printed
line saying why. `index.md` shows every table and figure with a one-line caption naming the
runs and the seed counts; a study whose runs differ in library versions, harness commit, or
backbone weights (among runs with the same model keys) gets one warning line there, also
printed. Bad input (no runs, an unreachable W&B path) is one line, exit ≠ 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from lorabench.analysis import curves, figures
from lorabench.analysis.aggregate import METRICS, aggregate, grouping_columns, missing_counts, row_keys, studies
from lorabench.analysis.collect import RunSet, load
from lorabench.analysis.style import Drawn, Skip, save, seeds_text
from lorabench.analysis.tables import table_cells, to_latex, to_markdown
from lorabench.errors import ConfigError
from lorabench.provenance import LIBRARIES, PREFIX
from lorabench.utils import atomic_write_text

# (file stem, what it is, function): the figures of the issue, in its order a–g.
FIGURES: list[tuple[str, str, Callable[[str, pd.DataFrame, RunSet], Drawn]]] = [
    ("a_accuracy_vs_memory", "a: accuracy vs measured memory", figures.accuracy_vs_memory),
    ("b_memory_breakdown", "b: memory per configuration, stacked, with the seed formula", figures.memory_stack),
    ("c_qalora_bits", "c: QA-LoRA Table 1 (accuracy vs bits)", figures.qalora_bits),
    ("d_relora_perplexity", "d: ReLoRA perplexity, lr and merges", curves.relora_perplexity),
    ("e_rank", "e: accuracy and memory vs rank", figures.accuracy_memory_vs_rank),
    ("f_memory_scaling", "f: measured bytes vs N with the formula", figures.memory_scaling),
    ("g_training_curves", "g: training curves", curves.training_curves),
]
# What runs compared in one study must share: the code and library versions that computed them,
# and, among runs with the same `model.*` keys, the backbone weights they started from.
SAME_IN_STUDY = tuple(PREFIX + k for k in ("lorabench_version", "git_commit", *LIBRARIES))
SAME_PER_MODEL = (PREFIX + "backbone_sha256", PREFIX + "backbone_revision")


def provenance_warning(name: str, study: pd.DataFrame) -> Optional[str]:
    """One line naming every provenance key whose values differ where they must agree, else None.

    Runs that lack a key (logged before it was recorded) are not counted as differing."""
    parts = []
    for key in SAME_IN_STUDY:
        values = sorted(study[key].dropna().astype(str).unique()) if key in study.columns else []
        if len(values) > 1:
            parts.append(f"{key} ({', '.join(v[:12] for v in values)})")  # commits and hashes: 12 hex digits
    models = row_keys(study, [c for c in grouping_columns(study) if c.startswith("model.")])
    for key in SAME_PER_MODEL:
        if key not in study.columns:
            continue
        mixed = [sorted(v.dropna().astype(str).unique()) for _, v in study[key].groupby(models)]
        values = sorted({v[:12] for vs in mixed if len(vs) > 1 for v in vs})
        if values:
            parts.append(f"{key} ({', '.join(values)}) among runs with the same model keys")
    return f"warning: {name}: runs grouped together differ in " + "; ".join(parts) if parts else None


def report_study(name: str, study: pd.DataFrame, runs: RunSet, out: Path) -> list[str]:
    """Write one study's table and figures; return its index.md section."""
    metrics = [m for m in METRICS if m in study.columns and study[m].notna().any()]
    agg = aggregate(study, metrics)
    for m, n in missing_counts(study, metrics).items():
        print(f"{name}: {m} missing in {n} of {len(study)} runs (those cells are empty or averaged over fewer runs)")
    table = table_cells(agg, metrics)
    cap = f"`{name}`: {len(study)} runs, {len(agg)} configurations, {seeds_text(agg)}; mean ± std over seeds, best per column in bold."
    atomic_write_text(out / f"{name}_table.md", to_markdown(table))
    atomic_write_text(out / f"{name}_table.tex", to_latex(table, cap.replace("`", "")))
    section = [f"## {name}", ""]
    warning = provenance_warning(name, study)
    if warning:
        print(warning)
        section += [f"**{warning}**", ""]
    section += [f"Table: {cap} ([LaTeX]({name}_table.tex))", "", to_markdown(table)]
    for stem, what, fn in FIGURES:
        try:
            drawn = fn(name, study, runs)
        except Skip as e:
            print(f"skip figure {what} for {name}: {e}")
            continue
        for note in drawn.notes:
            print(note)
        paths = save(drawn.fig, out, f"{name}_{stem}")
        print(f"wrote {paths[0]} (+ .pdf)")
        section += [f"![{what}]({paths[0].name})", "", f"*Figure {what}.* {drawn.caption} ([PDF]({paths[1].name}))", ""]
    return section


def run(sources: list[str], out: Path, api: Any = None) -> int:
    """Load, then write every study's table and figures and the index; the exit code."""
    t0 = time.perf_counter()
    runs = load(sources, api)
    if runs.runs.empty:
        raise ConfigError(f"{' '.join(sources)}: no completed runs ({runs.dropped} failed or incomplete)")
    print(f"{len(runs.runs)} completed runs from {' '.join(sources)}; {runs.dropped} failed or incomplete runs left out")
    out.mkdir(parents=True, exist_ok=True)
    index = ["# Report", "", f"Made by `lorabench-report {' '.join(sources)} --out {out}` from {len(runs.runs)} "
             f"completed runs ({runs.dropped} failed or incomplete left out).", ""]
    for name, study in studies(runs.runs).items():
        index += report_study(name, study, runs, out)
    atomic_write_text(out / "index.md", "\n".join(index) + "\n")
    print(f"wrote {out / 'index.md'} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="lorabench-report", description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="run or sweep dirs, or wandb:entity/project[/group]")
    ap.add_argument("--out", type=Path, default=Path("report"), help="where figures, tables and index.md go")
    args = ap.parse_args(argv)
    try:
        return run(args.sources, args.out)
    except ConfigError as e:
        print(f"lorabench-report: error: {e}", file=sys.stderr)
        return 2
