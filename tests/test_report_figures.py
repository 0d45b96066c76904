"""Each figure plots the expected aggregates: checked on the data it returns and on the
matplotlib artists it drew, from fixture run dirs with known numbers."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib.colors as mcolors
import numpy as np
import pytest

from lorabench.analysis import curves, figures
from lorabench.analysis.collect import load_local
from lorabench.analysis.style import Skip, strategy_colour
from tests.test_report_fixtures import make_run

MB = 1e6


def compare(tmp_path: Path) -> tuple:
    """4 strategies × 2 seeds; peft_lora is dominated by lora (more memory, less accuracy)."""
    sweep = tmp_path / "cmp"
    known = {"qlora": ([0.4, 0.6], 3e6), "lora": ([0.5, 0.7], 10e6), "peft_lora": ([0.5, 0.6], 12e6), "full": ([0.9, 0.8], 40e6)}
    parts = {"qlora": (1.5e6, 0.5e6, 0.5e6, 1.0e6), "lora": (8e6, 0.5e6, 0.5e6, 1.0e6),
             "peft_lora": (10e6, 0.5e6, 0.5e6, 1.0e6), "full": (0.0, 10e6, 10e6, 20e6)}
    for s, (accs, mem) in known.items():
        for seed, acc in enumerate(accs):
            base, trainable, grad, opt = parts[s]
            hist = [{"step": k, "train/loss": 4.0 / k + seed, "train/wall_seconds": 2.0 * k + seed} for k in (1, 2, 3)]
            make_run(sweep, f"{s}_s{seed}", strategy=s, seed=seed, history=hist, summary={
                "eval/accuracy": acc, "memory/measured_bytes": mem, "memory/formula_bytes": mem * 0.9,
                "memory/measured_base_bytes": base, "memory/measured_trainable_bytes": trainable,
                "memory/measured_grad_bytes": grad, "memory/measured_optimizer_bytes": opt,
                "memory/activation_bytes": 50e6 + seed})
    rs = load_local([sweep])
    return rs.runs, rs


def test_a_accuracy_vs_memory_points_and_pareto_front(tmp_path: Path) -> None:
    df, rs = compare(tmp_path)
    drawn = figures.accuracy_vs_memory("cmp", df, rs)
    d = drawn.data["points"].set_index("strategy")
    assert d.loc["lora", "accuracy"] == pytest.approx(60.0) and d.loc["lora", "accuracy_std"] == pytest.approx(100 * statistics.stdev([0.5, 0.7]))
    assert d.loc["full", "memory_mb"] == pytest.approx(40.0) and d.loc["qlora", "memory_mb"] == pytest.approx(3.0)
    assert d["pareto"].to_dict() == {"qlora": True, "lora": True, "peft_lora": False, "full": True}
    ax = drawn.fig.axes[0]
    drawn_points = {c.get_label(): tuple(c.lines[0].get_xydata()[0]) for c in ax.containers}
    assert drawn_points["lora (n=2)"] == pytest.approx((10.0, 60.0))
    assert drawn_points["peft_lora (n=2)"] == pytest.approx((12.0, 55.0))
    front = next(ln for ln in ax.lines if ln.get_label() == "Pareto front")
    assert list(front.get_xdata()) == pytest.approx([3.0, 10.0, 40.0]) and list(front.get_ydata()) == pytest.approx([50.0, 60.0, 85.0])
    lora = next(c for c in ax.containers if c.get_label().startswith("lora"))
    assert lora.lines[0].get_color() == strategy_colour("lora")  # one colour per strategy
    assert "8 runs of `cmp`" in drawn.caption and "2 seeds each" in drawn.caption


def test_a_and_b_draw_several_configurations_of_one_strategy_apart(tmp_path: Path) -> None:
    """QLoRA's Table 4 cells: lora and three qlora base formats, one point / bar each; the qlora
    points share qlora's colour and differ in marker; nine configurations are too many."""
    sweep = tmp_path / "nf4"
    cells = {"lora": ("lora", None, 0.8, 540e6), "nf4_dq": ("qlora", "nf4", 0.7, 190e6),
             "nf4": ("qlora", "nf4", 0.75, 195e6), "fp4": ("qlora", "fp4", 0.5, 190e6)}
    for cell, (s, quant, acc, mem) in cells.items():
        for seed in (0, 1):
            make_run(sweep, f"{cell}_s{seed}", strategy=s, seed=seed,
                     overrides=[f"+experiment/qlora_nf4@_global_={cell}", f"seed={seed}"],
                     config={"strategy.quant_type": quant, "strategy.double_quant": cell != "nf4"},
                     summary={"eval/accuracy": acc + 0.02 * seed, "memory/measured_bytes": mem,
                              "memory/formula_bytes": mem, "memory/measured_base_bytes": mem - 3e6,
                              "memory/measured_trainable_bytes": 1e6, "memory/measured_grad_bytes": 1e6,
                              "memory/measured_optimizer_bytes": 1e6})
    rs = load_local([sweep])
    drawn = figures.accuracy_vs_memory("nf4", rs.runs, rs)
    d = drawn.data["points"].set_index("label")
    assert sorted(d.index) == ["fp4", "lora", "nf4", "nf4_dq"]
    assert d.loc["nf4", "accuracy"] == pytest.approx(76.0) and d.loc["fp4", "memory_mb"] == pytest.approx(190.0)
    assert d["pareto"].to_dict() == {"lora": True, "nf4_dq": True, "nf4": True, "fp4": False}  # fp4: nf4_dq beats it at 190 MB
    ax = drawn.fig.axes[0]
    styles = {c.get_label().split(" (")[0]: (mcolors.to_hex(c.lines[0].get_color()), c.lines[0].get_marker())
              for c in ax.containers}
    assert {v[0] for k, v in styles.items() if k != "lora"} == {mcolors.to_hex(strategy_colour("qlora"))}
    assert len({v for k, v in styles.items() if k != "lora"}) == 3  # same colour, three markers
    bars = figures.memory_stack("nf4", rs.runs, rs).data["bars"].set_index("label")
    assert bars.loc["fp4", "base"] == pytest.approx(187.0) and len(bars) == 4
    for k in range(5):  # 9 configurations in all
        make_run(sweep, f"extra{k}_s0", strategy="lora", seed=0, overrides=[f"strategy.rank={k + 1}", "seed=0"],
                 config={"strategy.rank": k + 1}, summary={"eval/accuracy": 0.1, "memory/measured_bytes": 1e6})
    rs = load_local([sweep])
    with pytest.raises(Skip, match=r"^9 configurations, more than the 8 points"):
        figures.accuracy_vs_memory("nf4", rs.runs, rs)


