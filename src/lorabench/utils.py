"""Small helpers: atomic file writes (runs never leave a half-written file behind) and seeding."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write to a temp file in the same dir, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: object, path: Path | str) -> None:
    """torch.save through a temp file + rename, so a crash never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Config names of float dtypes, shared by the backbone (model.dtype) and the quantizers.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter, else its first buffer (cpu for a module with neither)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """One seed for Python and torch RNGs (data, init, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)
