"""Memory, three ways: the seed formula, the expected bytes, and the measured bytes.

- formula: the papers' back-of-envelope (4N+16M, 0.5N+16M, 16N) — from the strategy.
- expected: from each tensor's real dtype and shape, quantization constants included.
- measured: bytes of every distinct tensor really held (weights with their quantization
  state, gradients, optimizer state), counted by storage so that shared tensors count once.
Quantized layer types register an accounting function (`register_accounting`) because
their parameters hide their logical size (bnb's Params4bit.numel() is half the weights)
and their constants live outside `named_parameters()` (quant_state).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from lorabench.registry import Registry


@dataclass
class LayerBytes:
    """What a quantized module holds directly (not its children)."""

    logical_params: int  # weights it represents (a 4-bit matrix counts every element)
    quantized_params: int  # of those, how many are stored quantized
    expected_bytes: float  # from the format's definition (bits/param + constants)
    tensors: list[torch.Tensor] = field(default_factory=list)  # every tensor it really holds


ADAM_STEP_BYTES = 4  # torch AdamW keeps a float32 `step` tensor per parameter tensor
Accounting = Callable[[nn.Module], LayerBytes]
ACCOUNTING: Registry[Accounting] = Registry("memory accounting", "memory")


def register_accounting(cls: type) -> Callable[[Accounting], Accounting]:
    """Decorator: how to count a quantized module type's own parameters and constants."""
    return ACCOUNTING.register(cls)


def accounting_for(module: nn.Module) -> Optional[Accounting]:
    """The registered accounting of `module`'s type (or a base class), None for plain modules."""
    return ACCOUNTING.for_type(type(module))


@dataclass
class ModelBytes:
    base_params: int  # logical frozen (or all, for full FT) parameters N
    base_quantized: int  # of the base parameters, how many are stored quantized
    trainable_params: int  # M
    expected_bytes: float
    held_tensors: list[torch.Tensor]


def account_model(model: nn.Module) -> ModelBytes:
    """Walk every module once; count logical parameters, expected bytes and held tensors."""
    base = quant = trainable = 0
    expected = 0.0
    held: list[torch.Tensor] = []
    for module in model.modules():
        fn = accounting_for(module)
        if fn is not None:
            lb = fn(module)
            base += lb.logical_params
            quant += lb.quantized_params
            expected += lb.expected_bytes
            held.extend(lb.tensors)
            continue
        for p in module.parameters(recurse=False):
            held.append(p)
            if p.requires_grad:
                trainable += p.numel()
                # weight + grad + two AdamW moments in the parameter's dtype, + AdamW's fp32 step scalar
                expected += 4 * p.numel() * p.element_size() + ADAM_STEP_BYTES
            else:
                base += p.numel()
                expected += p.numel() * p.element_size()
        for b in module.buffers(recurse=False):
            held.append(b)
            expected += b.numel() * b.element_size()
    return ModelBytes(base, quant, trainable, expected, held)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of distinct storages' sizes, so views and shared (tied) tensors count once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def measured_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of every tensor really held: weights (+ quantization state), grads, optimizer state."""
    acc = account_model(model)
    tensors: list[torch.Tensor] = list(acc.held_tensors)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


def reset_peak(device: torch.device) -> None:
    """Start the peak counter at job start (CUDA only; CPU peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