def test_b_memory_stack_heights_and_formula_markers(tmp_path: Path) -> None:
    df, rs = compare(tmp_path)
    drawn = figures.memory_stack("cmp", df, rs)
    d = drawn.data["bars"].set_index("strategy")
    assert d.loc["full", ["base", "trainable", "grad", "optimizer"]].tolist() == pytest.approx([0.0, 10.0, 10.0, 20.0])
    assert d.loc["lora", "activation"] == pytest.approx(50.0000005)  # mean of 50e6 and 50e6 + 1 bytes
    assert d.loc["qlora", "formula"] == pytest.approx(2.7)
    left, right = drawn.fig.axes
    heights = [p.get_height() for p in left.patches]  # part by part, strategies in order within a part
    order = drawn.data["bars"]["strategy"].tolist()
    n = len(order)
    for k, part in enumerate(["base", "trainable", "grad", "optimizer"]):
        assert heights[k * n:(k + 1) * n] == pytest.approx(drawn.data["bars"][part].tolist())
    tops = [p.get_y() + p.get_height() for p in right.patches[-n:]]  # the activation segment ends the stack
    assert tops == pytest.approx((drawn.data["bars"][["base", "trainable", "grad", "optimizer", "activation"]].sum(axis=1)).tolist())
    marks = left.collections[0].get_offsets()
    assert list(marks[:, 1]) == pytest.approx(drawn.data["bars"]["formula"].tolist())


