"""A peak per phase: load (building and quantizing the backbone), train, merge. A known
allocation made while loading shows in the load peak and not in the training peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorabench import memory
from tests.helpers import run_tiny

BIG = 256 * 2**20  # bytes the fake load phase allocates (touched, so resident) and frees


def test_phase_peaks_name_the_phase_and_report_no_reserved_bytes_on_cpu() -> None:
    if not memory.reset_peak("cpu"):
        assert memory.phase_peaks("cpu", "load") == {"memory/peak_load_bytes": None}
        pytest.skip("the process peak RSS cannot be reset here")
    low = memory.phase_peaks("cpu", "load")["memory/peak_load_bytes"]
    t = torch.ones(BIG // 4)
    got = {phase: memory.phase_peaks("cpu", phase) for phase in ("load", "train", "merge")}
    del t
    assert list(got["load"]) == ["memory/peak_load_bytes"]  # RSS counts the allocator's cache: no reserved key
    assert list(got["train"]) == ["memory/peak_bytes"] and list(got["merge"]) == ["memory/peak_merge_bytes"]
    assert got["train"]["memory/peak_bytes"] >= low + BIG * 3 // 4
    assert memory.peak_reserved_bytes("cpu") is None


@pytest.mark.slow
def test_a_load_phase_allocation_is_in_the_load_peak_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not memory.reset_peak("cpu"):
        pytest.skip("the process peak RSS cannot be reset here")
    from lorabench.training import job

    real_load = job.load_backbone

    def load_with_a_spike(*args, **kw):  # noqa: ANN002, ANN003
        spike = torch.ones(BIG // 4)  # 256 MiB resident during loading, freed before training
        del spike
        return real_load(*args, **kw)

    monkeypatch.setattr(job, "load_backbone", load_with_a_spike)
    spiked = run_tiny(tmp_path / "spike", "strategy=qlora", "trainer.threads=1")
    monkeypatch.setattr(job, "load_backbone", real_load)
    plain = run_tiny(tmp_path / "plain", "strategy=qlora", "trainer.threads=1")
    for s in (spiked, plain):
        assert {"memory/peak_load_bytes", "memory/peak_bytes"} <= set(s)
        assert ("memory/peak_merge_bytes" in s) == ("eval/loss_merged" in s)
    # the spike lifts the load peak by its size (RSS before the job is at least the plain job's)...
    assert spiked["memory/peak_load_bytes"] >= BIG * 3 // 4 + min(plain["memory/peak_load_bytes"], spiked["memory/peak_bytes"])
    # ...and not the training peak, reset after wrapping: a tiny job trains in far less than 256 MiB
    assert spiked["memory/peak_bytes"] < spiked["memory/peak_load_bytes"] - BIG // 2
    assert abs(spiked["memory/peak_bytes"] - plain["memory/peak_bytes"]) < BIG // 4


def test_figure_b_names_each_peak_by_its_phase(tmp_path: Path) -> None:
    """Fixture runs with known peaks: the third panel's bars are the per-phase means, labelled
    load / train / merge; a strategy without a merge has no merge bar; the report's table
    columns name the phase too."""
    import matplotlib

    matplotlib.use("Agg")
    from lorabench.analysis import figures
    from lorabench.analysis.aggregate import METRICS
    from lorabench.analysis.collect import load_local
    from tests.test_report_fixtures import make_run

    sweep = tmp_path / "peaks"
    peaks = {"lora": (700e6, 660e6, 720e6), "qlora": (300e6, 250e6, None)}  # load, train, merge (bytes)
    for s, (load, train, merge) in peaks.items():
        for seed in (0, 1):
            summary = {"eval/accuracy": 0.5, "memory/measured_bytes": 1e6, "memory/formula_bytes": 1e6,
                       "memory/measured_base_bytes": 1e6, "memory/measured_trainable_bytes": 0.0,
                       "memory/measured_grad_bytes": 0.0, "memory/measured_optimizer_bytes": 0.0,
                       "memory/peak_load_bytes": load + seed * 2e6, "memory/peak_bytes": train}
            if merge is not None:
                summary["memory/peak_merge_bytes"] = merge
            make_run(sweep, f"{s}_s{seed}", strategy=s, seed=seed, summary=summary)
    rs = load_local([sweep])
    drawn = figures.memory_stack("peaks", rs.runs, rs)
    d = drawn.data["bars"].set_index("strategy")
    assert d.loc["lora", ["peak_load", "peak_train", "peak_merge"]].tolist() == pytest.approx([701.0, 660.0, 720.0])
    assert d.loc["qlora", "peak_load"] == pytest.approx(301.0) and d.loc["qlora", "peak_train"] == pytest.approx(250.0)
    assert d["peak_merge"].isna().tolist() == [s == "qlora" for s in d.index]
    panel = drawn.fig.axes[2]
    labels = [c.get_label() for c in panel.containers]
    assert labels == ["peak: load (build + quantize + wrap)", "peak: train (steps + evals)", "peak: merge (merge + score)"]
    heights = [[p.get_height() for p in c.patches] for c in panel.containers]
    order = drawn.data["bars"]["strategy"].tolist()
    assert heights[1] == pytest.approx([d.loc[s, "peak_train"] for s in order])
    assert [METRICS[k].label for k in ("memory/peak_load_bytes", "memory/peak_bytes", "memory/peak_merge_bytes")] == [
        "peak memory, load (MB)", "peak memory, train (MB)", "peak memory, merge (MB)"]
