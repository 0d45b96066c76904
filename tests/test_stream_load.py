"""Quantize while loading: the streamed backbone is bit for bit the load-then-quantize one,
holds one float linear at a time, keeps tied weights tied, and a truncated weights file is one line."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers import LlamaForCausalLM

from lorabench.backbone import load_backbone
from lorabench.backbone.tiny import SHIPPED_DIR
from lorabench.errors import ConfigError
from lorabench.quant import BaseFormat, quantize_backbone
from lorabench.quant import stream_load
from lorabench.quant.stream_load import load_quantized
from tests.helpers import compose_cfg, tiny_llama

CPU = torch.device("cpu")
FORMATS = {
    "nf4-dq": BaseFormat("bnb4bit", options={"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "fp32"}),
    "nf4": BaseFormat("bnb4bit", options={"quant_type": "nf4", "double_quant": False, "blocksize": 64, "compute_dtype": "fp32"}),
    "fp4": BaseFormat("bnb4bit", options={"quant_type": "fp4", "double_quant": True, "blocksize": 128, "compute_dtype": "bf16"}),
    "int2-rtn": BaseFormat("intn", options={"bits": 2, "group_size": 32, "quantizer": "rtn"}),
    "int3-rtn": BaseFormat("intn", options={"bits": 3, "group_size": 32, "quantizer": "rtn"}),
    "int4-rtn": BaseFormat("intn", options={"bits": 4, "group_size": 32, "quantizer": "rtn"}),
    "int4-hqq": BaseFormat("intn", options={"bits": 4, "group_size": 64, "quantizer": "hqq"}),
    "int4-qproj": BaseFormat("intn", target_modules=["q_proj", "down_proj"], options={"bits": 4, "group_size": 32}),
}


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and quantization constant, by name (bnb's state dict carries its quant_state)."""
    out = dict(model.state_dict())
    out.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    return out


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_streamed_quantization_is_bit_identical_to_load_then_quantize(fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    streamed = load_quantized(SHIPPED_DIR, torch.float32, CPU, fmt)
    loaded = LlamaForCausalLM.from_pretrained(SHIPPED_DIR, dtype=torch.float32)
    quantize_backbone(loaded, fmt)
    assert_identical(streamed, loaded)
    assert streamed.training is False and streamed.generation_config.to_dict() == loaded.generation_config.to_dict()
    x = torch.randint(0, streamed.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, loaded(x).logits)


def test_load_backbone_streams_tiny_in_bf16_with_checkpointing_like_the_float_path() -> None:
    """model=tiny, dtype bf16 (buffers cast too, as model.to(bf16) does), gradient checkpointing on."""
    cfg = compose_cfg("model.dtype=bf16", "model.gradient_checkpointing=true").model
    fmt = FORMATS["nf4-dq"]
    streamed, tok = load_backbone(cfg, 0, CPU, fmt)
    from lorabench.backbone import load_float

    loaded, _ = load_float(cfg, 0, CPU)
    quantize_backbone(loaded, fmt)
    assert_identical(streamed, loaded)
    assert streamed.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    assert streamed.is_gradient_checkpointing and tok.vocab_size == streamed.config.vocab_size


def test_one_float_linear_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted independently of the loader: every float weight read for a target linear is
    tracked by a weakref; at most one is alive whenever the next is read."""
    live: list[weakref.ref] = []
    most = 0
    read = stream_load.CheckpointReader.tensor

    def counting(self, name, dtype, device):  # noqa: ANN001
        nonlocal most
        t = read(self, name, dtype, device)
        if name.endswith("proj.weight"):
            alive = sum(r() is not None for r in live) + 1
            most = max(most, alive)
            live.append(weakref.ref(t))
        return t

    monkeypatch.setattr(stream_load.CheckpointReader, "tensor", counting)
    for fmt in (FORMATS["nf4-dq"], FORMATS["int4-rtn"]):
        most = 0
        live.clear()
        load_quantized(SHIPPED_DIR, torch.float32, CPU, fmt)
        assert most == 1 and len(live) >= 7 * 2  # 7 linears per layer, every one read


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    float_model = tiny_llama(tie=True)
    float_model.save_pretrained(tmp_path)
    streamed = load_quantized(tmp_path, torch.float32, CPU, FORMATS["nf4-dq"])
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    quantize_backbone(loaded, FORMATS["nf4-dq"])
    assert_identical(streamed, loaded)


def test_a_checkpoint_without_safetensors_falls_back_to_load_then_quantize(tmp_path: Path, caplog) -> None:
    float_model = tiny_llama()
    float_model.config.save_pretrained(tmp_path)
    torch.save(float_model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 saves safetensors only
    cfg = OmegaConf.create({"source": "hf", "name_or_path": str(tmp_path), "dtype": "fp32"})
    shutil.copy(SHIPPED_DIR / "tokenizer.json", tmp_path)
    shutil.copy(SHIPPED_DIR / "tokenizer_config.json", tmp_path)
    with caplog.at_level("INFO", logger="lorabench.backbone"):
        model, _ = load_backbone(cfg, 0, CPU, FORMATS["int4-rtn"])
    assert "holds no safetensors checkpoint" in caplog.text
    expected = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    quantize_backbone(expected, FORMATS["int4-rtn"])
    assert_identical(model, expected)


def truncated_copy(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(SHIPPED_DIR, d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return d


def test_a_truncated_weights_file_is_one_line_naming_it(tmp_path: Path) -> None:
    d = truncated_copy(tmp_path)
    cfg = OmegaConf.create({"source": "hf", "name_or_path": str(d), "dtype": "fp32"})
    for fmt in (FORMATS["nf4-dq"], None):  # streamed, and the float load
        with pytest.raises(ConfigError) as e:
            load_backbone(cfg, 0, CPU, fmt)
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg
        if fmt is not None:
            assert str(d / "model.safetensors") in msg


@pytest.mark.slow
def test_a_job_on_a_truncated_file_fails_and_writes_nothing_completed(tmp_path: Path) -> None:
    from lorabench.training.job import run

    d = truncated_copy(tmp_path)
    cfg = compose_cfg("model=hf", f"model.name_or_path={d}", "model.dtype=fp32", "strategy=qlora",
                      "logger=none", "trainer.device=cpu", "trainer.progress=false", "trainer.threads=1")
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="model.safetensors"):
        run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "model.safetensors" in summary["error"]
    assert not any(p.name.startswith(("adapter", "merged", "checkpoint")) for p in (tmp_path / "run").iterdir())
