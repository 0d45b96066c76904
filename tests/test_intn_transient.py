"""Transient memory of one INT-N layer's forward + backward, against bitsandbytes' Linear4bit
measured the same way: the unpack works in uint8 and dequantizes a block of rows at a time,
so the peak is the dense W in the compute dtype plus one block, never an int64 or full-size
code tensor (docs/qalora.md#base-group-wise-asymmetric-int-n)."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorabench.quant.bnb4bit import to_linear4bit
from lorabench.quant.intn import DEQUANT_CHUNK, FLOAT_ZEROS, IntNLinear


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that operations create while the mode is on, each
    counted once from its creation until the last tensor on it dies. Exact and
    machine-independent (sizes are what the ops ask for, not what an allocator rounds to);
    blind to scratch memory inside one kernel (BLAS workspaces), alike for both layers.
    Hand-written: torch's profiler reports allocations per event, not a live peak."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage address -> live tensor objects on it
        self.bytes: dict[int, int] = {}  # storage address -> its size
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.tensors[key] -= 1
        if not self.tensors[key]:
            del self.tensors[key]
            self.current -= self.bytes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.tensors:  # a new storage (a view of a tensor made outside the mode is not)
                if key in storage_keys((args, kwargs)):
                    continue
                self.tensors[key] = 0
                self.bytes[key] = t.untyped_storage().nbytes()
                self.current += self.bytes[key]
                self.peak = max(self.peak, self.current)
            self.tensors[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def storage_keys(tree: Any) -> set[int]:
    """Addresses of the storages under the tensors of a pytree (an op's inputs)."""
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


def peak_bytes(step: Callable[[], Any]) -> int:
    with LiveBytes() as mode:
        step()
    return mode.peak


def test_live_bytes_hand_count() -> None:
    """Three allocations, one freed before the third: peak = the two largest live together."""
    a = torch.ones(10)

    def step() -> None:
        b = a * 2  # 40 B
        c = torch.zeros(100, dtype=torch.uint8)  # 100 B, live with b: 140
        del b
        d = torch.zeros(30, dtype=torch.float64)  # 240 B, live with c: 340
        c.add_(1)  # in place: no new storage
        e = d[:10]  # a view: no new storage
        del c, d, e

    assert peak_bytes(step) == 340


def layer_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer(x).sum().backward()
    return step


N, TOKENS = 2048, 16  # one 2048 × 2048 layer, 16 tokens


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(N, N, bias=False)


@pytest.fixture(scope="module")
def bnb_peak(linear: nn.Linear) -> dict[torch.dtype, int]:
    """bitsandbytes NF4 (block 64, double quant: the qlora defaults) in the same compute dtype,
    same weights, same input, measured the same way."""
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(TOKENS, N, dtype=dtype, requires_grad=True)
        peaks[dtype] = peak_bytes(layer_step(to_linear4bit(linear, compute_dtype=dtype), x))
    return peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_transient_peak_per_layer_at_most_bitsandbytes(
    linear: nn.Linear, bnb_peak: dict[torch.dtype, int], bits: int, dtype: torch.dtype
) -> None:
    """The peak, by hand: W in x's dtype, plus one block of `rows` rows being unpacked (its
    uint8 codes and its zero points, L × rows uint8), plus the loss gradient's two scalars.
    In fp32 the block is dequantized inside W, while two of the eight uint8 code slices
    (an eighth of the block each) are live; in bf16 it is dequantized in an fp32 copy
    (4 B per weight of the block) and rounded into W. The same at every width."""
    x = torch.randn(TOKENS, N, dtype=dtype, requires_grad=True)
    ours = peak_bytes(layer_step(IntNLinear.from_linear(linear, bits, 32), x))
    e = x.element_size()
    rows = DEQUANT_CHUNK // N
    block = rows * N
    zeros = (N // 32) * rows
    extra = 2 * block // 8 if dtype == torch.float32 else 4 * block
    assert ours == e * N * N + block + zeros + extra + 2 * e
    assert ours <= bnb_peak[dtype]  # fp32: 4.040 vs 4.063 B per weight; bf16: 2.157 vs 6.000


def test_transient_beyond_w_is_one_block_at_every_layer_size() -> None:
    """Beyond W, the same bytes at every layer size: one block (rows · in = DEQUANT_CHUNK
    codes), not a multiple of the matrix as a full-size unpack would be."""
    torch.manual_seed(0)
    beyond = set()
    for n in (512, 1024, 2048):  # n ≥ DEQUANT_CHUNK / n: a block is whole rows, not the whole matrix
        layer = IntNLinear.from_linear(nn.Linear(n, n, bias=False), 4, 32)
        x = torch.randn(TOKENS, n, requires_grad=True)
        beyond.add(peak_bytes(layer_step(layer, x)) - 4 * n * n)
    assert beyond == {DEQUANT_CHUNK + DEQUANT_CHUNK // 32 + 2 * DEQUANT_CHUNK // 8 + 8}


def reference_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes the plain way: each 8-code chunk read as one little-endian int64 word."""
    b = packed.to(torch.int64).view(packed.shape[0], -1, bits)
    word = (b << (torch.arange(bits) * 8)).sum(-1)
    q = (word.unsqueeze(-1) >> (torch.arange(8) * bits)) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zeros", ["packed", "fp16", "fp32"])
def test_blockwise_dequantize_is_bitwise_the_dense_formula(bits: int, zeros: str) -> None:
    """Several blocks and a partial last one (out = 3·rows + 44), rows and zero-point rows
    that pad their last 8-code chunk (in = 612, out not multiples of 8; g = 36): W, the
    forward and the input gradient equal `(q − z)·s` computed densely in fp32, bit for bit,
    in fp32 and rounded once to bf16."""
    in_f, g = 612, 36
    out_f = 3 * (DEQUANT_CHUNK // in_f // 8 * 8) + 44
    torch.manual_seed(bits)
    layer = IntNLinear.from_linear(nn.Linear(in_f, out_f, bias=False), bits, g)
    if zeros != "packed":
        layer.set_fractional_zeros(layer.zero_points() + torch.randn(in_f // g, out_f), FLOAT_ZEROS[zeros])
    q = reference_unpack(layer.qweight, bits, in_f)
    assert torch.equal(layer.codes(), q)
    z = reference_unpack(layer.qzeros, bits, out_f).float() if zeros == "packed" else layer.zeros.float()
    dense = ((q.float().view(out_f, -1, g) - z.t().unsqueeze(-1)) * layer.scales.float().t().unsqueeze(-1)).view(out_f, in_f)
    assert torch.equal(layer.dequantize(), dense)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        assert torch.equal(y, x @ dense.to(dtype).t())
        assert torch.equal(x.grad, torch.ones_like(y) @ dense.to(dtype))
