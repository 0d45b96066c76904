"""`strategy.quantizer=hqq`: HQQ's optimized zero points beat round-to-nearest and feed the INT-N
layer unchanged (W = s·(q − z), z fractional, held in fp16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorabench.adapters.qalora import qalora_layers
from lorabench.errors import ConfigError
from lorabench.quant.code_quantizers import hqq_quantize, rtn_quantize
from lorabench.quant.intn import IntNLinear, dequantize_state
from lorabench.strategies import build_strategy
from tests.helpers import build_on_tiny, tiny_llama

pytest.importorskip("hqq")


def reconstruct(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g: int) -> torch.Tensor:
    """(q − z)·s from a quantizer's output, written out independently of the layer."""
    out, n = q.shape
    zf, sf = z.float().t().repeat_interleave(g, 1), s.float().t().repeat_interleave(g, 1)
    return (q.float() - zf) * sf


def weights() -> list[torch.Tensor]:
    """A random Gaussian weight and every decoder linear of a tiny Llama."""
    torch.manual_seed(0)
    model = tiny_llama()
    return [0.02 * torch.randn(96, 256)] + [m.weight.detach() for n, m in model.named_modules()
                                            if isinstance(m, nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hqq_reconstructs_better_than_rtn(bits: int) -> None:
    for w in weights():
        hqq = reconstruct(*hqq_quantize(w, bits, 32), 32)
        rtn = reconstruct(*rtn_quantize(w, bits, 32), 32)
        assert (w - hqq).abs().mean() <= (w - rtn).abs().mean()  # the l1-like error HQQ targets
        assert (w - hqq).norm() <= (w - rtn).norm()  # and the Frobenius error too


@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_hqq_codes_scales_and_zeros_are_what_the_int_n_layer_holds(bits: int) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    q, s, z = hqq_quantize(lin.weight, bits, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert s.dtype == z.dtype == torch.float16 and s.shape == z.shape == (4, 48)
    assert not bool((z.float() == z.float().round()).all())  # HQQ's zero points are fractional
    layer = IntNLinear.from_linear(lin, bits, 32, quantizer="hqq")
    assert layer.fractional_zeros and torch.equal(layer.zeros, z) and torch.equal(layer.scales, s)
    w = dequantize_state(layer.qweight, layer.scales, layer.zero_tensor(), layer.shape)
    assert torch.equal(w, reconstruct(q, s, z, 32))
    x = torch.randn(5, 128)
    assert torch.allclose(layer(x), x @ w.t() + lin.bias.detach(), rtol=0, atol=1e-5)


def test_qalora_over_an_hqq_base_merges_into_its_zeros() -> None:
    strategy, model = build_on_tiny("qalora", bits=3, quantizer="hqq")
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in qalora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, 48, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        after = strategy.merge_to_intn(model).eval()(ids).logits
    zmax = max(float(m.zero_points().abs().max()) for m in strategy.merge_to_intn(model).modules()
               if isinstance(m, IntNLinear))
    assert (after - before).abs().max() <= 8 * 2**-11 * zmax / 2**3 * before.abs().max()  # docs/qalora.md bound


def test_an_unknown_quantizer_is_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        build_strategy({"name": "qalora", "quantizer": "gptq"})
    assert "\n" not in str(e.value) and "strategy.quantizer" in str(e.value) and "hqq" in str(e.value)
