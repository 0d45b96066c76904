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

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, quantizer_for
from lorabench.surgery import find_target_linears, replace_module

log = logging.getLogger(__name__)
SINGLE_FILE = "model.safetensors"  # transformers' name for an unsharded checkpoint
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor → shard map


class CheckpointReader:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read one at a time.

    Each read opens (memory-maps) the file, copies one tensor out and closes it; a file that
    cannot be opened or read (truncated, not safetensors) is one ConfigError line naming it.
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
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}

    @staticmethod
    def available(directory: Path) -> bool:
        """Whether `directory` holds a safetensors checkpoint (else the caller loads it another way)."""
        return (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()

    @staticmethod
    def _open(path: Path) -> Any:
        """A safetensors handle on `path` (a memory map), or one ConfigError line naming the file."""
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError)
            raise ConfigError(
                f"model: cannot read weights file {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "expected a complete safetensors file"
            ) from None

    def keys(self) -> set[str]:
        return set(self.files)

    def tensor(self, name: str, dtype: Optional[torch.dtype], device: torch.device) -> torch.Tensor:
        """Tensor `name`, as a fresh tensor on `device`; floating tensors cast to `dtype` (when given)."""
        path = self.files[name]
        try:
            # one handle per tensor: closing it unmaps the file, so the pages read stay out of the
            # process's resident set (a handle kept open ends up mapping the whole checkpoint)
            with self._open(path) as f:
                t = f.get_tensor(name)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"model: cannot read tensor '{name}' from weights file {path} ({type(e).__name__}); "
                "expected a complete safetensors file"
            ) from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


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
