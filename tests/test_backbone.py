"""The shipped tiny backbone: a standard HF model dir whose files are checked against their
recorded sha256, loaded by every job with no pretraining, and rebuilt by its recipe."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorabench.backbone import load_backbone, tiny
from lorabench.checks import validate
from lorabench.data.tokenizer import CHARS, SPECIALS, HFTokenizer
from lorabench.errors import ConfigError
from lorabench import pretrain_cli
from lorabench.training import pretrain
from tests.helpers import TINY, compose_cfg

SHIPPED = tiny.SHIPPED_DIR
REBUILD_STEPS = 20  # steps of the recipe the rebuild test runs (the record holds 50: `lorabench-pretrain --steps 50`)
LOSS_TOL = 1e-4  # absolute, per step, on 1 thread (the conftest's): the recipe is deterministic there
SMALL_JOB = [o for o in TINY if not o.startswith("model.")]  # small task and loop, the real model keys


def record() -> dict:
    return json.loads((SHIPPED / tiny.RECORD).read_text())


def no_pretraining(*args: object, **kw: object) -> None:
    raise AssertionError("the shipped recipe must not be pretrained")


def shipped_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped dir that the loader uses instead of the package's."""
    copy = tmp_path / "tiny_default"
    shutil.copytree(SHIPPED, copy)
    monkeypatch.setattr(tiny, "SHIPPED_DIR", copy)
    return copy


def test_the_recorded_sha256_are_those_of_the_shipped_files() -> None:
    rec = record()
    files = sorted(p.name for p in SHIPPED.iterdir() if p.name != tiny.RECORD)
    assert sorted(rec["sha256"]) == files
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name, sha in rec["sha256"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == sha  # whole-file hash, not the chunked one


def test_the_conf_default_is_the_shipped_recipe_and_only_it() -> None:
    model = compose_cfg().model
    rec = record()
    assert tiny.cache_key(model) == rec["key"] and tiny.is_shipped(model)
    assert rec["recipe"] == json.loads(json.dumps(tiny.recipe(model)))
    assert rec["steps"] == model.pretrain_steps == 1500 and rec["threads"] == 1
    assert not tiny.is_shipped(compose_cfg("model.hidden_size=128").model)
    assert not tiny.is_shipped(compose_cfg("model.pretrain_steps=0").model)
    assert not tiny.is_shipped(compose_cfg("model.pretrain_seed=1").model)


def test_hf_loads_the_shipped_dir_and_peft_wraps_it() -> None:
    model = AutoModelForCausalLM.from_pretrained(SHIPPED)
    weights = load_file(SHIPPED / "model.safetensors")
    state = model.state_dict()
    assert sorted(weights) == sorted(state)
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert sum(p.numel() for p in model.parameters()) == record()["params"] == 2_649_344

    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 50)
    assert tok("sort:31=")["input_ids"] == [1] + [len(SPECIALS) + CHARS.index(c) for c in "sort:31="]  # <bos> first
    ids = torch.tensor([tok("copy:ab7=ab7")["input_ids"]])
    base_logits = model(input_ids=ids).logits

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == 4 * 2 * 4 * (256 + 256)  # layers x modules x r x (in + out)
    assert torch.equal(peft_model(input_ids=ids).logits, base_logits)  # B = 0 at init: the same function


def test_the_shipped_tokenizer_keeps_the_historical_ids() -> None:
    tok = HFTokenizer(AutoTokenizer.from_pretrained(SHIPPED))
    rng = random.Random(1)
    for _ in range(300):
        s = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 80)))
        ids = tok.encode(s)
        assert ids == [len(SPECIALS) + CHARS.index(c) for c in s]
        assert tok.decode(ids) == s
    with pytest.raises(ConfigError, match="'Q' is not in the vocabulary"):
        tok.encode("sort:Q")


