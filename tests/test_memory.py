"""Memory accounting on 16/32-bit bases: measured bytes match the expected figure."""

from __future__ import annotations

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
