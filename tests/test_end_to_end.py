"""Tiny end-to-end runs: every strategy, W&B offline files, local model dirs and data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabench.wandb_offline import find_offline_runs, read_offline_run
from tests.helpers import run_tiny

def test_full_and_lora_parameter_counts(tmp_path: Path) -> None:
    full = run_tiny(tmp_path / "full", "strategy=full")
    lora = run_tiny(tmp_path / "lora", "strategy=lora", "strategy.rank=4")
    n = full["params/trainable"]
    assert full["params/base"] == 0  # nothing is frozen
    # 2 layers × (q,k,v,o: 64→64; gate,up: 64→128; down: 128→64), r=4: r·(in+out) each
    per_layer = 4 * 4 * (64 + 64) + 2 * 4 * (64 + 128) + 4 * (128 + 64)
    assert lora["params/trainable"] == 2 * per_layer
    assert lora["params/base"] == n
    assert full["memory/formula_bytes"] == 16 * n
    assert lora["memory/formula_bytes"] == 4 * n + 16 * 2 * per_layer


def test_wandb_offline_files_are_written_and_readable(tmp_path: Path) -> None:
    summary = run_tiny(tmp_path, "logger=wandb", "logger.group=g1", "seed=3")
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1
    rec = read_offline_run(runs[0], wait_for_exit=60)
    assert rec["run"]["id"] == (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert rec["run"]["group"] == "g1" and rec["run"]["job_type"] == "finetune"
    assert {"strategy:lora", "seed:3", "rank:8"} <= set(rec["run"]["tags"])
    assert rec["config"]["strategy"]["rank"] == 8 and rec["config"]["seed"] == 3
    assert rec["history"][0]["_step"] == 0 and "eval/loss" in rec["history"][0]
    assert rec["summary"]["eval/loss"] == pytest.approx(summary["eval/loss"])
    assert rec["exit_code"] == 0


def test_failed_run_is_recorded_as_failed_and_wandb_finished(tmp_path: Path) -> None:
    from lorabench.errors import ConfigError

    with pytest.raises(ConfigError):
        run_tiny(tmp_path, "logger=wandb", "strategy.target_modules=[nope]")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    rec = read_offline_run(find_offline_runs(tmp_path)[0], wait_for_exit=60)
    assert rec["exit_code"] == 1


def _save_local_hf_model(path: Path) -> None:
    """A tiny random Llama and a byte-level BPE tokenizer, saved the way the hub serves them."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["sort:0123456789= " * 50], vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_hf_model_from_a_local_dir_and_a_local_dataset(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    _save_local_hf_model(model_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"sort:{a}{b}{c}=", "answer": "".join(sorted(f"{a}{b}{c}"))}
            for a in range(10) for b in range(10) for c in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_tiny(
        tmp_path / "run", "model=hf", f"model.name_or_path={model_dir}", "model.dtype=fp32",
        "task=hf", f"task.dataset={data}", "task.eval_size=12",
    )
    assert summary["status"] == "completed"
    assert summary["params/base"] == sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )


def test_peft_format_adapter_is_saved(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_tiny(tmp_path, "strategy=lora", "strategy.rank=4")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 7
