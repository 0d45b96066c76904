"""Quantize while loading: a safetensors checkpoint becomes a quantized backbone one linear at a time.

Loading the float model and then quantizing it holds the whole float model at once, so a
4-bit job's peak memory is the float model's. Here the model is built on the meta device
(accelerate's `init_empty_weights`; buffers such as the rotary frequencies stay real), the
tensors that stay float (embeddings, norms, the output head) are read from the checkpoint,
and every target linear is replaced by a `LazyLinear` whose weight is read from disk when
the format's registered quantizer asks for it. The quantizer is the same function, called
the same way, as on a loaded float model, so the quantized layers are bit-identical; only
one float linear is alive at a time. Hand-written because transformers' own
quantize-on-load (`BitsAndBytesConfig`) covers its formats only, not the registered ones here.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, quantizer_for
from lorabench.surgery import find_target_linears, replace_module

log = logging.getLogger(__name__)
SINGLE_FILE = "model.safetensors"  # transformers' name for an unsharded checkpoint
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor → shard map


# safetensors dtype names -> torch dtypes (the format's spec; the ones torch holds)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read one at a time.

    Each file is checked once with the safetensors library (a truncated or foreign file is one
    ConfigError line naming it); tensors are then read with plain file reads at the offsets its
    header gives. Hand-written because safetensors' own reader memory-maps the whole file for
    every tensor it returns and keeps the map until that tensor is garbage-collected: the pages
    read count in the process's resident set, so the peak RSS of a quantize-while-loading pass
    varied from 0.2 to 0.5 GB on SmolLM2 with the collector's timing. A read copies exactly one
    tensor into memory the process owns.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(f"model: {index} is not a safetensors index ({type(e).__name__}: {e})") from None
            self.files = {name: directory / f for name, f in weight_map.items()}
        else:
            single = directory / SINGLE_FILE
            self.files = {name: single for name in self._header(single)[0]}
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}

    @staticmethod
    def available(directory: Path) -> bool:
        """Whether `directory` holds a safetensors checkpoint (else the caller loads it another way)."""
        return (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()

    @staticmethod
    def _header(path: Path) -> tuple[dict[str, Any], int]:
        """(tensor name -> {dtype, shape, data_offsets}, where the data starts), after safetensors
        itself has checked the file (its header covers the file exactly)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")  # the format: u64 header length, JSON header, data
                header = json.loads(f.read(n))
        except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError)
            raise ConfigError(
                f"model: cannot read weights file {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "expected a complete safetensors file"
            ) from None
        header.pop("__metadata__", None)
        return header, 8 + n

    def keys(self) -> set[str]:
        return set(self.files)

    def tensor(self, name: str, dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
        """Tensor `name`, as a fresh tensor on `device`; floating tensors cast to `dtype` (when given)."""
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = self._header(path)
        header, start = self._headers[path]
        entry = header.get(name)
        if entry is None or entry.get("dtype") not in ST_DTYPES:
            raise ConfigError(f"model: weights file {path} has no readable tensor '{name}' (index and file disagree)")
        begin, end = entry["data_offsets"]
        nbytes = end - begin
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
        if got != nbytes:
            raise ConfigError(f"model: weights file {path} ends inside tensor '{name}'; expected a complete safetensors file")
        t = buf.view(ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`; nothing elsewhere).

    Hand-written because no library exposes it. Quantizing one linear after another frees a
    float weight and its temporaries between small quantized tensors that stay; glibc keeps
    those freed pages, so without this the resident set grew by ~0.3 GB over SmolLM2's 210
    linears, by an amount that changed from run to run (0.61 to 0.99 GB peak RSS; with it 0.62).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class LazyLinear(nn.Linear):
    """An nn.Linear whose weight and bias are read from the checkpoint on every access, never kept.

    A quantizer reads `.weight` once per layer and replaces the module, so the float weight
    lives only while that layer is quantized. nn.Linear's own __init__ is skipped: it would
    allocate the weight this class exists to avoid.
    """

    def __init__(self, reader: CheckpointReader, prefix: str, like: nn.Linear,
                 dtype: torch.dtype, device: torch.device) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = like.in_features, like.out_features
        self._reader, self._prefix, self._dtype, self._device = reader, prefix, dtype, device
        self._has_bias = like.bias is not None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        release_free_heap()  # the previous layer's float weight and temporaries are free by now
        return self._reader.tensor(f"{self._prefix}.weight", self._dtype, self._device)

    @property
    def bias(self) -> Optional[torch.Tensor]:  # type: ignore[override]
        return self._reader.tensor(f"{self._prefix}.bias", self._dtype, self._device) if self._has_bias else None


def meta_skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `directory`'s config with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`, keeping its kind and grad flag."""
    owner, attr = (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) if "." in name else (model, name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
    else:
        owner._buffers[attr] = value


def load_quantized(
    directory: Path, dtype: torch.dtype, device: torch.device, fmt: BaseFormat, cast_buffers: bool = False
) -> Optional[nn.Module]:
    """The model of the safetensors checkpoint in `directory`, in `dtype` on `device`, with the
    linears `fmt` targets quantized as they are read.

    `cast_buffers` also casts the floating buffers to `dtype` (as `model.to(dtype)` does).
    Returns None (with a logged line) when the checkpoint's tensor names do not cover the
    model's, so the caller falls back to loading the float model first.
    """
    quantizer = quantizer_for(fmt.method)  # an unknown method fails before anything is read
    reader = CheckpointReader(directory)
    model = meta_skeleton(directory, dtype)
    targets = find_target_linears(model, fmt.target_modules, key=fmt.key)
    target_set = set(targets)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out_emb = model.get_output_embeddings()
    tied_names = {f"{n}.weight" for n, m in model.named_modules() if tied and m is out_emb}
    needed = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    float_names = [n for n in needed if n.rsplit(".", 1)[0] not in target_set and n not in tied_names]
    missing = sorted(set(float_names + [f"{t}.weight" for t in targets]) - reader.keys())
    if missing:
        log.info("%s: checkpoint lacks %d model tensors (e.g. %s); loading the float model first", directory, len(missing), missing[0])
        return None
    for name in float_names:
        set_tensor(model, name, reader.tensor(name, dtype, device))
    if cast_buffers:
        for name, buf in list(model.named_buffers()):
            if buf.is_floating_point() and buf.dtype != dtype:
                set_tensor(model, name, buf.to(dtype))
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            set_tensor(model, name, buf.to(device))
    for name in targets:
        replace_module(model, name, LazyLinear(reader, name, model.get_submodule(name), dtype, device))
    quantizer(model, targets, **fmt.options)
    if tied_names:
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    left += [n for n, m in model.named_modules() if isinstance(m, LazyLinear)]
    if left:  # a quantizer that kept a lazy layer or a tensor no file held: never hand on a half-built model
        raise ConfigError(f"model: {directory}: {len(left)} tensors were not loaded (e.g. '{left[0]}')")
    model.eval()  # as from_pretrained returns it
    gen = directory / "generation_config.json"
    if gen.is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model


__all__ = ["CheckpointReader", "LazyLinear", "load_quantized"]
