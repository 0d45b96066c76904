"""INT-N quantizer and IntNLinear: packing, RTN bounds, forward, refusals, exact accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.quant import quantize_backbone
from lorabench.quant.code_quantizers import rtn_quantize
from lorabench.quant.intn import IntNLinear, pack_codes, unpack_codes
from lorabench.errors import ConfigError
from lorabench.memory import accounting_for, account_model, storage_bytes
from lorabench.strategies.base import BaseFormat
from tests.helpers import tiny_llama as make_llama


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    return make_llama(seed, vocab=50, heads=2, max_pos=32, tie=tie).eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [8, 37, 64])
def test_pack_roundtrip_and_size(bits: int, n: int) -> None:
    q = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n // 8) * bits)
    assert torch.equal(unpack_codes(packed, bits, n), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", [8, 32])
def test_rtn_codes_in_range_and_error_within_half_step(bits: int, g: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3 + torch.randn(48, 1)  # uneven ranges, offsets
    q, s, z = rtn_quantize(w, bits, g)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert s.shape == z.shape == (128 // g, 48)
    assert torch.equal(z, z.round())  # fresh RTN zeros are integers (fractional only after a merge)
    s_el = s.t().repeat_interleave(g, dim=1)
    z_el = z.t().repeat_interleave(g, dim=1)
    err = (s_el * (q.float() - z_el) - w).abs()
    assert bool((err <= s_el / 2 * (1 + 1e-5) + 1e-7).all())


def test_constant_group_is_exact() -> None:
    w = torch.tensor([[2.5] * 8 + [0.0] * 8 + [-1.0] * 8])
    q, s, z = rtn_quantize(w, 2, 8)
    rec = s.t().repeat_interleave(8, 1) * (q.float() - z.t().repeat_interleave(8, 1))
    assert torch.equal(rec, w)


def test_intn_linear_shapes_and_forward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    layer = IntNLinear.from_linear(lin, bits=3, group_size=32)
    assert layer.is_quantized_linear and (layer.in_features, layer.out_features) == (64, 48)
    assert layer.qweight.shape == (48, 64 // 8 * 3) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == layer.zeros.shape == (2, 48)
    assert not list(layer.parameters())  # frozen: buffers only
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), x @ layer.dequantize().t() + lin.bias, atol=1e-6)
    # 8-bit is close to the float weight; 2-bit is not
    err8 = (IntNLinear.from_linear(lin, 8, 32).dequantize() - lin.weight).abs().max()
    err2 = (IntNLinear.from_linear(lin, 2, 32).dequantize() - lin.weight).abs().max()
    assert err8 < 2e-3 < err2


def test_quantize_backbone_replaces_block_linears_only() -> None:
    model = tiny_llama()
    names = quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": 4, "group_size": 32}))
    assert len(names) == 2 * 7
    assert all(isinstance(model.get_submodule(n), IntNLinear) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, IntNLinear)
    out = model(torch.randint(0, 50, (2, 7))).logits
    assert out.shape == (2, 7, 50) and torch.isfinite(out).all()


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_refuses_bad_bits(bits: int) -> None:
    with pytest.raises(ConfigError, match=r"strategy.bits: INT-N supports bits in \[2, 3, 4, 8\]"):
        quantize_backbone(tiny_llama(), BaseFormat("intn", "all-linear", {"bits": bits, "group_size": 32}))


def test_refuses_group_not_dividing_and_names_layer() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError) as e:
        quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": 4, "group_size": 48}))
    msg = str(e.value)
    assert "strategy.group_size: 48 does not divide in_features=64" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "\n" not in msg
    assert not any(isinstance(m, IntNLinear) for m in model.modules())  # nothing replaced


def test_refuses_unknown_quantizer() -> None:
    with pytest.raises(ConfigError, match="strategy.quantizer: unknown INT-N quantizer 'gptq'"):
        quantize_backbone(tiny_llama(), BaseFormat("intn", "all-linear", {"bits": 4, "group_size": 32, "quantizer": "gptq"}))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_memory_accounting_exact(bits: int) -> None:
    model = tiny_llama(tie=True)
    quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": bits, "group_size": 32}))
    acc = account_model(model)
    n_q = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert acc.base_quantized == n_q
    # per layer: bits/8 per weight + fp32 scale and zero per (group, output)
    layers = [m for m in model.modules() if isinstance(m, IntNLinear)]
    intn_expected = sum(m.in_features * m.out_features * (bits / 8 + 8 / 32) for m in layers)
    intn_held = storage_bytes(t for m in layers for t in (m.qweight, m.scales, m.zeros))
    assert intn_held == intn_expected
    for m in layers:  # the registered accounting: expected bytes == bytes really held, per layer
        lb = accounting_for(m)(m)
        assert lb.expected_bytes == storage_bytes(lb.tensors) and lb.logical_params == m.in_features * m.out_features
    others = list(model.parameters()) + list(model.buffers(recurse=True))
    others = [t for t in others if t.dtype != torch.uint8 and not any(t is b for m in layers for b in m.buffers())]
    assert storage_bytes(acc.held_tensors) == intn_held + storage_bytes(others)  # tied embedding once
