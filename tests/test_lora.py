"""LoRA layer invariants, checked with numbers (and against HF PEFT's LoRA layer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lorabench.adapters.lora import LoRALinear, inject_lora, lora_layers, merge_and_unload
from lorabench.errors import ConfigError
from tests.helpers import tiny_llama as make_llama


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return make_llama(seed, vocab=50, heads=2).eval()


def randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)


def test_zero_b_gives_exactly_the_base_output() -> None:
    model = tiny_llama()
    ids = torch.randint(3, 50, (2, 12))
    base = model(ids).logits
    inject_lora(model, "all-linear", rank=4, alpha=8)
    assert torch.equal(model(ids).logits, base)


def test_all_linear_targets_every_block_linear_but_not_lm_head() -> None:
    model = tiny_llama()
    names = inject_lora(model, "all-linear", rank=4, alpha=8)
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    assert not any("lm_head" in n for n in names)
    names_qv = inject_lora(tiny_llama(), ["q_proj", "v_proj"], rank=4, alpha=8)
    assert len(names_qv) == 4


def test_targets_matching_nothing_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"strategy.target_modules: \['nope'\] matched no linear"):
        inject_lora(tiny_llama(), ["nope"], rank=4, alpha=8)


def test_merge_equals_unmerged_forward_and_unmerge_restores_w() -> None:
    model = tiny_llama()
    ids = torch.randint(3, 50, (2, 12))
    inject_lora(model, "all-linear", rank=4, alpha=12)
    randomize_b(model)
    unmerged = model(ids).logits
    w0 = {n: l.base_layer.weight.clone() for n, l in lora_layers(model)}
    for _, layer in lora_layers(model):
        layer.merge()
    merged = model(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)
    changed = sum(not torch.equal(w0[n], l.base_layer.weight) for n, l in lora_layers(model))
    assert changed == len(w0)  # the merge really wrote into W
    for _, layer in lora_layers(model):
        layer.unmerge()
    for n, layer in lora_layers(model):
        assert torch.allclose(layer.base_layer.weight, w0[n], atol=1e-6)
    assert torch.allclose(model(ids).logits, unmerged, atol=1e-5)


def test_merge_and_unload_leaves_plain_linears() -> None:
    model = tiny_llama()
    ids = torch.randint(3, 50, (1, 10))
    inject_lora(model, "all-linear", rank=4, alpha=8)
    randomize_b(model)
    before = model(ids).logits
    merge_and_unload(model)
    assert not lora_layers(model)
    assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_only_adapter_parameters_get_gradients() -> None:
    model = tiny_llama().train()
    inject_lora(model, "all-linear", rank=4, alpha=8, dropout=0.1)
    ids = torch.randint(3, 50, (2, 12))
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert len(with_grad) == 2 * 2 * 7  # A and B of 14 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(with_grad)


def test_init_bounds_dtype_and_scaling() -> None:
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, rank=8, alpha=16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in=64
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == 2.0
    assert LoRALinear(base, rank=16, alpha=16, rslora=True).scaling == pytest.approx(4.0)
    bf16 = LoRALinear(nn.Linear(64, 32).to(torch.bfloat16), rank=4, alpha=4)
    assert bf16.lora_A.weight.dtype == torch.float32  # adapters stay fp32 over a bf16 base
    assert bf16(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_matches_peft_lora_layer(rslora: bool) -> None:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    ours = LoRALinear(base, rank=8, alpha=24, rslora=rslora)
    config = LoraConfig(r=8, lora_alpha=24, use_rslora=rslora)
    peft_layer = PeftLinear(base, adapter_name="default", config=config, r=8, lora_alpha=24, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])
    x = torch.randn(3, 5, 64)
    assert torch.allclose(ours(x), peft_layer(x), atol=1e-6)


def test_seed_gives_pefts_initialisation() -> None:
    """Modules are created in PEFT's order, so the same seed gives the same A."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = nn.Linear(64, 48)
    torch.manual_seed(7)
    ours = LoRALinear(base, rank=8, alpha=16)
    torch.manual_seed(7)
    theirs = PeftLinear(base, adapter_name="default", config=LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)


def test_dropout_applies_to_the_adapter_input_only() -> None:
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, rank=4, alpha=4, dropout=0.9).train()
    x = torch.randn(4, 16)
    # With B = 0 the output is the base output whatever the dropout mask.
    assert torch.equal(layer(x), base(x))