def test_c_qalora_bits_series_reference_and_size(tmp_path: Path) -> None:
    sweep = tmp_path / "qt1"
    cells = {("qalora", "zeros", 4): 0.40, ("qalora", "zeros", 2): 0.30, ("qlora", "intn", 4): 0.35,
             ("qlora", "intn", 2): 0.05, ("qlora", "16bit", 4): 0.42}
    for (s, merge, bits), acc in cells.items():
        for seed in (0, 1):
            cfg = {"strategy.merge": merge, "strategy.bits": bits if s == "qalora" else None, "strategy.merge_bits": bits}
            summary = {"eval/accuracy": acc, "eval/accuracy_merged": acc + 0.02 * seed}
            if merge != "16bit":
                summary["merged/model_bytes"] = bits * 1e6
                summary["merged/model_bytes_16bit"] = 16e6
            make_run(sweep, f"{s}_{merge}{bits}_s{seed}", strategy=s, seed=seed, config=cfg, summary=summary,
                     overrides=[f"+experiment/qalora_table1={s}_{merge}{bits}", f"seed={seed}"])
    rs = load_local([sweep])
    drawn = figures.qalora_bits("qt1", rs.runs, rs)
    d = drawn.data["series"]
    qa = d[d["strategy"] == "qalora"]
    assert qa["bits"].tolist() == [4, 2] and qa["accuracy"].tolist() == pytest.approx([41.0, 31.0])
    assert qa["accuracy_std"].tolist() == pytest.approx([100 * statistics.stdev([0.40, 0.42])] * 2)
    assert d[d["strategy"] == "qlora"]["accuracy"].tolist() == pytest.approx([36.0, 6.0])
    assert qa["size_mb"].tolist() == pytest.approx([4.0, 2.0])
    assert drawn.data["reference"]["accuracy"].iloc[0] == pytest.approx(43.0)
    ax, ax2 = drawn.fig.axes
    ys = {c.get_label(): list(c.lines[0].get_ydata()) for c in ax.containers}
    assert ys["QA-LoRA merged (INT-N, RTN) (n=2)"] == pytest.approx([41.0, 31.0])
    assert "QLoRA merged → INT-N (RTN) (n=2)" in ys
    ref = next(ln for ln in ax.lines if ln.get_label().startswith("QLoRA merged, 16-bit"))
    assert ref.get_ydata()[0] == pytest.approx(43.0)
    assert list(ax2.lines[0].get_ydata()) == pytest.approx([4.0, 2.0])
    assert drawn.data["size_16bit_mb"]["size_mb"].iloc[0] == pytest.approx(16.0)
    assert ax2.lines[-1].get_ydata()[0] == pytest.approx(16.0)
    hqq = rs.runs.assign(**{"strategy.quantizer": "hqq", "strategy.merge_quantizer": "hqq"})  # HQQ codes: named so
    assert {c.get_label() for c in figures.qalora_bits("qt1", hqq, rs).fig.axes[0].containers} == {
        "QA-LoRA merged (INT-N, HQQ) (n=2)", "QLoRA merged → INT-N (HQQ) (n=2)"}
    four = rs.runs[rs.runs["strategy.merge_bits"] == 4]  # one width: no bits axis
    with pytest.raises(Skip, match="INT-N merges at 4 bits only"):
        figures.qalora_bits("qt1", four, rs)


