"""Trainable-parameter counts from layer shapes alone (no model, no weights).

LoRA on a (in → out) linear trains r·(in + out); QA-LoRA's A sees in/g pooled features, so it
trains r·(in/g + out). For LLaMA-7B, r = 64 on all seven projections: ≈159.9M vs ≈89.3M at
g = 32 (QA-LoRA paper, Table 2).
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from lorabench.surgery import find_target_linears
from lorabench.errors import ConfigError

Shape = tuple[int, int]  # (in_features, out_features)


def llama_linear_shapes(
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
) -> list[Shape]:
    """(in, out) of the seven projections of every decoder block (q, k, v, o, gate, up, down)."""
    kv_out = hidden_size
    if num_heads and num_kv_heads:
        kv_out = hidden_size // num_heads * num_kv_heads  # grouped-query attention
    block = [
        (hidden_size, hidden_size),  # q_proj
        (hidden_size, kv_out),  # k_proj
        (hidden_size, kv_out),  # v_proj
        (hidden_size, hidden_size),  # o_proj
        (hidden_size, intermediate_size),  # gate_proj
        (hidden_size, intermediate_size),  # up_proj
        (intermediate_size, hidden_size),  # down_proj
    ]
    return block * num_layers


LLAMA_7B_SHAPES: list[Shape] = llama_linear_shapes(4096, 11008, 32)


def lora_trainable_params(shapes: Iterable[Shape], rank: int) -> int:
    """Σ r·(in + out): A is r × in, B is out × r."""
    return sum(rank * (i + o) for i, o in shapes)


def qalora_trainable_params(shapes: Iterable[Shape], rank: int, group_size: int) -> int:
    """Σ r·(in/g + out): A is r × (in/g), B is out × r. Refuses a g that does not divide in."""
    total = 0
    for i, o in shapes:
        if i % group_size:
            raise ConfigError(f"group_size: {group_size} does not divide in_features={i}")
        total += rank * (i // group_size + o)
    return total


def model_linear_shapes(model: nn.Module, target_modules: object = "all-linear") -> list[Shape]:
    """(in, out) of the linears a strategy would target in `model`."""
    return [
        (m.in_features, m.out_features)
        for m in (model.get_submodule(n) for n in find_target_linears(model, target_modules))
    ]
