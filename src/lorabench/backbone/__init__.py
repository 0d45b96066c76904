"""Backbones, loading only: the embedded tiny Llama or any Hugging Face causal LM.

Quantization is a separate step (`lorabench.quant`), applied in the format a strategy asks for.
"""

from __future__ import annotations

from typing import Any

import torch

from lorabench.backbone.hf import load_hf
from lorabench.backbone.tiny import load_tiny
from lorabench.data.tokenizer import Tokenizer
from lorabench.utils import DTYPES


def load_backbone(cfg: Any, seed: int, device: torch.device) -> tuple[torch.nn.Module, Tokenizer]:
    """(model, tokenizer) for `model.source` = tiny | hf, cast to `model.dtype`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per job says nothing in sweep logs
    if cfg.source == "hf":
        return load_hf(cfg, device)
    model, tok = load_tiny(cfg, seed, device)
    return model.to(DTYPES[cfg.dtype]), tok


__all__ = ["load_backbone"]
