"""What produced a run, so any number can be traced back: code, libraries, machine, backbone, data.

Every job records flat `provenance/*` keys in summary.json and in its W&B config (the same
idea as the run info of PEFT's method comparison). A key that cannot be known is absent, never
guessed: no git commit outside a git checkout, no version for a package that is not installed,
no backbone hash for a seeded random init.

- code: `lorabench_version` (package metadata), `git_commit` and `git_dirty` of the checkout
  the package was imported from;
- libraries: `python`, `torch`, `transformers`, `peft`, `bitsandbytes`, `hqq`;
- machine: `device` (the GPU's name, or `cpu`), `cpu` (model name), `threads` (torch's);
- backbone: `backbone` (where it came from), `backbone_sha256` (of its weight files) or, for a
  hub model, `backbone_revision` (the commit of the snapshot transformers loaded);
- data: `data_fingerprint`, the sha256 of every tokenized train and eval example (and of the
  multiple-choice eval set), identical on every machine for the same task keys and seed.

Hashing a weight file is cached per file version (path, size, mtime) in memory and in
`<model.cache_dir>/sha256/`, so the jobs of a sweep hash a large GGUF or safetensors file once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from lorabench.utils import atomic_write_text

PREFIX = "provenance/"  # every key this module writes starts with it
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "hqq")  # distribution names whose versions are recorded
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the files of a model dir that hold its weights
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout above src/lorabench, when installed from one


def collect(cfg: Any, model: torch.nn.Module, data: Any, device: torch.device) -> dict[str, Any]:
    """Every provenance key of a job (config `cfg`, loaded `model`, built task `data`, its `device`)."""
    out: dict[str, Any] = {**code_version(), **library_versions(), **machine(device)}
    out.update(backbone(cfg.model, model))
    out["data_fingerprint"] = data_fingerprint(data)
    return {PREFIX + k: v for k, v in out.items() if v is not None}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The harness's version, and the commit (with a dirty flag) of the checkout it runs from.

    Read once per process: the code a process runs is the code it imported at its start.
    """
    out: dict[str, Any] = {"lorabench_version": _version("lorabench")}
    if not (REPO_ROOT / ".git").exists():  # an installed copy, not a checkout: no commit to name
        return out
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    if head is not None and status is not None:
        out["git_commit"] = head.strip()
        out["git_dirty"] = bool(status.strip())  # tracked changes or untracked files not ignored
    return out


def _git(*args: str) -> Optional[str]:
    """stdout of `git -C <checkout> <args>`, None when git is missing or fails."""
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, Optional[str]]:
    """Python and the installed versions of the libraries that compute a run's numbers."""
    return {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}}


def machine(device: torch.device) -> dict[str, Any]:
    """The accelerator's name (`cpu` on CPU), the CPU model and torch's thread count."""
    dev = torch.device(device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type}
    if dev.type == "cuda":
        out["cuda"] = torch.version.cuda
    out["cpu"] = cpu_model()
    out["threads"] = torch.get_num_threads()
    return out


@functools.lru_cache(maxsize=1)
def cpu_model() -> Optional[str]:
    """`model name` from /proc/cpuinfo (Linux x86), else what `platform` knows, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def backbone(model_cfg: Any, model: torch.nn.Module) -> dict[str, Optional[str]]:
    """Where the backbone came from and the hash (or hub revision) of the weights it started from."""
    from lorabench.backbone import tiny
    from lorabench.backbone.hf import looks_like_path

    source = str(model_cfg.source)
    cache = Path(str(model_cfg.cache_dir)).expanduser()
    if source == "gguf":
        from lorabench.backbone.gguf import resolve_gguf

        path = resolve_gguf(str(model_cfg.gguf_file))
        return {"backbone": f"gguf:{model_cfg.gguf_file}", "backbone_sha256": cached_sha256(path, cache)}
    if source == "hf":
        name = str(model_cfg.name_or_path)
        if looks_like_path(name):
            return {"backbone": f"hf:{name}", "backbone_sha256": weights_sha256(Path(name).expanduser(), cache)}
        config = getattr(model, "config", None)  # a hub snapshot: transformers records the commit it loaded
        return {"backbone": f"hf:{name}", "backbone_revision": getattr(config, "_commit_hash", None)}
    if tiny.is_shipped(model_cfg):
        # tiny_weights verified every shipped file against this record before the job used it
        return {"backbone": "tiny:shipped", "backbone_sha256": tiny.shipped_record()["sha256"]["model.safetensors"]}
    if model_cfg.pretrain_steps == 0:
        return {"backbone": "tiny:random-init"}  # weights drawn from the run's seed: no file to hash
    path = tiny.pretrained_dir(model_cfg)
    return {"backbone": f"tiny:{path.name}", "backbone_sha256": weights_sha256(path, cache)}


def weights_sha256(model_dir: Path, cache: Path) -> Optional[str]:
    """sha256 of a model dir's weights: the file's own sha256 when there is one weight file,
    else the sha256 of `sha256sum`-style lines (`<sha256>  <name>`, sorted by name) over all."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    if len(files) == 1:
        return cached_sha256(files[0], cache)
    lines = "".join(f"{cached_sha256(p, cache)}  {p.name}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def cached_sha256(path: Path, cache: Path) -> str:
    """sha256 of a file, hashed once per file version (resolved path, size, mtime)."""
    path = path.resolve()
    st = path.stat()
    return _cached_sha256(str(path), st.st_size, st.st_mtime_ns, str(cache))


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int, cache: str) -> str:
    """The disk cache behind cached_sha256: one small JSON per file under `<cache>/sha256/`."""
    from lorabench.backbone.tiny import sha256_file

    entry = Path(cache) / "sha256" / f"{hashlib.sha256(path.encode()).hexdigest()[:16]}.json"
    key = {"path": path, "size": size, "mtime_ns": mtime_ns}
    try:
        saved = json.loads(entry.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, json.JSONDecodeError):
        pass
    sha = sha256_file(Path(path))
    try:
        atomic_write_text(entry, json.dumps({**key, "sha256": sha}) + "\n")
    except OSError:  # a read-only cache dir costs a re-hash next time, nothing else
        pass
    return sha


def data_fingerprint(data: Any) -> str:
    """sha256 over the task's tokenized examples: train, then eval, then the MC eval set if any.

    Token ids, not text: the fingerprint also changes when the tokenizer does. Each example is
    one JSON line `[split, n_prompt, ids]` (MC items: `["mc", gold, context, options]`).
    """
    h = hashlib.sha256()

    def add(rows: Iterable[list[Any]]) -> None:
        for row in rows:
            h.update(json.dumps(row, separators=(",", ":")).encode() + b"\n")

    add(["train", e.n_prompt, e.ids] for e in data.train)
    add(["eval", e.n_prompt, e.ids] for e in data.eval)
    if getattr(data, "mc", None) is not None:
        add(["mc", it.gold, it.context, it.options] for it in data.mc.items)
    return h.hexdigest()
