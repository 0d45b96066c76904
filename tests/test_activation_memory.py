"""activation_bytes: what autograd saves for backward, by storage, checked against hand
counts; QA-LoRA's INT-N base keeps no dense weight for backward (within 5% of QLoRA)."""

from __future__ import annotations

import torch
from torch import nn

from lorabench.adapters.lora import lora_layers
from lorabench.memory import activation_bytes
from lorabench.quant.intn import IntNLinear
from tests.helpers import build_on_tiny


def chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(3, 8)


def test_linear_relu_chain_hand_count() -> None:
    """Saved: x (3×8) by the first addmm for W1's grad; the ReLU output (3×16), saved by ReLU
    and again by the second addmm, counted once; W2ᵀ (a view of a parameter) not counted.
    (96 + 192) B."""
    net, x = chain()
    assert activation_bytes(net, lambda: net(x).sum().backward()) == 3 * 8 * 4 + 3 * 16 * 4
    # an input that needs a gradient makes addmm save W1ᵀ too: a parameter, still not counted
    xg = x.clone().requires_grad_(True)
    assert activation_bytes(net, lambda: net(xg).sum().backward()) == 3 * 8 * 4 + 3 * 16 * 4


def test_two_micro_batches_count_each_new_storage() -> None:
    """The second forward's ReLU output is a new storage (counted again, even if it reuses a
    freed address); the input x is the same storage both times (counted once)."""
    net, x = chain()

    def two() -> None:
        for _ in range(2):
            net(x).sum().backward()

    assert activation_bytes(net, two) == 3 * 8 * 4 + 2 * 3 * 16 * 4


def test_nothing_saved_counts_zero_and_hooks_are_removed() -> None:
    net, x = chain()
    with torch.no_grad():
        assert activation_bytes(net, lambda: net(x)) == 0
    net(x).sum().backward()  # no hook left behind: a plain backward still works


def tiny_step(name: str, **keys: object) -> tuple[nn.Module, int]:
    """(model, activation bytes) of one forward+backward of a fixed batch, all-linear."""
    _, model = build_on_tiny(name, **keys)
    model.train()
    ids = torch.randint(0, 48, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss.backward())


def test_qalora_saves_no_dense_weight_and_stays_within_qlora() -> None:
    qalora, act = tiny_step("qalora")
    _, act_qlora = tiny_step("qlora")
    assert act <= 1.05 * act_qlora
    # the same model with the dense path (dequantize, then F.linear) saves every dequantized
    # fp32 weight whose input needs a gradient: all but layer 0's q/k/v (their input comes
    # from the frozen embedding and norm)
    ids = torch.randint(0, 48, (8, 32), generator=torch.Generator().manual_seed(0))
    dense = lambda self, x: nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)
    original = IntNLinear.forward
    IntNLinear.forward = dense
    try:
        act_dense = activation_bytes(qalora, lambda: qalora(input_ids=ids, labels=ids).loss.backward())
    finally:
        IntNLinear.forward = original
    weights = {n: 4 * m.in_features * m.out_features for n, m in qalora.named_modules() if isinstance(m, IntNLinear)}
    no_grad_input = [n for n in weights if n in {f"model.layers.0.self_attn.{p}_proj.base_layer" for p in "qkv"}]
    assert len(no_grad_input) == 3
    assert act_dense - act == sum(weights.values()) - sum(weights[n] for n in no_grad_input)


def test_qalora_dropout_after_pooling_stays_within_qlora() -> None:
    """Dropout on the pooled input (the default, official order) saves a mask L = in/g wide;
    PEFT's order saves it in wide. CPU dropout saves its fp32 mask only where x needs a
    gradient, so the two orders differ by 4 B · tokens · (in − in/g) summed over the adapted
    layers whose input needs one (all but layer 0's q/k/v, fed by the frozen embedding)."""
    qalora, after = tiny_step("qalora", dropout=0.1)
    _, before = tiny_step("qalora", dropout=0.1, dropout_position="before_pool")
    _, qlora = tiny_step("qlora", dropout=0.1)
    _, no_dropout = tiny_step("qalora")
    assert after <= 1.05 * qlora  # measured: 1,814,532 vs 3,655,684 B
    tokens = 8 * 32
    frozen_input = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    widths = [(m.in_features, m.variant.n_groups) for n, m in lora_layers(qalora) if n not in frozen_input]
    assert len(widths) == 2 * 7 - 3
    assert before - after == 4 * tokens * sum(i - L for i, L in widths)
    assert after - no_dropout == 4 * tokens * sum(L for _, L in widths)  # the L-wide masks themselves
