"""QA-LoRA: pooled adapter, zero-point merge exactness, save/reload, refusals, param counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.adapters.lora import inject_lora
from lorabench.adapters.lora import LoRALinear, merge_and_unload
from lorabench.adapters.qalora import QALoRAVariant, inject_qalora, load_qalora_adapter, qalora_layers
from lorabench.quant import quantize_backbone
from lorabench.quant.intn import IntNLinear
from lorabench.errors import ConfigError
from lorabench.memory import account_model, accounting_for, storage_bytes
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


@pytest.mark.parametrize("position", ["after_pool", "before_pool"])
def test_dropout_position_orders_pool_and_dropout(position: str) -> None:
    """after_pool: the mask is (…, in/g) and scales whole pooled groups; before_pool: PEFT's
    order, the mask is (…, in). Same seed, same mask draw, so each equals its hand formula."""
    base = intn_layer(g=32, in_f=96, out_f=40)
    layer = LoRALinear(base, 4, 12, dropout=0.5, variant=QALoRAVariant(base, "sum", dropout_position=position))
    nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(3, 7, 96)
    pool = lambda t: t.reshape(3, 7, 3, 32).sum(-1)
    torch.manual_seed(5)
    h = layer.variant.dropped_input(layer, x)
    torch.manual_seed(5)
    mask = torch.nn.functional.dropout(torch.ones(3, 7, 3 if position == "after_pool" else 96), 0.5)
    expected = pool(x) * mask if position == "after_pool" else pool(x * mask)
    assert h.shape == (3, 7, 3) and torch.allclose(h, expected, atol=1e-5, rtol=0)
    layer.eval()
    assert torch.equal(layer.variant.dropped_input(layer, x), pool(x))  # inference: no dropout, either order


U16 = 2.0**-11  # fp16's unit roundoff: |fp16(v) − v| ≤ U16·|v| for v in fp16's normal range


def merged_zeros(layer: LoRALinear) -> torch.Tensor:
    """z' = z − ΔW/s in fp32, before fp16 rounding."""
    with torch.no_grad():
        return layer.base_layer.zero_points() - layer.variant.pooled_delta(layer).t() / layer.base_layer.scales.float()


