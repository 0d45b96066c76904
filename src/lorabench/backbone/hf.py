"""Any Hugging Face causal LM (hub id or local dir) with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorabench.data.tokenizer import HFTokenizer
from lorabench.errors import ConfigError
from lorabench.utils import DTYPES


def looks_like_path(name: str) -> bool:
    """A local path (absolute, relative or ~), as opposed to a hub id like org/name."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def load_hf(cfg: Any, device: torch.device) -> tuple[torch.nn.Module, HFTokenizer]:
    """AutoModelForCausalLM + AutoTokenizer; a missing local dir is a one-line error."""
    name = str(cfg.name_or_path)
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.name_or_path: model dir {path} does not exist")
        if not (path / "config.json").exists():
            raise ConfigError(f"model.name_or_path: {path} has no config.json (expected a saved HF model dir)")
        name = str(path)
    return load_hf_dir(name, cfg.dtype, device)


def load_hf_dir(name: str, dtype: str, device: torch.device) -> tuple[torch.nn.Module, HFTokenizer]:
    """`from_pretrained` of a hub id or checked local dir, in `dtype` ("fp32" | "bf16"), on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot load '{name}': {str(e).splitlines()[0]}") from None
    return model.to(device), HFTokenizer(tok)
