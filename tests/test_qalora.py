"""QA-LoRA: pooled adapter, zero-point merge exactness, save/reload, refusals, param counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.adapters.lora import inject_lora
from lorabench.adapters.lora import LoRALinear, merge_and_unload
from lorabench.adapters.qalora import QALoRAVariant, inject_qalora, qalora_layers
from lorabench.quant import quantize_backbone
from lorabench.quant.intn import IntNLinear
from lorabench.errors import ConfigError
from lorabench.param_count import (
    LLAMA_7B_SHAPES,
    llama_linear_shapes,
    lora_trainable_params,
    model_linear_shapes,
    qalora_trainable_params,
)
from lorabench.strategies import build_strategy
from lorabench.strategies.base import BaseFormat
from tests.helpers import tiny_llama as make_llama


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    return make_llama(seed, vocab=50, heads=2, max_pos=32, tie=tie).eval()


def quantized_llama(bits: int = 3, g: int = 32, tie: bool = False) -> LlamaForCausalLM:
    model = tiny_llama(tie=tie)
    quantize_backbone(model, BaseFormat("intn", "all-linear", {"bits": bits, "group_size": g}))
    return model


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and a fresh A) so a merge has something to carry; big enough to move logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in qalora_layers(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=gen) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)


def qalora_linear(base: IntNLinear, rank: int, alpha: float, pooling: str = "sum", group_size=None, name: str = "layer") -> LoRALinear:
    """One pooled LoRA layer over an INT-N base (the QA-LoRA variant of the LoRA layer)."""
    return LoRALinear(base, rank, alpha, variant=QALoRAVariant(base, pooling, group_size, name))


def intn_layer(g: int = 32, bits: int = 4, in_f: int = 96, out_f: int = 40) -> IntNLinear:
    torch.manual_seed(0)
    return IntNLinear.from_linear(nn.Linear(in_f, out_f, bias=False), bits, g)


def test_shapes() -> None:
    layer = qalora_linear(intn_layer(g=32, in_f=96, out_f=40), rank=4, alpha=8, pooling="mean")
    assert layer.lora_A.weight.shape == (4, 3) and layer.lora_B.weight.shape == (40, 4)
    assert layer.lora_A.weight.dtype == torch.float32 and bool((layer.lora_B.weight == 0).all())
    assert layer.lora_A.weight.abs().sum() > 0  # xavier-uniform, not zero (else nothing learns)
    assert layer(torch.randn(2, 5, 96)).shape == (2, 5, 40)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_zero_b_output_equals_quantized_base_exactly(pooling: str) -> None:
    model = quantized_llama()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        inject_qalora(model, "all-linear", rank=4, alpha=12, pooling=pooling)
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("pooling,factor", [("mean", 1 / 32), ("sum", 1.0)])
def test_pooled_adapter_equals_dense_lora_with_repeated_a(pooling: str, factor: float) -> None:
    base = intn_layer(g=32, in_f=96, out_f=40)
    layer = qalora_linear(base, rank=4, alpha=12, pooling=pooling)
    nn.init.normal_(layer.lora_B.weight)
    dense_a = torch.repeat_interleave(layer.lora_A.weight * factor, 32, dim=1)  # A/g for mean
    x = torch.randn(3, 7, 96)
    expected = base(x) + (x @ dense_a.t() @ layer.lora_B.weight.t()) * (12 / 4)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-5)
    assert torch.allclose(layer.delta_weight(), (layer.lora_B.weight @ dense_a) * 3, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("bits,g", [(3, 32), (2, 16), (4, 64)])
def test_merge_into_zeros_is_exact(pooling: str, bits: int, g: int) -> None:
    model = quantized_llama(bits, g)
    inject_qalora(model, "all-linear", rank=4, alpha=12, pooling=pooling)  # α/r = 3, g ≠ 1
    randomize_adapters(model)
    ids = torch.randint(0, 50, (2, 11))
    layers = dict(qalora_layers(model))
    q0 = {n: m.base_layer.qweight.clone() for n, m in layers.items()}
    s0 = {n: m.base_layer.scales.clone() for n, m in layers.items()}
    w0 = {n: m.base_layer.dequantize() for n, m in layers.items()}
    dw = {n: m.delta_weight() for n, m in layers.items()}
    with torch.no_grad():
        base_logits = quantized_llama(bits, g)(ids).logits
        unmerged = model(ids).logits
        merge_and_unload(model)
        merged = model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2  # the update matters, so a wrong factor would show
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert not qalora_layers(model)
    for n in layers:
        m = model.get_submodule(n)
        assert isinstance(m, IntNLinear)
        assert torch.equal(m.qweight, q0[n]) and torch.equal(m.scales, s0[n])  # bitwise unchanged
        change = (m.dequantize() - w0[n]).view(m.out_features, m.n_groups, g)
        assert torch.allclose(change, change[..., :1].expand_as(change), atol=1e-6)  # constant per cell
        assert torch.allclose(change.reshape(m.out_features, -1), dw[n], atol=1e-5)


def test_refuses_pooling_group_different_from_quantization_group() -> None:
    model = quantized_llama(g=32)
    with pytest.raises(ConfigError, match="pooling group 16 differs from the quantization group 32 of layer 'model.layers.0.self_attn.q_proj'"):
        inject_qalora(model, "all-linear", rank=4, alpha=8, group_size=16)
    assert not qalora_layers(model)  # refused before wrapping anything


def test_refuses_group_not_dividing_in_features() -> None:
    with pytest.raises(ConfigError, match=r"pooling group 64 does not divide in_features=96 of layer 'proj'"):
        qalora_linear(intn_layer(g=32, in_f=96), rank=4, alpha=8, group_size=64, name="proj")


def test_refuses_float_base() -> None:
    with pytest.raises(ConfigError, match="QA-LoRA needs an INT-N base layer"):
        inject_qalora(tiny_llama(), "all-linear", rank=4, alpha=8)


@pytest.mark.parametrize(
    "override,msg",
    [
        ({"bits": 5}, r"strategy.bits: INT-N supports bits in \[2, 3, 4, 8\], got 5"),
        ({"pooling": "max"}, "strategy.pooling: expected one of"),
        ({"merge": "16bit"}, "strategy.merge: expected one of"),
        ({"quantizer": "gptq"}, "strategy.quantizer: unknown INT-N quantizer"),
    ],
)
def test_strategy_config_refusals(override: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        build_strategy({"name": "qalora", **override})


def test_strategy_group_not_dividing_names_layer() -> None:
    strat = build_strategy({"name": "qalora", "group_size": 48})
    with pytest.raises(ConfigError, match="48 does not divide in_features=64 of layer 'model.layers.0"):
        quantize_backbone(tiny_llama(), strat.base_format())


def test_strategy_formula_and_param_count_on_model() -> None:
    strat = build_strategy({"name": "qalora", "bits": 2, "rank": 4})
    fmt = strat.base_format()
    assert fmt.method == "intn" and fmt.options["bits"] == 2 and fmt.options["group_size"] == 32
    assert strat.formula_bytes(1000, 10) == 2 / 8 * 1000 + 160
    model = tiny_llama()
    shapes = model_linear_shapes(model)
    quantize_backbone(model, fmt)
    strat.wrap(model)
    m = sum(p.numel() for _, p in strat.trainable_parameters(model))
    assert m == qalora_trainable_params(shapes, 4, 32)
    lora_model = tiny_llama()
    inject_lora(lora_model, "all-linear", 4, 8)
    assert sum(p.numel() for p in lora_model.parameters() if p.requires_grad) == lora_trainable_params(shapes, 4)


def test_param_count_llama7b_table2() -> None:
    assert round(lora_trainable_params(LLAMA_7B_SHAPES, 64) / 1e6, 1) == 159.9
    assert round(qalora_trainable_params(LLAMA_7B_SHAPES, 64, 32) / 1e6, 1) == 89.3
    assert llama_linear_shapes(64, 128, 1, num_heads=4, num_kv_heads=2)[1] == (64, 32)  # GQA k_proj
    with pytest.raises(ConfigError):
        qalora_trainable_params([(100, 10)], 8, 32)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_merged_for_eval_saves_reloads_same_outputs(tmp_path, pooling: str) -> None:
    strat = build_strategy({"name": "qalora", "bits": 3, "rank": 4, "alpha": 12, "pooling": pooling})
    model = tiny_llama(tie=True)
    quantize_backbone(model, strat.base_format())
    strat.wrap(model)
    randomize_adapters(model)
    ids = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
    merged = strat.merged_for_eval(model, tmp_path)
    for f in ("model.safetensors", "config.json", "intn_config.json"):
        assert (tmp_path / "merged_intn" / f).is_file()
    assert not qalora_layers(merged) and qalora_layers(model)  # the trained model is untouched
    with torch.no_grad():
        out = merged(ids).logits
    assert torch.allclose(out, unmerged, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax(-1), unmerged.argmax(-1))
    for n, layer in qalora_layers(model):
        assert torch.equal(merged.get_submodule(n).qweight, layer.base_layer.qweight)
        assert torch.equal(merged.get_submodule(n).scales, layer.base_layer.scales)
    fm = strat.final_metrics(model)
    assert fm["merged/model_bytes"] < fm["merged/model_bytes_16bit"]
    strat.save_artifacts(model, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_merge_none_returns_none(tmp_path) -> None:
    strat = build_strategy({"name": "qalora", "merge": "none"})
    assert strat.merged_for_eval(nn.Linear(2, 2), tmp_path) is None


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_training_moves_loss_and_merge_stays_exact(pooling: str) -> None:
    strat = build_strategy({"name": "qalora", "bits": 4, "rank": 4, "pooling": pooling})
    model = tiny_llama()
    quantize_backbone(model, strat.base_format())
    strat.wrap(model)
    model.train()
    opt = torch.optim.AdamW([p for _, p in strat.trainable_parameters(model)], lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 12))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = merge_and_unload(model)(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4)


TABLE1_CELLS = ["qalora_int4", "qalora_int3", "qalora_int2", "qlora_intn4", "qlora_intn3", "qlora_intn2", "qlora_16bit"]


@pytest.mark.parametrize("cell", TABLE1_CELLS)
def test_table1_cells_compose_and_validate(cell: str) -> None:
    from omegaconf import OmegaConf

    from lorabench.checks import validate
    from tests.helpers import compose_cfg

    cfg = compose_cfg("experiment=qalora_table1", f"+experiment/qalora_table1={cell}")
    OmegaConf.resolve(cfg)
    typed = validate(cfg)
    bits = int(cell[-1]) if cell[-1].isdigit() else None
    if cell.startswith("qalora"):
        assert (typed.name, typed.bits, typed.group_size, typed.merge) == ("qalora", bits, 32, "zeros")
    elif bits is not None:
        assert (typed.name, typed.merge, typed.merge_bits, typed.merge_group_size) == ("qlora", "intn", bits, 32)
    else:
        assert (typed.name, typed.merge) == ("qlora", "16bit")


def test_table1_sweep_lists_every_cell_and_three_seeds() -> None:
    from omegaconf import OmegaConf

    from tests.helpers import CONF

    exp = OmegaConf.load(CONF / "experiment" / "qalora_table1.yaml")
    params = exp.hydra.sweeper.params
    assert params["+experiment/qalora_table1"].split(",") == TABLE1_CELLS
    assert len(str(params.seed).split(",")) >= 3
    assert sorted(p.stem for p in (CONF / "experiment" / "qalora_table1").glob("*.yaml")) == sorted(TABLE1_CELLS)