def test_d_relora_perplexity_lr_and_merges(tmp_path: Path) -> None:
    sweep = tmp_path / "rt2"
    for cell, strategy, reset in (("full", "full", None), ("relora", "relora", 2)):
        for seed in (0, 1):
            hist = [{"step": k, "eval/perplexity": (10.0 if cell == "full" else 20.0) / (k + 1) + seed} for k in (0, 2, 4, 6, 8)]
            hist += [{"step": k, "train/lr": 0.1 * (k % 2 + 1)} for k in range(1, 7)]
            if reset:
                hist += [{"step": k, "relora/merges": float(k // 2)} for k in (2, 4, 6)]
            make_run(sweep, f"{cell}_s{seed}", strategy=strategy, seed=seed, history=hist,
                     config={"strategy.reset_every": reset}, summary={"eval/perplexity": 1.0},
                     overrides=[f"+experiment/relora_table2@_global_={cell}", f"seed={seed}"])
    rs = load_local([sweep])
    drawn = curves.relora_perplexity("rt2", rs.runs, rs)
    ppl = drawn.data["perplexity"]
    rel = ppl[ppl["label"] == "relora"]
    assert rel["x"].tolist() == [0, 2, 4, 6, 8]
    assert rel["mean"].tolist() == pytest.approx([20.5, 20 / 3 + 0.5, 4.5, 20 / 7 + 0.5, 20 / 9 + 0.5])
    assert rel["std"].tolist() == pytest.approx([statistics.stdev([0, 1])] * 5)
    assert drawn.data["merges"].to_dict("list") == {"label": ["relora"] * 3, "step": [2, 4, 6]}
    lr = drawn.data["lr"]
    assert lr[lr["label"] == "full"]["train/lr"].tolist() == pytest.approx([0.2, 0.1, 0.2, 0.1, 0.2, 0.1])
    top, bottom = drawn.fig.axes
    line = next(ln for ln in top.lines if ln.get_label() == "relora (n=2)")
    assert list(line.get_ydata()) == pytest.approx(rel["mean"].tolist())
    assert sorted(ln.get_xdata()[0] for ln in bottom.lines if ln.get_linestyle() == ":") == [2, 4, 6]
    rs.history_of = lambda rid, read=rs.history_of: read(rid).query("step != 8")  # 4 evaluations: no curve
    with pytest.raises(Skip, match="eval/perplexity was logged at fewer than 5 steps"):
        curves.relora_perplexity("rt2", rs.runs, rs)


def test_e_accuracy_and_memory_vs_rank(tmp_path: Path) -> None:
    sweep = tmp_path / "rank"
    for s in ("lora", "qlora"):
        for rank in (4, 16):
            for seed in (0, 1):
                make_run(sweep, f"{s}_r{rank}_s{seed}", strategy=s, seed=seed, config={"strategy.rank": rank},
                         summary={"eval/accuracy": rank / 100 + seed / 10, "memory/measured_bytes": rank * 1e6 + (s == "qlora")},
                         overrides=[f"strategy={s}", f"strategy.rank={rank}", f"seed={seed}"])
    rs = load_local([sweep])
    drawn = figures.accuracy_memory_vs_rank("rank", rs.runs, rs)
    d = drawn.data["lines"]
    lora = d[d["strategy"] == "lora"]
    assert lora["rank"].tolist() == [4, 16] and lora["accuracy"].tolist() == pytest.approx([9.0, 21.0])
    assert lora["memory_mb"].tolist() == pytest.approx([4.0, 16.0])
    acc_ax, mem_ax = drawn.fig.axes
    ys = {c.get_label(): list(c.lines[0].get_ydata()) for c in acc_ax.containers}
    assert ys["lora (n=2)"] == pytest.approx([9.0, 21.0])
    assert drawn.data["reference"].empty and not acc_ax.patches
    with pytest.raises(Skip, match="strategy.rank does not vary"):
        df, rs2 = compare(tmp_path)
        figures.accuracy_memory_vs_rank("cmp", df, rs2)


def test_e_full_fine_tuning_is_the_reference_band(tmp_path: Path) -> None:
    """A strategy without a rank (full) is drawn as a horizontal line at its mean with a ± std band."""
    sweep = tmp_path / "lvf"
    for cell, s, rank, accs in (("full", "full", None, (0.50, 0.40)), ("lora_r1", "lora", 1, (0.1, 0.2)),
                                ("lora_r4", "lora", 4, (0.3, 0.3)), ("lora_r4_embed", "relora", 4, (0.6, 0.6))):
        for seed, acc in enumerate(accs):
            make_run(sweep, f"{cell}_s{seed}", strategy=s, seed=seed, config={"strategy.rank": rank},
                     summary={"eval/accuracy": acc, "memory/measured_bytes": 40e6 if rank is None else rank * 1e6},
                     overrides=[f"+experiment/lora_vs_full@_global_={cell}", f"seed={seed}"])
    rs = load_local([sweep])
    drawn = figures.accuracy_memory_vs_rank("lvf", rs.runs, rs)
    ref = drawn.data["reference"]
    assert ref["strategy"].tolist() == ["full"] and ref["accuracy"].tolist() == pytest.approx([45.0])
    assert ref["accuracy_std"].tolist() == pytest.approx([100 * statistics.stdev([0.5, 0.4])])
    assert drawn.data["lines"]["accuracy"].tolist() == pytest.approx([15.0, 30.0, 60.0])
    acc_ax, mem_ax = drawn.fig.axes
    ys = {c.get_label(): list(c.lines[0].get_ydata()) for c in acc_ax.containers}
    assert ys == {"lora (n=2)": pytest.approx([15.0, 30.0]), "lora_r4_embed (n=2)": pytest.approx([60.0])}  # one point: its cell's name
    line = next(ln for ln in acc_ax.lines if ln.get_label() == "full (n=2)")
    assert list(line.get_ydata()) == pytest.approx([45.0, 45.0])
    band = acc_ax.patches[0]  # axhspan: a rectangle from mean - std to mean + std
    sd = 100 * statistics.stdev([0.5, 0.4])
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((45.0 - sd, 45.0 + sd))
    assert next(ln for ln in mem_ax.lines if ln.get_label() == "full (n=2)").get_ydata()[0] == pytest.approx(40.0)


def test_f_memory_scaling_measured_and_formula(tmp_path: Path) -> None:
    sweep = tmp_path / "ms"
    for s in ("lora", "full"):
        for hidden, n in ((128, 1_000_000), (256, 4_000_000)):
            base, m = (n, n // 100) if s == "lora" else (0, n)
            make_run(sweep, f"{s}_h{hidden}", strategy=s, seed=0, config={"model.hidden_size": hidden},
                     summary={"params/base": base, "params/trainable": m, "memory/measured_bytes": 4 * base + 16 * m + 100,
                              "memory/formula_bytes": 4 * base + 16 * m},
                     overrides=[f"strategy={s}", f"model.hidden_size={hidden}"])
    rs = load_local([sweep])
    drawn = figures.memory_scaling("ms", rs.runs, rs)
    d = drawn.data["lines"]
    lora = d[d["strategy"] == "lora"]
    assert lora["params"].tolist() == [1_010_000, 4_040_000]
    assert lora["measured_mb"].tolist() == pytest.approx([4.1601, 16.6401])
    assert lora["formula_mb"].tolist() == pytest.approx([4.16, 16.64])
    ax = drawn.fig.axes[0]
    full_measured = next(ln for ln in ax.lines if ln.get_label() == "full measured")
    assert list(full_measured.get_ydata()) == pytest.approx([16.0001, 64.0001])


def test_g_training_curves_by_step_and_wall_time(tmp_path: Path) -> None:
    df, rs = compare(tmp_path)
    drawn = curves.training_curves("cmp", df, rs)
    by_step, by_time = drawn.data["by_step"], drawn.data["by_time"]
    lora = by_step[by_step["label"] == "lora"]
    assert lora["x"].tolist() == [1, 2, 3]
    assert lora["mean"].tolist() == pytest.approx([4.5, 2.5, 4 / 3 + 0.5])  # seeds 0 and 1: loss 4/k + seed
    t = by_time[by_time["label"] == "lora"]
    assert t["x"].tolist() == pytest.approx([2.5, 4.5, 6.5])  # mean wall time over the seeds
    step_ax, time_ax = drawn.fig.axes
    line = next(ln for ln in step_ax.lines if ln.get_label() == "lora (n=2)")
    assert np.allclose(line.get_ydata(), lora["mean"])
    assert mcolors.to_rgb(line.get_color()) == mcolors.to_rgb(strategy_colour("lora"))
    assert np.allclose(time_ax.lines[1].get_xdata(), by_time[by_time["label"] == by_step["label"].unique()[1]]["x"])


def test_figures_skip_what_the_runs_do_not_support(tmp_path: Path) -> None:
    df, rs = compare(tmp_path)
    for fn, why in ((figures.qalora_bits, "no run logged eval/accuracy_merged"), (curves.relora_perplexity, "no ReLoRA runs"),
                    (figures.memory_scaling, "no run logged params/base")):
        with pytest.raises(Skip, match=why):
            fn("cmp", df, rs)
