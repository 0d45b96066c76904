"""Memory accounting on 16/32-bit bases: measured bytes match the expected figure, tied
weights count once; the peak counter resets (or says it cannot)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from lorabench import memory
from lorabench.adapters.lora import inject_lora
from tests.helpers import tiny_llama as make_llama


def model() -> LlamaForCausalLM:
    return make_llama(vocab=64, heads=2)


def step(m: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    m(ids, labels=ids).loss.backward()
    opt.step()
    return opt


def test_full_finetuning_is_16_bytes_per_parameter() -> None:
    m = model()
    n = sum(p.numel() for p in m.parameters())
    opt = step(m)
    acct = memory.account_model(m)
    assert acct.trainable_params == n and acct.base_params == 0
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    steps = 4 * len(list(m.parameters()))  # AdamW's float32 step counter per tensor
    assert acct.expected_bytes == 16 * n + buffers + steps
    assert memory.measured_bytes(m, opt) == 16 * n + buffers + steps


def test_lora_measured_equals_expected_and_formula_plus_buffers() -> None:
    m = model()
    n = sum(p.numel() for p in m.parameters())
    inject_lora(m, "all-linear", rank=4, alpha=8)
    opt = step(m)
    acct = memory.account_model(m)
    M = acct.trainable_params
    assert acct.base_params == n
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    steps = 4 * 2 * 14  # A and B of 14 adapted linears
    assert acct.expected_bytes == 4 * n + 16 * M + buffers + steps
    assert memory.measured_bytes(m, opt) == 4 * n + 16 * M + buffers + steps


def test_bf16_base_counts_two_bytes_per_frozen_parameter() -> None:
    m = model().to(torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    inject_lora(m, "all-linear", rank=4, alpha=8)
    acct = memory.account_model(m)
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert acct.expected_bytes == 2 * n + 16 * acct.trainable_params + buffers + 4 * 2 * 14


def test_shared_storage_counts_once() -> None:
    t = torch.zeros(100)
    assert memory.storage_bytes([t, t[:10], t.view(10, 10)]) == 400


def hand_count(vocab: int, hidden: int, inter: int, layers: int, tie: bool) -> int:
    """Llama parameters from the config: embedding, per block 4 attention + 3 MLP matrices and
    2 norms, the final norm, and lm_head unless tied."""
    per_block = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tie else 2) + layers * per_block + hidden


def test_tied_embeddings_count_once() -> None:
    """embed_tokens and lm_head share one tensor: one N, one set of bytes (not counted twice)."""
    m = make_llama(vocab=64, heads=2, tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    n = hand_count(64, 64, 128, 2, tie=True)
    inject_lora(m, "all-linear", rank=4, alpha=8)
    opt = step(m)
    acct = memory.account_model(m)
    assert acct.base_params == n
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    steps = 4 * 2 * 14
    assert acct.expected_bytes == 4 * n + 16 * acct.trainable_params + buffers + steps
    assert memory.measured_bytes(m, opt) == acct.expected_bytes
    full = make_llama(vocab=64, heads=2, tie=True)
    assert memory.account_model(full).trainable_params == n == hand_count(64, 64, 128, 2, False) - 64 * 64


def test_cpu_peak_resets_and_rises() -> None:
    """Linux: after freeing a 256 MiB tensor and resetting, the peak is far below the old one;
    a new 256 MiB allocation raises it again."""
    if not memory.reset_peak("cpu"):  # other OS, or /proc/self/clear_refs not writable
        assert memory.peak_bytes("cpu") is None
        pytest.skip("the process peak RSS cannot be reset here")
    big = 256 * 2**20
    t = torch.ones(big // 4)  # touched pages: resident
    old = memory.peak_bytes("cpu")
    del t
    assert memory.reset_peak("cpu")
    low = memory.peak_bytes("cpu")
    assert low < old - big * 3 // 4
    t = torch.ones(big // 4)
    assert memory.peak_bytes("cpu") >= low + big * 3 // 4
    del t


def test_peak_unavailable_without_a_reset(monkeypatch, tmp_path) -> None:
    """No reset in this process, a reset the OS refuses, or another OS: None, never a number
    that could include an earlier job's peak."""
    monkeypatch.setattr(memory, "PEAK_RESET", set())
    assert memory.peak_bytes("cpu") is None
    monkeypatch.setattr(memory, "PROC_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert memory.reset_peak("cpu") is False and memory.peak_bytes("cpu") is None
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.reset_peak("cpu") is False and memory.peak_bytes("cpu") is None
