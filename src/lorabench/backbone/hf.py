"""Any Hugging Face causal LM (hub id or local dir) with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from lorabench.data.tokenizer import HFTokenizer
from lorabench.errors import ConfigError
from lorabench.utils import DTYPES

log = logging.getLogger(__name__)
SNAPSHOT_FILES = ["*.json", "*.safetensors"]  # what quantize-while-loading reads from a hub snapshot


def looks_like_path(name: str) -> bool:
    """A local path (absolute, relative or ~), as opposed to a hub id like org/name."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def hf_name(cfg: Any) -> str:
    """`model.name_or_path` as from_pretrained takes it: a checked local dir, or a hub id."""
    name = str(cfg.name_or_path)
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ConfigError(f"model.name_or_path: model dir {path} does not exist")
        if not (path / "config.json").exists():
            raise ConfigError(f"model.name_or_path: {path} has no config.json (expected a saved HF model dir)")
        name = str(path)
    return name


def snapshot_dir(name: str) -> Optional[Path]:
    """The local dir holding `name`'s files: the dir itself, or the hub snapshot (fetched as
    from_pretrained would fetch it); None when it cannot be resolved (from_pretrained then
    reports why in one line)."""
    if looks_like_path(name):
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=SNAPSHOT_FILES))
    except Exception as e:  # offline, unknown id, gated: the float path's from_pretrained names it
        log.info("model.name_or_path: no hub snapshot of '%s' (%s); loading through from_pretrained", name, type(e).__name__)
        return None


def load_hf(cfg: Any, device: torch.device) -> tuple[torch.nn.Module, HFTokenizer]:
    """AutoModelForCausalLM + AutoTokenizer; a missing local dir is a one-line error."""
    return load_hf_dir(hf_name(cfg), cfg.dtype, device)


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """AutoTokenizer of a hub id or checked local dir; a failure is one line naming it."""
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(name))
    except OSError as e:
        raise ConfigError(f"model.name_or_path: cannot load '{name}': {str(e).splitlines()[0]}") from None


def load_hf_dir(name: str, dtype: str, device: torch.device) -> tuple[torch.nn.Module, HFTokenizer]:
    """`from_pretrained` of a hub id or checked local dir, in `dtype` ("fp32" | "bf16"), on `device`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    except (OSError, SafetensorError) as e:  # missing files; a truncated or foreign weights file
        raise ConfigError(f"model.name_or_path: cannot load '{name}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model.to(device), load_hf_tokenizer(name)
