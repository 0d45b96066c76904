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

import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of the data a tensor shows: its storage, offset, shape and strides (a tied
    parameter seen from two modules, or the same view taken twice, gives one key). Tensors
    without real storage (meta, empty) fall back to the Python object's identity."""
    st = t.untyped_storage()
    if st.data_ptr() == 0:
        return ("obj", id(t))
    return (str(t.device), st.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def account_model(model: nn.Module) -> ModelBytes:
    """Walk every module once; count logical parameters, expected bytes and held tensors.

    A parameter or buffer reached from two modules (tied input/output embeddings) is
    counted once, in the first module that holds it.
    """
    base = quant = trainable = 0
    expected = 0.0
    held: list[torch.Tensor] = []
    seen: set[tuple] = set()
    for module in model.modules():
        fn = accounting_for(module)
        if fn is not None:
            lb = fn(module)
            base += lb.logical_params
            quant += lb.quantized_params
            expected += lb.expected_bytes
            held.extend(lb.tensors)
            seen.update(tensor_key(t) for t in lb.tensors if isinstance(t, torch.Tensor))
            continue
        for p in module.parameters(recurse=False):
            key = tensor_key(p)
            if key in seen:
                continue
            seen.add(key)
            held.append(p)
            if p.requires_grad:
                trainable += p.numel()
                # weight + grad + two AdamW moments in the parameter's dtype, + AdamW's fp32 step scalar
                expected += 4 * p.numel() * p.element_size() + ADAM_STEP_BYTES
            else:
                base += p.numel()
                expected += p.numel() * p.element_size()
        for b in module.buffers(recurse=False):
            key = tensor_key(b)
            if key in seen:
                continue
            seen.add(key)
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


def measured_breakdown(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """`measured_bytes` split by what holds each storage: trainable parameters, the frozen base
    (frozen weights, buffers, quantization state), gradients, optimizer state. Each storage counts
    once, in the first of those it appears in, so the four parts sum to `measured_bytes`."""
    acc = account_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts = {
        "trainable": trainable,
        "base": acc.held_tensors,
        "grad": [p.grad for p in model.parameters() if p.grad is not None],
        "optimizer": [v for state in (optimizer.state.values() if optimizer is not None else [])
                      for v in state.values() if isinstance(v, torch.Tensor)],
    }
    seen: set[tuple[str, int]] = set()
    out = {}
    for name, tensors in parts.items():
        fresh = [t for t in tensors if isinstance(t, torch.Tensor) and storage_key(t) not in seen]
        out[name] = storage_bytes(fresh)
        seen.update(k for k in map(storage_key, fresh) if k is not None)
    return out


def model_storages(model: nn.Module) -> set[tuple[str, int]]:
    """Storage keys of everything the model itself holds (parameters, buffers, quantization
    state): the tensors `measured_bytes` already counts."""
    tensors = [*model.parameters(), *model.buffers(), *account_model(model).held_tensors]
    return {k for k in (storage_key(t) for t in tensors) if k is not None}


def storage_key(t: torch.Tensor) -> Optional[tuple[str, int]]:
    """(device, data pointer) of a tensor's storage; None for tensors without data (meta, empty,
    sparse and other layouts without one storage)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return None if st.data_ptr() == 0 or st.nbytes() == 0 else (str(t.device), st.data_ptr())


def activation_bytes(model: nn.Module, step: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `step()` runs (a
    forward + backward closure), excluding the model's own parameters, buffers and
    quantization state (already in the measured bytes).

    Hand-written on `torch.autograd.graph.saved_tensors_hooks` (no library reports this).
    Each storage counts once however many operations save it or views of it. A storage
    counts again only after every saved tensor on it has died, i.e. when its address may be
    reused by a new allocation (a second micro-batch's activations are new storages). The
    hook keeps no reference, so the step's own memory profile is unchanged. Tensors saved
    inside `torch.utils.checkpoint` regions go through checkpoint's own hooks and are not
    seen here (checkpointing saves only the region's inputs, which are).
    """
    own = model_storages(model)
    live: dict[tuple[str, int], int] = {}  # storage -> saved tensor objects still alive on it
    total = 0

    def release(key: tuple[str, int]) -> None:
        live[key] -= 1
        if not live[key]:
            del live[key]

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = storage_key(t)
        if key is None or key in own:
            return t
        if key not in live:
            total += t.untyped_storage().nbytes()
        live[key] = live.get(key, 0) + 1
        finalizers.append(weakref.finalize(t, release, key))
        return t

    finalizers: list[weakref.finalize] = []
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for f in finalizers:  # tensors that outlive the step (inputs) leave no callback behind
            f.detach()
    return total


PEAK_RESET: set[str] = set()  # devices whose peak counter this process reset (peak_bytes trusts only these)
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing "5" resets the process's peak RSS (VmHWM)
PROC_STATUS = Path("/proc/self/status")  # Linux: VmHWM is the peak RSS since start or the last reset


def device_key(device: torch.device | str) -> str:
    """'cpu' or 'cuda:<index>' (a bare 'cuda' names the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def reset_peak(device: torch.device | str) -> bool:
    """Start the peak counter now; False where it cannot be reset (then `peak_bytes` is None).

    CUDA: `torch.cuda.reset_peak_memory_stats`. Linux CPU: write "5" to /proc/self/clear_refs,
    which sets the process's VmHWM (peak RSS) to its current RSS. Elsewhere (other OS, no
    permission) the CPU peak cannot be reset and would include earlier jobs of this process.
    """
    key = device_key(device)
    ok = False
    if key.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(key)
        ok = True
    elif key == "cpu" and sys.platform.startswith("linux"):
        try:
            PROC_CLEAR_REFS.write_text("5")
            ok = True
        except OSError:
            ok = False
    if ok:
        PEAK_RESET.add(key)
    else:
        PEAK_RESET.discard(key)
    return ok


def peak_bytes(device: torch.device | str) -> Optional[int]:
    """Peak bytes since the last successful `reset_peak(device)`: CUDA max allocated, or the
    process's peak RSS (VmHWM) on Linux CPU. None when no reset succeeded in this process:
    never a number that could include an earlier job's peak."""
    key = device_key(device)
    if key not in PEAK_RESET:
        return None
    if key.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(key))
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                return int(value) * 1024 if unit == "kB" else None
    except OSError:
        return None
    return None


def peak_reserved_bytes(device: torch.device | str) -> Optional[int]:
    """CUDA's peak reserved bytes (allocator cache included) since the last `reset_peak(device)`;
    None on CPU (RSS already counts what the allocator holds) or without a reset."""
    key = device_key(device)
    if key not in PEAK_RESET or not key.startswith("cuda"):
        return None
    return int(torch.cuda.max_memory_reserved(key))


PHASE_STEMS = {"load": "peak_load", "train": "peak", "merge": "peak_merge"}  # phase -> summary key stem


def phase_peaks(device: torch.device | str, phase: str) -> dict[str, Optional[int]]:
    """The phase's peak since the last reset, as summary keys: `memory/<stem>_bytes` (None where
    the counter cannot be reset) and, on CUDA, `memory/<stem>_reserved_bytes`."""
    stem = PHASE_STEMS[phase]
    out: dict[str, Optional[int]] = {f"memory/{stem}_bytes": peak_bytes(device)}
    reserved = peak_reserved_bytes(device)
    if reserved is not None:
        out[f"memory/{stem}_reserved_bytes"] = reserved
    return out
