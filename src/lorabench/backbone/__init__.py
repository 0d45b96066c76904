"""Backbones: the embedded tiny Llama, any Hugging Face causal LM, or a GGUF file (e.g. SmolLM2
from the `real` extra) converted once into a cached HF dir, in the base format a strategy asks for.

With a quantized base format and a safetensors checkpoint, the linears are quantized as they
are read (`lorabench.quant.stream_load`), so the float model is never whole in memory; other
checkpoints (.bin, a random tiny init) are loaded in float and then quantized.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from lorabench.backbone.gguf import ensure_converted
from lorabench.backbone.hf import hf_name, load_hf_dir, load_hf_tokenizer, snapshot_dir
from lorabench.backbone.tiny import load_tiny, tiny_weights
from lorabench.data.tokenizer import Tokenizer
from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, quantize_backbone
from lorabench.utils import DTYPES

log = logging.getLogger(__name__)


def weights_source(cfg: Any) -> tuple[Optional[Path], Optional[str], Optional[Tokenizer]]:
    """(local weights dir or None, from_pretrained name or None, tokenizer if already loaded)."""
    if cfg.source == "hf":
        name = hf_name(cfg)
        return snapshot_dir(name), name, None
    if cfg.source == "gguf":
        if not cfg.get("gguf_file"):
            raise ConfigError("model.gguf_file: required with model.source=gguf (a .gguf path or <package>:<file>)")
        path = ensure_converted(cfg.gguf_file, cfg.cache_dir)
        return path, str(path), None
    path, tok = tiny_weights(cfg)
    return path, None, tok


def load_backbone(
    cfg: Any, seed: int, device: torch.device, fmt: Optional[BaseFormat] = None
) -> tuple[torch.nn.Module, Tokenizer]:
    """(model, tokenizer) for `model.source` = tiny | hf | gguf, in `model.dtype`, its linears in
    base format `fmt` (None: float), with gradient checkpointing on when
    `model.gradient_checkpointing` asks for it."""
    from transformers.utils import logging as hf_logging

    from lorabench.quant.stream_load import CheckpointReader, load_quantized

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per job says nothing in sweep logs
    model = None
    if fmt is not None:
        directory, name, tok = weights_source(cfg)
        if directory is not None and CheckpointReader.available(directory):
            model = load_quantized(directory, DTYPES[cfg.dtype], device, fmt, cast_buffers=cfg.source == "tiny")
            if model is not None and tok is None:
                tok = load_hf_tokenizer(str(name))
        elif directory is not None:
            log.info("%s holds no safetensors checkpoint; loading the float model, then quantizing it", directory)
    if model is None:
        model, tok = load_float(cfg, seed, device)
        if fmt is not None:
            quantize_backbone(model, fmt)
    if cfg.get("gradient_checkpointing", False):
        # non-reentrant: gradients reach adapters even when no input of a block requires grad
        # (the frozen-embedding case PEFT patches with enable_input_require_grads)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tok


def load_float(cfg: Any, seed: int, device: torch.device) -> tuple[torch.nn.Module, Tokenizer]:
    """The whole float model through from_pretrained (or a seeded init), cast to `model.dtype`."""
    if cfg.source == "hf":
        return load_hf_dir(hf_name(cfg), cfg.dtype, device)
    if cfg.source == "gguf":
        if not cfg.get("gguf_file"):
            raise ConfigError("model.gguf_file: required with model.source=gguf (a .gguf path or <package>:<file>)")
        return load_hf_dir(str(ensure_converted(cfg.gguf_file, cfg.cache_dir)), cfg.dtype, device)
    model, tok = load_tiny(cfg, seed, device)
    return model.to(DTYPES[cfg.dtype]), tok


__all__ = ["load_backbone"]
