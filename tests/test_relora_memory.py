"""What ReLoRA holds beyond LoRA, counted to the byte: the float master copy over a 4-bit base,
the merged factors and the starting 4-bit weight (keep_factors only); checkpoints that do not
grow with the merges; the factors in their own file; drift over 40 merges bounded by the master
copy; bad master_copy / keep_factors input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lorabench import memory
from lorabench.adapters.lora import LoRALinear
from lorabench.adapters.relora import ReLoRAVariant, relora_layers
from lorabench.errors import ConfigError
from lorabench.strategies import build_strategy
from lorabench.strategies.relora import FACTORS_FILE
from tests.helpers import tiny_llama, tiny_trainer

VOCAB = 32


def relora(**kw):
    node = {"name": "relora", "rank": 4, "alpha": 8.0, "reset_every": 2, "restart_warmup_steps": 0}
    node.update(kw)
    return build_strategy(node, seed=0)


def nf4_model(**kw):
    from lorabench.quant import quantize_backbone

    model = tiny_llama(0, 32, 64, vocab=VOCAB, max_pos=32)
    s = relora(base="nf4", compute_dtype="fp32", **kw)
    quantize_backbone(model, s.base_format())
    s.wrap(model)
    return model, s


def adapter_params(model: nn.Module) -> int:
    return sum(layer.lora_A.weight.numel() + layer.lora_B.weight.numel() for _, layer in relora_layers(model))


# ---- memory: everything kept is counted, expected == measured -----------------------------------
def held_expected(model: nn.Module) -> float:
    """Expected bytes without the gradients, moments and Adam step of the trainable parameters."""
    extra = sum(3 * p.numel() * p.element_size() + memory.ADAM_STEP_BYTES for p in model.parameters() if p.requires_grad)
    return memory.account_model(model).expected_bytes - extra


def test_nf4_master_factors_and_initial_copy_are_counted_to_the_byte():
    """keep_factors over nf4 with the default fp32 master: measured == expected bytes before and
    after 1 and 3 merges; the master adds 4 B per adapted weight, the starting 4-bit copy one
    more set of the layers' 4-bit state, the factors exactly 4 B per adapter parameter per merge."""
    model, s = nf4_model(keep_factors=True)
    plain, _ = nf4_model(master_copy="none")
    layers = relora_layers(model)
    n_adapted = sum(layer.in_features * layer.out_features for _, layer in layers)
    initial = sum(b.numel() * b.element_size() for _, layer in layers
                  for n, b in layer.named_buffers(recurse=False) if n.startswith("relora_initial__"))
    assert initial > n_adapted // 2  # the packed 4-bit weights (0.5 B each) plus their constants
    start = held_expected(model)
    assert start - held_expected(plain) == 4 * n_adapted + initial  # fp32 master + the 4-bit copy
    assert memory.measured_bytes(model) == start
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-2)
    for merges in (1, 3):
        train_to(model, s, opt, merges)
        assert memory.measured_bytes(model) == held_expected(model)
        assert held_expected(model) - start == 4 * adapter_params(model) * merges
    ids = torch.randint(0, VOCAB, (4, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # grads and moments held: the whole count
    assert memory.measured_bytes(model, opt) == memory.account_model(model).expected_bytes


def test_without_keep_factors_memory_does_not_grow_with_merges():
    model, s = nf4_model()
    opt = torch.optim.AdamW([p for _, p in s.trainable_parameters(model)], lr=1e-2)
    train_to(model, s, opt, 1)
    one = held_expected(model)
    train_to(model, s, opt, 4)
    assert held_expected(model) == one == memory.measured_bytes(model)
    assert all(layer.relora_u is None for _, layer in relora_layers(model))


def train_to(model: nn.Module, s, opt: torch.optim.Optimizer, merges: int) -> None:
    """Train (reset_every=2) until `merges` merges are done; leaves no gradient behind."""
    g = torch.Generator().manual_seed(s.merges)
    step = 2 * s.merges
    while s.merges < merges:
        step += 1
        ids = torch.randint(0, VOCAB, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        s.on_step_end(step, model, opt)


# ---- checkpoints do not grow; the factors have their own file ----------------------------------
@pytest.mark.parametrize("keep", [False, True])
def test_checkpoint_size_equal_after_1_and_5_merges(tmp_path: Path, keep: bool):
    trainer = tiny_trainer(tmp_path, "strategy=relora", "strategy.reset_every=2", "strategy.restart_warmup_steps=1",
                           "optim.warmup_steps=1", "trainer.max_steps=10", f"strategy.keep_factors={keep}")
    sizes = {}
    while trainer.state.step < 10:
        trainer.train_step()
        if trainer.strategy.merges in (1, 5) and trainer.state.step % 2 == 0:
            trainer.save_checkpoint()
            sizes[trainer.strategy.merges] = trainer.checkpoint_path.stat().st_size
    assert sizes[1] == sizes[5] > 0
    ckpt = torch.load(trainer.checkpoint_path, weights_only=True)
    assert "factors" not in ckpt["strategy"] and "initial" not in ckpt["strategy"]
    trainer.strategy.save_artifacts(trainer.model, tmp_path)
    assert (tmp_path / FACTORS_FILE).exists() == keep
    if keep:
        saved = torch.load(tmp_path / FACTORS_FILE, weights_only=True)
        layers = relora_layers(trainer.model)
        assert saved["merges"] == 5 and all(len(saved["factors"][n]) == 5 for n, _ in layers)
        for n, layer in layers:
            u = torch.cat([b for b, _ in saved["factors"][n]], dim=1)
            assert torch.equal(u, layer.relora_u)


def test_keep_factors_rank_absent_without_it_and_after_a_resume_past_a_merge(tmp_path: Path):
    over = ["strategy=relora", "strategy.reset_every=2", "strategy.restart_warmup_steps=1", "optim.warmup_steps=1",
            "trainer.max_steps=6"]
    plain = tiny_trainer(None, *over)
    kept = tiny_trainer(tmp_path, *over, "strategy.keep_factors=true")
    for t in (plain, kept):
        while t.state.step < 4:
            t.train_step()
    kept.save_checkpoint()
    assert "relora/update_rank_mean" not in plain.strategy.final_metrics(plain.model)
    full = kept.strategy.final_metrics(kept.model)
    assert full["relora/update_rank_mean"] == 2 * 8  # 2 merges × r=8 (+ the fresh cycle's B = 0)
    resumed = tiny_trainer(tmp_path, *over, "strategy.keep_factors=true")
    assert resumed.state.step == 4 and resumed.strategy.merges == 2
    got = resumed.strategy.final_metrics(resumed.model)
    assert "relora/update_rank_mean" not in got and got["relora/merges"] == 2.0
    resumed.strategy.save_artifacts(resumed.model, tmp_path / "out")
    assert not (tmp_path / "out" / FACTORS_FILE).exists()


# ---- the master copy bounds the 4-bit drift ------------------------------------------------------
def drift_after_merges(master: str, merges: int = 40) -> dict[int, tuple[float, float, LoRALinear]]:
    """One 128×128 NF4 layer, `merges` merges of a random rank-4 update of 2% of ‖W‖ each:
    (‖W_now − W_start − ΣΔ‖, ‖ΣΔ‖) after merges 3 and `merges`."""
    from lorabench.quant.bnb4bit import to_linear4bit

    torch.manual_seed(0)
    lin = nn.Linear(128, 128, bias=False)
    dtype = {"none": None, "fp32": torch.float32, "bf16": torch.bfloat16}[master]
    layer = LoRALinear(to_linear4bit(lin, compute_dtype=torch.float32), 4, alpha=8.0,
                       variant=ReLoRAVariant(True, dtype, keep_factors=True))
    g = torch.Generator().manual_seed(0)
    size = 0.02 * lin.weight.norm().item()
    out = {}
    for k in range(1, merges + 1):
        with torch.no_grad():
            layer.lora_B.weight.normal_(generator=g)
            layer.lora_B.weight.mul_(size / layer.variant.delta_weight(layer).norm().item())
        layer.variant.merge_and_restart(layer, g)
        if k in (3, merges):
            out[k] = (*layer.variant.requant_drift(layer), layer)
    return out


def test_fp32_master_bounds_the_drift_over_40_merges():
    """With the fp32 master the drift after 40 merges is one requantization of the current weight
    (no accumulated term) and, relative to the total update, no larger than after 3 merges;
    without a master it accumulates (the test can fail)."""
    from lorabench.quant import bnb4bit

    kept = drift_after_merges("fp32")
    (d3, t3, _), (d40, t40, layer) = kept[3], kept[40]
    once = (bnb4bit.dequantized_weight(layer.base_layer, torch.float32) - layer.master).norm().item()
    assert abs(d40 - once) <= 1e-3 * once  # drift = the current master's own rounding to the grid
    assert d40 / t40 <= d3 / t3
    lost = drift_after_merges("none")
    (n3, m3, _), (n40, m40, _) = lost[3], lost[40]
    assert n40 / m40 > 2 * (n3 / m3) and n40 > 5 * d40


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["int8", "nf4", "true"])
def test_master_copy_must_be_a_float_dtype(value: str):
    with pytest.raises(ConfigError, match=r"^strategy\.master_copy: expected a float dtype \(bf16 \| fp16 \| fp32\), auto or none"):
        relora(base="nf4", master_copy=value)


def test_master_copy_dtype_needs_a_4bit_base():
    with pytest.raises(ConfigError, match=r"^strategy\.master_copy: only meaningful with base=nf4, got base=fp32"):
        relora(master_copy="fp32")
    assert relora(master_copy="auto").cfg.master_dtype() is None  # auto over a float base: no master


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["strategy=relora", "strategy.base=nf4", "strategy.master_copy=int8"],
     "strategy.master_copy: expected a float dtype (bf16 | fp16 | fp32), auto or none, got 'int8'"),
    (["strategy=lora", "+strategy.keep_factors=true"], "strategy.keep_factors: Key 'keep_factors' not in 'LoRAConfig'"),
    (["strategy=full", "strategy.keep_factors=true"], "Key 'keep_factors' not in 'FullConfig'"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], expected: str):
    cmd = [sys.executable, "-m", "lorabench", "logger=none", f"hydra.run.dir={tmp_path}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lorabench: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    summary = tmp_path / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"
