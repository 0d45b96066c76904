"""Memory of a 4-bit backbone: expected bytes from the format, measured bytes from the tensors.

expected = packed 4-bit weights + every quant_state tensor (absmax, code tables, nested
absmax, offset) from the format's definition + unquantized parts at their dtype + 16 B per
trainable parameter; measured = bytes of every distinct storage really held (weights and
quant_state, grads, AdamW state). They must agree within 1% (docs/memory.md).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import LlamaForCausalLM

from lorabench.quant import bnb4bit, quantize_backbone
from lorabench.memory import account_model, measured_bytes, peak_bytes, reset_peak
from lorabench.strategies import build_strategy
from tests.helpers import tiny_llama as make_llama


def tiny_llama(device: str = "cpu") -> LlamaForCausalLM:
    return make_llama(hidden=128, inter=256).to(device)


def qlora_after_one_step(double_quant: bool, device: str = "cpu", compute_dtype: str = "bf16"):
    """A qlora model and optimizer right after one step (grads and AdamW moments exist)."""
    strategy = build_strategy(
        {"name": "qlora", "rank": 8, "double_quant": double_quant, "compute_dtype": compute_dtype}, seed=0
    )
    model = tiny_llama(device)
    quantize_backbone(model, strategy.base_format())
    model = strategy.wrap(model)
    opt = torch.optim.AdamW([p for _, p in strategy.trainable_parameters(model)], lr=1e-3)
    x = torch.randint(0, 48, (4, 16), device=device)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    return strategy, model, opt


def test_bytes_per_weight_match_the_paper():
    """0.5625 B/param without double quant, 0.51587 with (docs/memory.md), plus fixed constants."""
    n = 64 * 256 * 64  # a whole number of blocks and of second-level blocks
    per_tensor_dq = 16 * 4 + 256 * 4 + 4  # nf4 code table, second-level code table, offset
    assert (bnb4bit.expected_linear4bit_bytes(n, 64, True) - per_tensor_dq) / n == pytest.approx(0.515869, abs=1e-6)
    assert (bnb4bit.expected_linear4bit_bytes(n, 64, False) - 16 * 4) / n == 0.5625


@pytest.mark.parametrize("double_quant", [True, False])
def test_measured_within_1pct_of_expected(double_quant):
    strategy, model, opt = qlora_after_one_step(double_quant)
    acc = account_model(model)
    measured = measured_bytes(model, opt)
    assert abs(measured / acc.expected_bytes - 1) < 0.01, (measured, acc.expected_bytes)
    # the 4-bit layers alone match exactly: every quant_state tensor is where the format says
    for _, layer in bnb4bit.linear4bit_layers(model):
        lb = bnb4bit.account_linear4bit(layer)
        held = sum(t.untyped_storage().nbytes() for t in lb.tensors)
        assert held == lb.expected_bytes
    # logical counts: not Params4bit.numel() (half), and the seed formula from them
    float_model = tiny_llama()
    n_linear = sum(m.weight.numel() for n, m in float_model.named_modules() if n.endswith("_proj"))
    assert acc.base_quantized == n_linear
    assert acc.base_params == sum(p.numel() for p in float_model.parameters())
    assert acc.trainable_params == sum(p.numel() for _, p in strategy.trainable_parameters(model))
    assert strategy.formula_bytes(acc.base_params, acc.trainable_params) == int(
        0.5 * acc.base_params + 16 * acc.trainable_params
    )
    # an eval pass (the CPU repack trap) leaves the held bytes unchanged
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 48, (2, 8)))
    assert measured_bytes(model, opt) == measured


def test_double_quant_saves_what_the_formula_says():
    """Per layer: fp32 absmax (4 B/block) becomes uint8 (1 B/block) plus an fp32 absmax per
    256 blocks, a 256-entry fp32 code table and an fp32 offset."""
    _, m_dq, o_dq = qlora_after_one_step(True)
    _, m_nodq, o_nodq = qlora_after_one_step(False)
    saved = measured_bytes(m_nodq, o_nodq) - measured_bytes(m_dq, o_dq)
    want = 0
    for _, layer in bnb4bit.linear4bit_layers(m_dq):
        blocks = layer.weight.quant_state.absmax.numel()
        want += 4 * blocks - (blocks + 4 * -(-blocks // 256) + 256 * 4 + 4)
    assert saved == want > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_against_expected():
    """On GPU bitsandbytes' CUDA kernels run; peak allocated covers the held bytes plus activations."""
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    reset_peak(device)
    strategy, model, opt = qlora_after_one_step(True, "cuda", compute_dtype="bf16")
    assert all(l.weight.device.type == "cuda" for _, l in bnb4bit.linear4bit_layers(model))
    acc = account_model(model)
    measured = measured_bytes(model, opt)
    assert abs(measured / acc.expected_bytes - 1) < 0.01
    peak = peak_bytes(device)
    assert peak >= measured
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