def job_cfg(run_dir: Path, *overrides: str):
    cfg = compose_cfg(*SMALL_JOB, *overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    validate(cfg)
    return cfg


def test_a_job_loads_the_shipped_backbone_without_pretraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorabench.training import job
    from lorabench.training.job import build_trainer

    monkeypatch.setattr(pretrain, "pretrain_tiny", no_pretraining)
    cfg = job_cfg(tmp_path / "full", "strategy=full")
    trainer = build_trainer(cfg, torch.device("cpu"))
    weights = load_file(SHIPPED / "model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert trainer.data.tok.vocab_size == 50

    summary = job.run(job_cfg(tmp_path / "lora", "trainer.max_steps=2"))
    assert summary["status"] == "completed" and summary["train/steps"] == 2
    assert not any(Path(cfg.model.cache_dir).glob("tiny-*"))  # nothing pretrained, nothing cached


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_shipped_file_is_one_line_and_nothing_is_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    copy = shipped_copy(tmp_path, monkeypatch)
    monkeypatch.setattr(pretrain, "pretrain_tiny", no_pretraining)
    f = copy / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        f.unlink()
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    model_cfg = compose_cfg().model
    pretrain.prepare_backbone(model_cfg, torch.device("cpu"))  # the shipped recipe never pretrains
    with pytest.raises(ConfigError) as e:
        load_backbone(model_cfg, 0, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    assert ("missing" if damage == "delete" else "corrupted or truncated") in msg
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_the_pretrain_command_refuses_bad_arguments_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkey_out = tmp_path / "not_a_backbone"
    monkey_out.mkdir()
    (monkey_out / "notes.txt").write_text("keep me")
    cases = [
        [],
        ["--ship", "model.hidden_size=128"],
        ["--out", str(tmp_path / "x"), "task.name=add"],
        ["--out", str(tmp_path / "x"), "model.hidden_sise=128"],
        ["--out", str(tmp_path / "x"), "model.pretrain_steps=0"],
        ["--out", str(monkey_out)],
    ]
    for argv in cases:
        assert pretrain_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorabench-pretrain: error:") and "\n" not in err, (argv, err)
    assert (monkey_out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_rebuild_reproduces_the_recorded_early_losses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rebuilt"
    assert torch.get_num_threads() == 1
    assert pretrain_cli.main(["--out", str(out), "--steps", str(REBUILD_STEPS)]) == 0
    printed = capsys.readouterr().out
    rebuilt = json.loads((out / tiny.RECORD).read_text())
    shipped = record()
    assert rebuilt["key"] == shipped["key"] and rebuilt["steps"] == REBUILD_STEPS
    assert len(rebuilt["early_losses"]) == REBUILD_STEPS
    for step, (a, b) in enumerate(zip(rebuilt["early_losses"], shipped["early_losses"]), start=1):
        assert abs(a - b) <= LOSS_TOL, (step, a, b)
    worst = max(abs(a - b) for a, b in zip(rebuilt["early_losses"], shipped["early_losses"]))
    assert f"early losses (steps 1..{REBUILD_STEPS}): max |rebuilt - shipped| = {worst:.2e}" in printed
    assert "final train loss" not in printed  # a partial rebuild has no final loss to compare
    # the rebuilt dir is itself a checked, standard HF dir
    for name, sha in rebuilt["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 50
    assert AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == [1, 13, 14]


def test_the_comparison_lines_state_the_losses_and_their_difference() -> None:
    shipped = record()
    rebuilt = {**shipped, "early_losses": [x + 3e-5 for x in shipped["early_losses"][:10]], "final_train_loss": 1.5}
    lines = pretrain.compare_with_shipped(rebuilt, shipped)
    assert lines[0] == "early losses (steps 1..10): max |rebuilt - shipped| = 3.00e-05"
    assert lines[1] == f"final train loss: rebuilt 1.5000, shipped {shipped['final_train_loss']:.4f}, difference +0.0837"
    assert shipped["final_train_loss"] == 1.4163
    assert pretrain.compare_with_shipped({**rebuilt, "key": "0" * 16}, shipped) == [
        f"no shipped backbone with recipe key {'0' * 16}: nothing to compare"
    ]


def test_another_recipe_is_pretrained_once_into_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [
        "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=1", "model.num_heads=2",
        "model.pretrain_steps=3", "model.pretrain_batch_size=4",
    ]
    model_cfg = compose_cfg(*keys).model
    assert not tiny.is_shipped(model_cfg)
    path = pretrain.ensure_pretrained(model_cfg, torch.device("cpu"))
    assert path == tiny.pretrained_dir(model_cfg) and path.parent == Path(model_cfg.cache_dir)
    rec = json.loads((path / tiny.RECORD).read_text())
    assert rec["key"] == tiny.cache_key(model_cfg) and rec["steps"] == 3 and len(rec["early_losses"]) == 3
    assert rec["final_train_loss"] == round(rec["early_losses"][-1], 4)
    for name, sha in rec["sha256"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == sha
    monkeypatch.setattr(pretrain, "pretrain_tiny", no_pretraining)  # a second job reuses the cache
    pretrain.prepare_backbone(model_cfg, torch.device("cpu"))
    model, tok = load_backbone(model_cfg, 0, torch.device("cpu"))
    weights = load_file(path / "model.safetensors")
    assert all(torch.equal(weights[k], model.state_dict()[k]) for k in weights)
    assert tok.encode("ab ") == [13, 14, 49]
