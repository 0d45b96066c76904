"""Provenance: every key a job records (summary.json and the W&B config) checked against an
independent reading, the cached weight hashes, the data fingerprint's determinism, and the
report's warning when runs grouped together differ in backbone or library versions."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict

from lorabench import provenance
from lorabench.analysis import report
from lorabench.analysis.collect import load_local
from lorabench.analysis.aggregate import studies
from lorabench.backbone.tiny import SHIPPED_DIR
from lorabench.checks import validate
from lorabench.data import build_task
from lorabench.data.tasks import Encoded
from lorabench.data.tokenizer import CharTokenizer
from lorabench.wandb_offline import find_offline_runs, read_offline_run
from tests.helpers import REPO, TINY, compose_cfg
from tests.test_report_fixtures import make_run


def git_now(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_a_run_on_the_shipped_backbone_records_every_key(tmp_path: Path) -> None:
    """A 2-step job on the shipped tiny backbone, W&B offline: summary.json and the W&B config
    hold the same provenance, each value read here another way."""
    import bitsandbytes
    import hqq
    import peft
    import transformers

    import lorabench
    from lorabench.training import job

    keep = [o for o in TINY if not o.startswith(("model.", "logger="))]  # the shipped recipe's model keys
    cfg = compose_cfg(*keep, "trainer.max_steps=2", "trainer.threads=1", "logger=wandb")
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    validate(cfg)
    provenance.code_version.cache_clear()
    head_before, dirty_before = git_now("rev-parse", "HEAD").strip(), bool(git_now("status", "--porcelain").strip())
    summary = job.run(cfg)
    head_after, dirty_after = git_now("rev-parse", "HEAD").strip(), bool(git_now("status", "--porcelain").strip())

    p = {k.removeprefix("provenance/"): v for k, v in summary.items() if k.startswith("provenance/")}
    assert set(p) == {"lorabench_version", "git_commit", "git_dirty", "python", "torch", "transformers", "peft",
                      "bitsandbytes", "hqq", "device", "cpu", "threads", "backbone", "backbone_sha256",
                      "data_fingerprint"}
    assert p["lorabench_version"] == lorabench.__version__
    assert p["git_commit"] in {head_before, head_after}  # others may commit to the checkout meanwhile
    assert p["git_dirty"] in {dirty_before, dirty_after}
    assert p["torch"] == torch.__version__ and p["transformers"] == transformers.__version__
    assert p["peft"] == peft.__version__ and p["bitsandbytes"] == bitsandbytes.__version__
    assert p["hqq"] == hqq.__version__
    assert p["python"] == ".".join(map(str, __import__("sys").version_info[:3]))
    assert p["device"] == "cpu" and p["threads"] == 1 == summary["train/threads"]
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    assert p["cpu"] == found.group(1).strip()
    assert p["backbone"] == "tiny:shipped"
    assert p["backbone_sha256"] == hashlib.sha256((SHIPPED_DIR / "model.safetensors").read_bytes()).hexdigest()
    from transformers import AutoTokenizer

    from lorabench.data.tokenizer import HFTokenizer

    rebuilt = build_task(cfg.task, HFTokenizer(AutoTokenizer.from_pretrained(SHIPPED_DIR)), cfg.seed)
    assert p["data_fingerprint"] == provenance.data_fingerprint(rebuilt)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {k: on_disk[k] for k in summary if k.startswith("provenance/")} == {f"provenance/{k}": v for k, v in p.items()}
    rec = read_offline_run(find_offline_runs(tmp_path)[0], wait_for_exit=60)
    assert {k: v for k, v in rec["config"].items() if k.startswith("provenance/")} == {f"provenance/{k}": v for k, v in p.items()}


def test_data_fingerprint_is_the_sha256_of_the_example_lines() -> None:
    data = SimpleNamespace(train=[Encoded([1, 5, 6, 2], 2)], eval=[Encoded([1, 7, 2], 1)], mc=None)
    expected = hashlib.sha256(b'["train",2,[1,5,6,2]]\n["eval",1,[1,7,2]]\n').hexdigest()
    assert provenance.data_fingerprint(data) == expected


def test_data_fingerprint_follows_seed_and_difficulty_only() -> None:
    task = compose_cfg(*TINY).task
    tok = CharTokenizer(128)

    def fp(seed: int, **keys: int) -> str:
        t = task.copy()
        with open_dict(t):
            t.update(keys)
        return provenance.data_fingerprint(build_task(t, tok, seed))

    a = fp(0)
    assert fp(0) == a  # two builds, same keys and seed: same bytes
    assert fp(1) != a
    assert fp(0, difficulty_max=6) != a
    assert len(a) == 64 and int(a, 16) >= 0


def test_weight_hashes_are_cached_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.backbone import tiny

    calls: list[Path] = []
    real = tiny.sha256_file
    monkeypatch.setattr(tiny, "sha256_file", lambda p: calls.append(p) or real(p))
    model_dir, cache = tmp_path / "m", tmp_path / "cache"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # not a weight file
    w = model_dir / "model.safetensors"
    w.write_bytes(b"\x01" * 1000)
    sha = hashlib.sha256(b"\x01" * 1000).hexdigest()
    provenance._cached_sha256.cache_clear()
    assert provenance.weights_sha256(model_dir, cache) == sha
    provenance._cached_sha256.cache_clear()  # a new process: the disk cache answers
    assert provenance.weights_sha256(model_dir, cache) == sha
    assert len(calls) == 1 and len(list((cache / "sha256").iterdir())) == 1
    w.write_bytes(b"\x02" * 1001)  # another version of the file: hashed again
    assert provenance.weights_sha256(model_dir, cache) == hashlib.sha256(b"\x02" * 1001).hexdigest()
    assert len(calls) == 2
    (model_dir / "model-2.safetensors").write_bytes(b"abc")  # two weight files: sha256sum lines, sorted by name
    two = hashlib.sha256(b"\x02" * 1001).hexdigest()
    lines = f"{hashlib.sha256(b'abc').hexdigest()}  model-2.safetensors\n{two}  model.safetensors\n"
    assert provenance.weights_sha256(model_dir, cache) == hashlib.sha256(lines.encode()).hexdigest()


def test_backbone_of_each_source(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    got = provenance.backbone(SimpleNamespace(source="gguf", gguf_file=str(gguf), cache_dir=cache), None)
    assert got == {"backbone": f"gguf:{gguf}", "backbone_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"w")
    local = SimpleNamespace(source="hf", name_or_path=str(tmp_path / "hf"), cache_dir=cache)
    assert provenance.backbone(local, None)["backbone_sha256"] == hashlib.sha256(b"w").hexdigest()
    hub = SimpleNamespace(source="hf", name_or_path="org/model", cache_dir=cache)
    model = SimpleNamespace(config=SimpleNamespace(_commit_hash="0123abcd"))
    assert provenance.backbone(hub, model) == {"backbone": "hf:org/model", "backbone_revision": "0123abcd"}
    rand = compose_cfg(*TINY).model  # pretrain_steps=0: weights drawn from the seed, no file to hash
    assert provenance.backbone(rand, None) == {"backbone": "tiny:random-init"}


def test_outside_a_checkout_and_without_a_package_the_keys_are_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    provenance.code_version.cache_clear()
    try:
        assert set(provenance.code_version()) == {"lorabench_version"}
    finally:
        provenance.code_version.cache_clear()
    monkeypatch.setattr(provenance, "LIBRARIES", ("torch", "no-such-distribution-xyz"))
    assert provenance.library_versions()["no-such-distribution-xyz"] is None  # collect drops None values


def _sweep(root: Path, shas: list[str], torches: list[str], widths: list[int]) -> Path:
    sweep = root / "sw"
    for i, (sha, tv, width) in enumerate(zip(shas, torches, widths)):
        make_run(sweep, f"{i}_lora_s{i}", strategy="lora", seed=i, config={"model.hidden_size": width},
                 summary={"eval/accuracy": 0.5, "provenance/backbone_sha256": sha, "provenance/torch": tv,
                          "provenance/git_dirty": False})
    return sweep


def test_report_warns_when_runs_grouped_together_differ(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = "a" * 64, "b" * 64
    mixed = _sweep(tmp_path / "mixed", [a, b], ["2.13.0", "2.13.0"], [64, 64])
    df = load_local([mixed]).runs
    assert df["provenance/backbone_sha256"].tolist() == [a, b] and df["provenance/git_dirty"].tolist() == [False, False]
    assert report.provenance_warning("sw", studies(df)["sw"]) == (
        f"warning: sw: runs grouped together differ in provenance/backbone_sha256 ({a[:12]}, {b[:12]}) "
        "among runs with the same model keys")
    report.run([str(mixed)], tmp_path / "out")
    line = f"warning: sw: runs grouped together differ in provenance/backbone_sha256 ({a[:12]}, {b[:12]})"
    assert line in capsys.readouterr().out and line in (tmp_path / "out" / "index.md").read_text()

    versions = load_local([_sweep(tmp_path / "v", [a, a], ["2.13.0", "2.12.1"], [64, 64])]).runs
    assert report.provenance_warning("sw", versions) == "warning: sw: runs grouped together differ in provenance/torch (2.12.1, 2.13.0)"
    same = load_local([_sweep(tmp_path / "s", [a, a], ["2.13.0", "2.13.0"], [64, 64])]).runs
    assert report.provenance_warning("sw", same) is None
    sizes = load_local([_sweep(tmp_path / "n", [a, b], ["2.13.0", "2.13.0"], [64, 128])]).runs
    assert report.provenance_warning("sw", sizes) is None  # two model sizes: two backbones, as asked
