"""The contract every registered strategy keeps, stated once and run for each of them:
wrapping leaves the function unchanged, a lossless merge equals the unmerged model, expected
memory equals measured memory, a resume mid-run is bit-exact, and the summary carries the
strategy's own keys. A new strategy file is picked up here with no edit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lorabench import memory
from lorabench.quant import quantize_backbone
from lorabench.strategies import available, build_strategy
from tests.helpers import run_tiny, tiny_llama, tiny_trainer

STEPS = 50  # a multiple of every default restart period, so each strategy's defaults run as-is
STRATEGIES = available()


def overrides(name: str, *extra: str) -> list[str]:
    return [f"strategy={name}", f"trainer.max_steps={STEPS}", "optim.warmup_steps=2", *extra]


@pytest.mark.parametrize("name", STRATEGIES)
def test_wrap_leaves_the_function_unchanged(name: str) -> None:
    strategy = build_strategy({"name": name})
    model = tiny_llama()
    fmt = strategy.base_format()
    if fmt is not None:
        quantize_backbone(model, fmt)
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        after = strategy.wrap(model).eval()(ids).logits
    assert torch.equal(before, after)  # B = 0 (or nothing injected): exactly the same logits


@pytest.mark.parametrize("name", STRATEGIES)
def test_lossless_merge_equals_unmerged(name: str, tmp_path: Path) -> None:
    cls = build_strategy({"name": name}).__class__
    if not cls.lossless_merge:
        pytest.skip(f"{name} declares no lossless merge")
    keys = [f"strategy.{k}={v}" for k, v in cls.lossless_merge.items()]
    trainer = tiny_trainer(None, *overrides(name, *keys))
    for _ in range(5):  # B ≠ 0 after a few steps, so the merge has something to fold
        trainer.train_step()
    ids = trainer.data.train_batch(0, 4)
    model = trainer.model.eval()
    merged = trainer.strategy.merged_for_eval(model, tmp_path)
    assert merged is not None
    with torch.no_grad():
        unmerged_logits = model(**ids).logits
        merged_logits = merged.eval()(**ids).logits
        base_gap = (unmerged_logits - tiny_trainer(None, *overrides(name, *keys)).model.eval()(**ids).logits).abs().max()
    quantized = trainer.strategy.base_format() is not None
    # a float base merges to fp32 rounding; a 4-bit base computes in bf16, so the merged fp32 copy differs by that
    tol = 3e-2 if quantized else 1e-4
    assert (merged_logits - unmerged_logits).abs().max() < tol
    assert base_gap > 10 * tol  # training moved the model far more than the merge tolerance


@pytest.mark.parametrize("name", STRATEGIES)
def test_expected_memory_equals_measured(name: str) -> None:
    trainer = tiny_trainer(None, *overrides(name))
    trainer.train_step()
    figures = trainer.state.measured
    assert figures["memory/expected_bytes"] == figures["memory/measured_bytes"] > 0
    assert figures["memory/activation_bytes"] > 0  # what autograd saved for the first step's backward
    acct = memory.account_model(trainer.model)
    assert figures["params/trainable"] == acct.trainable_params == sum(
        p.numel() for _, p in trainer.strategy.trainable_parameters(trainer.model)
    )


@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_mid_run_is_bit_exact(name: str, tmp_path: Path) -> None:
    over = overrides(name, "seed=2")
    ref = tiny_trainer(None, *over)
    ref_losses = [ref.train_step()["train/loss"] for _ in range(STEPS)]
    cut = tiny_trainer(tmp_path, *over)
    for _ in range(STEPS // 2 + 1):
        cut.train_step()
    cut.save_checkpoint()
    resumed = tiny_trainer(tmp_path, *over)
    assert resumed.state.step == STEPS // 2 + 1
    losses = [resumed.train_step()["train/loss"] for _ in range(STEPS - resumed.state.step)]
    assert losses == ref_losses[STEPS // 2 + 1:]
    ref_sd, res_sd = ref.model.state_dict(), resumed.model.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    assert all(torch.equal(ref_sd[k], res_sd[k]) for k in ref_sd)


SUMMARY_KEYS = {
    "status", "strategy", "seed", "params/base", "params/base_quantized", "params/trainable",
    "memory/formula_bytes", "memory/expected_bytes", "memory/measured_bytes", "memory/peak_bytes",
    "eval/accuracy_base", "eval/accuracy", "eval/loss", "train/tokens_per_second", "train/steps",
    "train/wall_seconds",
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_job_end_to_end_and_summary_holds_the_strategy_keys(name: str, tmp_path: Path) -> None:
    summary = run_tiny(tmp_path, *overrides(name))
    assert SUMMARY_KEYS <= set(summary)
    strategy = build_strategy({"name": name})
    for key, value in strategy.identity().items():
        assert summary[f"strategy/{key}"] == value, key
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["strategy"] == name and on_disk["train/steps"] == STEPS
    assert on_disk["params/trainable"] > 0 and on_disk["memory/measured_bytes"] > 0
    assert on_disk["eval/loss"] < on_disk["eval/loss_base"]  # training lowered the answer loss
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0]  # the base score, before training
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    assert (tmp_path / "final_state.pt").exists()
    if sys.platform == "linux":  # the CPU peak is resettable there (elsewhere it is logged as unavailable)
        assert on_disk["memory/peak_bytes"] > on_disk["memory/measured_bytes"]
    assert ("memory/peak_merge_bytes" in on_disk) == ("eval/loss_merged" in on_disk)
