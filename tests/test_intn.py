"""INT-N quantizer and IntNLinear: packing, GPTQ-range RTN, forward and backward, zero layouts,
refusals, exact accounting, strict save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.quant import quantize_backbone
from lorabench.quant.code_quantizers import rtn_quantize
from lorabench.quant.intn import IntNLinear, IntNMatmul, pack_codes, unpack_codes
from lorabench.quant.intn_io import INTN_CONFIG, load_intn_model, save_intn_model
from lorabench.errors import ConfigError
from lorabench.memory import accounting_for, account_model, activation_bytes, storage_bytes
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
    assert q.dtype == z.dtype == torch.uint8 and s.dtype == torch.float16
    assert int(q.max()) <= 2**bits - 1 and int(z.max()) <= 2**bits - 1
    assert s.shape == z.shape == (128 // g, 48)
    groups = w.reshape(48, 128 // g, g)
    span = groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)  # GPTQ's range, includes 0
    assert bool((s.float().t() >= span / (2**bits - 1)).all())  # the fp16 scale is rounded up
    assert bool((s.float().t() <= span / (2**bits - 1) * (1 + 2**-10)).all())  # by at most one fp16 step
    s_el = s.float().t().repeat_interleave(g, dim=1)
    z_el = z.float().t().repeat_interleave(g, dim=1)
    err = (s_el * (q.float() - z_el) - w).abs()
    assert bool((err <= s_el / 2 * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_range_includes_zero_like_gptq(bits: int) -> None:
    """Groups all-positive / all-negative / constant / zero: z stays in [0, 2^N − 1], at the
    end of the range that holds 0, and the half-step bound holds; zeros stay exactly 0."""
    maxq = 2**bits - 1
    w = torch.tensor([
        [0.5, 1.0, 2.0, 4.0] * 2,        # all positive: lo = 0, so z = 0
        [-0.5, -1.0, -2.0, -4.0] * 2,    # all negative: hi = 0, so z = maxq
        [2.5] * 8,                       # constant positive
        [-1.25] * 8,                     # constant negative
        [0.0] * 8,                       # zero: range [-1, 1]
    ])
    q, s, z = rtn_quantize(w, bits, 8)
    z = z.flatten().long()
    s = s.float().flatten()
    assert z.tolist()[:4] == [0, maxq, 0, maxq]
    assert 0 <= int(z[4]) <= maxq
    rec = s.unsqueeze(1) * (q.float() - z.unsqueeze(1).float())
    assert bool(((rec - w).abs() <= s.unsqueeze(1) / 2 * (1 + 1e-5)).all())
    assert torch.equal(rec[4], torch.zeros(8))
    assert float(s[0]) >= 4.0 / maxq and float(s[1]) >= 4.0 / maxq and float(s[4]) >= 2.0 / maxq


def test_rtn_refuses_a_range_fp16_scales_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="strategy.quantizer: a weight group spans 3e\\+05, beyond what fp16 scales hold"):
        rtn_quantize(torch.tensor([[0.0, 3e5]]), 2, 2)


def test_intn_linear_shapes_and_forward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    layer = IntNLinear.from_linear(lin, bits=3, group_size=32)
    assert layer.is_quantized_linear and (layer.in_features, layer.out_features) == (64, 48)
    assert layer.qweight.shape == (48, 64 // 8 * 3) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == (2, 48) and layer.scales.dtype == torch.float16
    assert layer.qzeros.shape == (2, 48 // 8 * 3) and layer.qzeros.dtype == torch.uint8 and layer.zeros is None
    assert not layer.fractional_zeros
    assert not list(layer.parameters())  # frozen: buffers only
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), x @ layer.dequantize().t() + lin.bias, atol=1e-6)
    # 8-bit is close to the float weight; 2-bit is not
    err8 = (IntNLinear.from_linear(lin, 8, 32).dequantize() - lin.weight).abs().max()
    err2 = (IntNLinear.from_linear(lin, 2, 32).dequantize() - lin.weight).abs().max()
    assert err8 < 4e-3 < err2


def test_zero_layouts_switch_and_refuse_bad_integers() -> None:
    layer = IntNLinear.from_linear(nn.Linear(64, 40), bits=4, group_size=32)
    w0, z0 = layer.dequantize(), layer.zero_points()
    layer.set_fractional_zeros(z0 + 0.25)
    assert layer.fractional_zeros and layer.qzeros is None and layer.zeros.dtype == torch.float16
    assert torch.allclose(layer.dequantize(), w0 - 0.25 * layer.scales.float().t().repeat_interleave(32, 1), atol=1e-6)
    layer.set_integer_zeros(z0)
    assert not layer.fractional_zeros and torch.equal(layer.dequantize(), w0)
    for bad in (z0 + 0.5, z0 * 0 - 1, z0 * 0 + 16):
        with pytest.raises(ValueError, match=r"integers in \[0, 15\]"):
            layer.set_integer_zeros(bad)


@pytest.mark.parametrize("fractional", [False, True])
def test_gradients_match_a_dense_reference(fractional: bool) -> None:
    torch.manual_seed(0)
    layer = IntNLinear.from_linear(nn.Linear(64, 24, bias=True), bits=3, group_size=16)
    if fractional:
        layer.set_fractional_zeros(layer.zero_points() + torch.rand(4, 24))
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 5, 24)
    (layer(x) * g).sum().backward()
    (nn.functional.linear(x_ref, layer.dequantize(), layer.bias) * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    # float64 finite differences agree with the custom backward
    x64 = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    fn = lambda t: IntNMatmul.apply(t, layer.qweight, layer.scales, layer.zero_tensor(), layer.shape)
    assert torch.autograd.gradcheck(fn, (x64,))


def test_backward_keeps_no_dense_weight() -> None:
    """Autograd saves nothing new for an INT-N matmul (only the layer's own packed buffers),
    where dequantize + F.linear keeps the dense fp32 weight (out × in × 4 B) for backward."""
    layer = IntNLinear.from_linear(nn.Linear(64, 48), bits=4, group_size=32)
    x = torch.randn(4, 64, requires_grad=True)
    assert activation_bytes(layer, lambda: layer(x).sum().backward()) == 0
    dense = lambda: nn.functional.linear(x, layer.dequantize(), layer.bias).sum().backward()
    assert activation_bytes(layer, dense) == 48 * 64 * 4


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
    # GPTQ's layout, per weight: N/8 B of codes + an fp16 scale and an N-bit zero per 32 weights
    layers = [m for m in model.modules() if isinstance(m, IntNLinear)]
    per_weight = bits / 8 + 2 / 32 + bits / 8 / 32
    intn_held = storage_bytes(t for m in layers for t in (m.qweight, m.scales, m.qzeros))
    assert intn_held == n_q * per_weight
    for m in layers:  # the registered accounting: expected bytes == bytes really held, per layer
        lb = accounting_for(m)(m)
        assert lb.expected_bytes == storage_bytes(lb.tensors) and lb.logical_params == m.in_features * m.out_features
    others = list(model.parameters()) + list(model.buffers(recurse=True))
    others = [t for t in others if not any(t is b for m in layers for b in m.buffers())]
    assert storage_bytes(acc.held_tensors) == intn_held + storage_bytes(others)  # tied embedding once


def test_accounting_pads_rows_to_whole_chunks() -> None:
    """in = 36, out = 20 at 3 bits: codes 20 × ⌈36/8⌉·3 B, scales 2 B each, zeros 1 × ⌈20/8⌉·3 B."""
    layer = IntNLinear.from_linear(nn.Linear(36, 20, bias=False), bits=3, group_size=36)
    lb = accounting_for(layer)(layer)
    assert lb.expected_bytes == 20 * 15 + 2 * 20 + 9 == storage_bytes(lb.tensors)
    layer.set_fractional_zeros(layer.zero_points())
    lb = accounting_for(layer)(layer)
    assert lb.expected_bytes == 20 * 15 + 2 * 20 + 2 * 20 == storage_bytes(lb.tensors)


def test_save_load_roundtrip_packed_zeros_and_strictness(tmp_path) -> None:
    model = tiny_llama(tie=True)
    quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": 3, "group_size": 32}))
    save_intn_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / INTN_CONFIG).read_text())
    assert {spec["zeros"] for spec in meta["layers"].values()} == {"packed"}
    back = load_intn_model(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    # the json's zero layout must match the file's tensors
    meta["layers"]["model.layers.0.mlp.up_proj"]["zeros"] = "fp16"
    (tmp_path / "m" / INTN_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"model.safetensors: missing tensors \['model.layers.0.mlp.up_proj.zeros'\]"):
        load_intn_model(tmp_path / "m")
    # a tensor of another dtype is refused, not silently cast
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    layer.scales = layer.scales.float()
    save_intn_model(model, tmp_path / "f32")
    with pytest.raises(ConfigError, match="model.layers.1.self_attn.o_proj.scales is F32 \\(2, 64\\), expected F16"):
        load_intn_model(tmp_path / "f32")
