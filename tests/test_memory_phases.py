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
