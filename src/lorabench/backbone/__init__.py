"""Backbones, loading only: the embedded tiny Llama, any Hugging Face causal LM, or a GGUF
file (e.g. SmolLM2 from the `real` extra) converted once into a cached HF dir.

Quantization is a separate step (`lorabench.quant`), applied in the format a strategy asks for.
"""

from __future__ import annotations

from typing import Any

import torch

from lorabench.backbone.gguf import ensure_converted
from lorabench.backbone.hf import load_hf, load_hf_dir
from lorabench.backbone.tiny import load_tiny
from lorabench.data.tokenizer import Tokenizer
from lorabench.errors import ConfigError
from lorabench.utils import DTYPES


def load_backbone(cfg: Any, seed: int, device: torch.device) -> tuple[torch.nn.Module, Tokenizer]:
    """(model, tokenizer) for `model.source` = tiny | hf | gguf, cast to `model.dtype`,
    with gradient checkpointing on when `model.gradient_checkpointing` asks for it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per job says nothing in sweep logs
    if cfg.source == "hf":
        model, tok = load_hf(cfg, device)
    elif cfg.source == "gguf":
        if not cfg.get("gguf_file"):
            raise ConfigError("model.gguf_file: required with model.source=gguf (a .gguf path or <package>:<file>)")
        model, tok = load_hf_dir(str(ensure_converted(cfg.gguf_file, cfg.cache_dir)), cfg.dtype, device)
    else:
        model, tok = load_tiny(cfg, seed, device)
        model = model.to(DTYPES[cfg.dtype])
    if cfg.get("gradient_checkpointing", False):
        # non-reentrant: gradients reach adapters even when no input of a block requires grad
        # (the frozen-embedding case PEFT patches with enable_input_require_grads)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, tok


__all__ = ["load_backbone"]