def merge_tolerance(zmax: float, bits: int, logits: torch.Tensor) -> float:
    """Merged vs unmerged logits. Holding z' in fp16 moves each weight by at most
    s·U16·|z'|, while a group's weights span s·2^N: a relative weight change of at most
    U16·max|z'|/2^N. The factor 8 lets that change accumulate through the model's 14
    INT-N linears (measured: at most 1.4× the relative change)."""
    return 8 * U16 * zmax / 2**bits * float(logits.abs().max())


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("bits,g", [(3, 32), (2, 16), (4, 64), (8, 32)])
def test_merge_into_zeros_is_exact_to_fp16_zeros(pooling: str, bits: int, g: int) -> None:
    model = quantized_llama(bits, g)
    inject_qalora(model, "all-linear", rank=4, alpha=12, pooling=pooling, merged_zeros="fp16")  # α/r = 3, g ≠ 1
    randomize_adapters(model)
    ids = torch.randint(0, 50, (2, 11))
    layers = dict(qalora_layers(model))
    q0 = {n: m.base_layer.qweight.clone() for n, m in layers.items()}
    s0 = {n: m.base_layer.scales.clone() for n, m in layers.items()}
    w0 = {n: m.base_layer.dequantize() for n, m in layers.items()}
    dw = {n: m.delta_weight() for n, m in layers.items()}
    z1 = {n: merged_zeros(m) for n, m in layers.items()}
    zmax = max(float(z.abs().max()) for z in z1.values())
    with torch.no_grad():
        base_logits = quantized_llama(bits, g)(ids).logits
        unmerged = model(ids).logits
        merged_model = merge_and_unload(copy.deepcopy(model))
        merged = merged_model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2  # the update matters, so a wrong factor would show
    assert float((merged - unmerged).abs().max()) <= merge_tolerance(zmax, bits, unmerged)
    assert not qalora_layers(merged_model)
    for n in layers:
        m = merged_model.get_submodule(n)
        assert isinstance(m, IntNLinear) and m.fractional_zeros and m.zeros.dtype == torch.float16
        assert torch.equal(m.qweight, q0[n]) and torch.equal(m.scales, s0[n])  # bitwise unchanged
        assert torch.equal(m.zeros, z1[n].half())  # z' computed in fp32, rounded once
        change = (m.dequantize() - w0[n]).view(m.out_features, m.n_groups, g)
        assert torch.allclose(change, change[..., :1].expand_as(change), atol=1e-6)  # constant per cell
        # the only error is the fp16 rounding of z': |ΔW_merged − ΔW| ≤ s·U16·|z'| per weight
        s_el = m.scales.float().t().repeat_interleave(g, 1)
        bound = s_el * U16 * z1[n].abs().t().repeat_interleave(g, 1)
        assert bool(((change.reshape(m.out_features, -1) - dw[n]).abs() <= bound + 1e-6).all())
    # the unmerged model with its base zeros moved by the same fp16 rounding (held in fp32)
    # computes the merged function: what remains is fp32 rounding only
    with torch.no_grad():
        for n, layer in layers.items():
            base = layer.base_layer
            base.qzeros, base.zeros = None, base.zero_points() + (z1[n].half().float() - z1[n])
        assert torch.allclose(model(ids).logits, merged, atol=2e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("bits,g", [(2, 32), (3, 32), (4, 64), (8, 16)])
def test_merge_into_fp32_zeros_equals_unmerged(pooling: str, bits: int, g: int) -> None:
    """The default: z' held in fp32 as computed, so the merged model is the unmerged one up to
    fp32 rounding (no term grows with |z'| as fp16's does)."""
    model = quantized_llama(bits, g)
    inject_qalora(model, "all-linear", rank=4, alpha=12, pooling=pooling)
    randomize_adapters(model)
    ids = torch.randint(0, 50, (2, 11))
    layers = dict(qalora_layers(model))
    z1 = {n: merged_zeros(m) for n, m in layers.items()}
    dw = {n: m.delta_weight() for n, m in layers.items()}
    w0 = {n: m.base_layer.dequantize() for n, m in layers.items()}
    with torch.no_grad():
        base_logits = quantized_llama(bits, g)(ids).logits
        unmerged = model(ids).logits
        merged_model = merge_and_unload(copy.deepcopy(model))
        merged = merged_model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-2
    assert float((merged - unmerged).abs().max()) <= 2e-5 * float(unmerged.abs().max())
    for n in layers:
        m = merged_model.get_submodule(n)
        assert m.zero_layout == "fp32" and torch.equal(m.zeros, z1[n])  # held as computed
        # per weight: s·(q − z') − s·(q − z) = ΔW to fp32 rounding of the values involved
        s_el = m.scales.float().t().repeat_interleave(g, 1)
        z_el = z1[n].abs().t().repeat_interleave(g, 1)
        bound = 4 * 2.0**-24 * s_el * (z_el + 2**bits)
        assert bool(((m.dequantize() - w0[n] - dw[n]).abs() <= bound).all())


@pytest.mark.parametrize("merged", ["fp32", "fp16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bytes_before_and_after_merge(bits: int, merged: str) -> None:
    """Before: codes N/8 B + fp16 scale and N-bit zero per 32 weights; after: fp32 (4 B) or fp16 (2 B) zeros."""
    model = quantized_llama(bits, 32)
    inject_qalora(model, "all-linear", rank=4, alpha=8, merged_zeros=merged)
    randomize_adapters(model)
    n_q = 2 * (4 * 64 * 64 + 3 * 64 * 128)

    def intn_bytes(m: nn.Module) -> tuple[float, int]:
        layers = [x for x in m.modules() if isinstance(x, IntNLinear)]
        expected = sum(accounting_for(x)(x).expected_bytes for x in layers)
        held = storage_bytes(t for x in layers for t in x.buffers())
        return expected, held

    before = bits / 8 + 2 / 32 + bits / 8 / 32
    after = bits / 8 + 2 / 32 + {"fp32": 4, "fp16": 2}[merged] / 32
    assert intn_bytes(model) == (n_q * before, n_q * before)
    merge_and_unload(model)
    assert intn_bytes(model) == (n_q * after, n_q * after)
    acc = account_model(model)
    assert acc.base_quantized == n_q and acc.expected_bytes == storage_bytes(acc.held_tensors)


@pytest.mark.parametrize("merged", ["fp32", "fp16"])
def test_unmerge_restores_packed_integer_zeros_bitwise(merged: str) -> None:
    model = quantized_llama(4, 32)
    inject_qalora(model, "all-linear", rank=4, alpha=12, merged_zeros=merged)
    randomize_adapters(model)
    before = {n: m.base_layer.qzeros.clone() for n, m in qalora_layers(model)}
    for _, m in qalora_layers(model):
        m.merge()
        assert m.base_layer.fractional_zeros
        m.unmerge()
    for n, m in qalora_layers(model):
        assert not m.base_layer.fractional_zeros and torch.equal(m.base_layer.qzeros, before[n])


def test_refuses_pooling_group_different_from_quantization_group() -> None:
    model = quantized_llama(g=32)
    with pytest.raises(ConfigError, match="pooling group 16 differs from the quantization group 32 of layer 'model.layers.0.self_attn.q_proj'"):
        inject_qalora(model, "all-linear", rank=4, alpha=8, group_size=16)
    assert not qalora_layers(model)  # refused before wrapping anything


def test_refuses_group_not_dividing_in_features() -> None:
    with pytest.raises(ConfigError, match=r"pooling group 64 does not divide in_features=96 of layer 'proj'"):
        qalora_linear(intn_layer(g=32, in_f=96), rank=4, alpha=8, group_size=64, name="proj")


def test_refuses_float_base() -> None:
    with pytest.raises(ConfigError, match="has no INT-N base .*add it to strategy.quantize_modules"):
        inject_qalora(tiny_llama(), "all-linear", rank=4, alpha=8)


@pytest.mark.parametrize(
    "override,msg",
    [
        ({"bits": 5}, r"strategy.bits: INT-N supports bits in \[2, 3, 4, 8\], got 5"),
        ({"pooling": "max"}, "strategy.pooling: expected one of"),
        ({"merge": "16bit"}, "strategy.merge: expected one of"),
        ({"quantizer": "gptq"}, "strategy.quantizer: unknown INT-N quantizer"),
        ({"merged_zeros": "bf16"}, r"^strategy.merged_zeros: expected one of \['fp32', 'fp16'\], got 'bf16'$"),
        ({"dropout_position": "after_a"}, r"^strategy.dropout_position: expected one of \['after_pool', 'before_pool'\], got 'after_a'$"),
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


@pytest.mark.parametrize("pooling,zeros", [("mean", "fp32"), ("sum", "fp32"), ("sum", "fp16")])
def test_merged_for_eval_saves_reloads_same_outputs(tmp_path, pooling: str, zeros: str) -> None:
    strat = build_strategy({"name": "qalora", "bits": 3, "rank": 4, "alpha": 12, "pooling": pooling,
                            "merged_zeros": zeros})
    model = tiny_llama(tie=True)
    quantize_backbone(model, strat.base_format())
    strat.wrap(model)
    randomize_adapters(model)
    ids = torch.randint(0, 50, (3, 10))
    zmax = max(float(merged_zeros(m).abs().max()) for _, m in qalora_layers(model))
    with torch.no_grad():
        unmerged = model(ids).logits
        in_memory = strat.merge_to_intn(model)
    merged = strat.merged_for_eval(model, tmp_path)
    for f in ("model.safetensors", "config.json", "intn_config.json"):
        assert (tmp_path / "merged_intn" / f).is_file()
    meta = json.loads((tmp_path / "merged_intn" / "intn_config.json").read_text())
    assert {spec["zeros"] for spec in meta["layers"].values()} == {zeros} and meta["merged_zeros"] == zeros
    assert not qalora_layers(merged) and qalora_layers(model)  # the trained model is untouched
    for (k, a), (k2, b) in zip(in_memory.state_dict().items(), merged.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)  # the file holds the merge exactly
    with torch.no_grad():
        out = merged(ids).logits
    tol = merge_tolerance(zmax, 3, unmerged) if zeros == "fp16" else 2e-5 * float(unmerged.abs().max())
    assert float((out - unmerged).abs().max()) <= tol
    assert torch.equal(out.argmax(-1), unmerged.argmax(-1))
    for n, layer in qalora_layers(model):
        assert torch.equal(merged.get_submodule(n).qweight, layer.base_layer.qweight)
        assert torch.equal(merged.get_submodule(n).scales, layer.base_layer.scales)
    # merged/model_bytes: the reloaded merged model's weights (tied embedding once), INT-N state
    # with float zeros; computed buffers (rotary inv_freq) are not part of the model's size
    fm = strat.final_metrics(model)
    intn_state = [t for m in merged.modules() if isinstance(m, IntNLinear) for t in m.buffers()]
    assert fm["merged/model_bytes"] == storage_bytes([*merged.parameters(), *intn_state])
    packed = sum(l.base_layer.n_groups * (l.out_features // 8) * 3 for _, l in qalora_layers(model))
    width = {"fp32": 4, "fp16": 2}[zeros]
    floats = sum(width * l.base_layer.n_groups * l.out_features for _, l in qalora_layers(model))
    adapters = storage_bytes(p for _, l in qalora_layers(model) for p in (l.lora_A.weight, l.lora_B.weight))
    unmerged_state = [t for _, l in qalora_layers(model) for t in l.base_layer.buffers()]
    unmerged_bytes = storage_bytes([*model.parameters(), *unmerged_state]) - adapters
    assert fm["merged/model_bytes"] == unmerged_bytes - packed + floats
    n_logical = sum(p.numel() for p in merged.parameters()) + sum(
        m.in_features * m.out_features for m in merged.modules() if isinstance(m, IntNLinear))
    assert fm["merged/model_bytes_16bit"] == 2 * n_logical


def test_adapter_is_written_in_its_own_format_and_reloads(tmp_path) -> None:
    """Not PEFT's `use_qalora` (PEFT pools as mean × in/g): format lorabench-qalora, no
    peft_type, the equation spelled out; loading the tensors into a fresh wrapped model gives
    the same logits."""
    strat = build_strategy({"name": "qalora", "bits": 4, "rank": 4, "alpha": 12, "pooling": "sum"})
    model = tiny_llama()
    quantize_backbone(model, strat.base_format())
    strat.wrap(model)
    randomize_adapters(model)
    strat.save_artifacts(model, tmp_path)
    assert (tmp_path / "final_state.pt").is_file()  # the base class's artifact is kept
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["format"] == "lorabench-qalora" and "peft_type" not in cfg and "use_qalora" not in cfg
    assert (cfg["pooling"], cfg["group_size"], cfg["bits"], cfg["r"], cfg["lora_alpha"], cfg["scaling"]) == (
        "sum", 32, 4, 4, 12.0, 3.0)
    assert "pool(x)[l] = sum_{i = l*g .. l*g+g-1} x[i]" in cfg["forward"] and "(lora_alpha / r)" in cfg["forward"]
    assert cfg["dropout_position"] == "after_pool" and "lora_dropout applies after pooling" in cfg["forward"]
    assert len(cfg["layers"]) == 14
    fresh_strat = build_strategy({"name": "qalora", "bits": 4, "rank": 4, "alpha": 12, "pooling": "sum"})
    fresh = tiny_llama()
    quantize_backbone(fresh, fresh_strat.base_format())
    fresh_strat.wrap(fresh)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(fresh(ids).logits, model(ids).logits)
        load_qalora_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    # an adapter trained with another pooling is refused, in one line naming the file
    mean_strat = build_strategy({"name": "qalora", "bits": 4, "rank": 4, "alpha": 12, "pooling": "mean"})
    other = tiny_llama()
    quantize_backbone(other, mean_strat.base_format())
    mean_strat.wrap(other)
    with pytest.raises(ConfigError, match=r"adapter_config.json: pooling is 'sum', layer 'model.layers.0.self_attn.q_proj' has 'mean'"):
        load_qalora_adapter(other, tmp_path / "adapter")


def test_merge_none_returns_none(tmp_path) -> None:
    strat = build_strategy({"name": "qalora", "merge": "none"})
    assert strat.merged_for_eval(nn.Linear(2, 2), tmp_path) is None
    assert strat.final_metrics(nn.Linear(2, 2)) == {}  # no merged model: no merged bytes


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
        zmax = max(float(merged_zeros(m).abs().max()) for _, m in qalora_layers(model))
        merged = merge_and_unload(model)(ids).logits
    assert float((merged - unmerged).abs().max()) <= merge_tolerance(zmax, 4, unmerged)


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
    hqq = [f"{c}_hqq" for c in TABLE1_CELLS if c != "qlora_16bit"]  # the same cells with HQQ codes (qalora_table1_smollm2)
    assert sorted(p.stem for p in (CONF / "experiment" / "qalora_table1").glob("*.yaml")) == sorted(TABLE1_CELLS + hqq)


def test_quantized_set_is_the_decoder_and_targets_must_be_inside_it() -> None:
    """QA-LoRA quantizes every decoder linear whatever target_modules says (as the paper);
    a target left in float is refused in one line (the zero-point merge needs INT-N)."""
    from lorabench.quant.intn import IntNLinear
    from lorabench.surgery import find_target_linears
    from tests.helpers import build_on_tiny

    _, model = build_on_tiny("qalora", target_modules=["q_proj", "v_proj"], rank=4, alpha=8.0)
    intn = {n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, IntNLinear)}
    assert intn == set(find_target_linears(tiny_llama(), "all-linear"))
    assert len(qalora_layers(model)) == 2 * 2  # adapters only on q and v of 2 blocks
    with pytest.raises(ConfigError, match="has no INT-N base .*add it to strategy.quantize_modules") as e:
        build_on_tiny("qalora", quantize_modules=["k_proj"], target_modules=["q_proj"], rank=4, alpha=8.0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_short_run_merged_scores_as_unmerged_with_fp32_zeros(tmp_path, bits: int) -> None:
    """A few trained steps on the tiny job, then the merge the job scores (saved, reloaded):
    with fp32 zeros the eval (exact match, loss) is the unmerged one and every eval logit is
    within 1e-4; fp16 zeros on the same adapter move the logits more."""
    from tests.helpers import tiny_trainer

    trainer = tiny_trainer(None, "strategy=qalora", f"strategy.bits={bits}", "strategy.lr=1e-2")
    for _ in range(6):
        trainer.train_step()
    model = trainer.model.eval()
    batches = [b for b, _ in trainer.data.eval_batches(16)]

    def logits(m: nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]

    unmerged, un_eval = logits(model), trainer.evaluate(model)
    gaps = {}
    for zeros in ("fp32", "fp16"):
        trainer.strategy.cfg.merged_zeros = zeros
        for _, layer in qalora_layers(model):
            layer.variant.merged_zeros = zeros
        merged = trainer.strategy.merged_for_eval(model, tmp_path / zeros)
        assert {m.zero_layout for m in merged.modules() if isinstance(m, IntNLinear)} == {zeros}
        gaps[zeros] = max(float((a - b).abs().max()) for a, b in zip(logits(merged), unmerged))
        if zeros == "fp32":
            ev = trainer.evaluate(merged)
            assert ev["accuracy"] == un_eval["accuracy"] and abs(ev["loss"] - un_eval["loss"]) <= 1e-5
    assert gaps["fp32"] <= 1e-4 and gaps["fp32"] < gaps["fp16"]
