"""The options the large-model presets set (conf/model/llama3_2_1b.yaml etc.), on the tiny backbone:
gradient checkpointing changes no number but what autograd keeps, and bitsandbytes' paged AdamW
is refused on CPU in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorabench.errors import ConfigError
from tests.helpers import compose_cfg, run_tiny


def test_gradient_checkpointing_keeps_every_number_and_saves_fewer_activations(tmp_path: Path) -> None:
    plain = run_tiny(tmp_path / "plain", "strategy=lora")
    ckpt = run_tiny(tmp_path / "ckpt", "strategy=lora", "model.gradient_checkpointing=true")
    for key in ("eval/loss", "eval/loss_base", "memory/measured_bytes", "params/trainable"):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-6), key
    assert ckpt["memory/activation_bytes"] < plain["memory/activation_bytes"] / 2


def test_paged_adamw_on_cpu_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        run_tiny(tmp_path, "optim=paged_adamw_8bit")
    assert str(e.value) == "optim.name: paged_adamw_8bit (bitsandbytes paged AdamW) needs CUDA; use optim=adamw on this device"


@pytest.mark.parametrize("preset,hub", [("llama3_2_1b", "meta-llama/Llama-3.2-1B"), ("qwen2_5_0_5b", "Qwen/Qwen2.5-0.5B"),
                                        ("smollm2_360m", "HuggingFaceTB/SmolLM2-360M"), ("smollm2_1_7b", "HuggingFaceTB/SmolLM2-1.7B")])
def test_hub_presets_are_bf16_with_gradient_checkpointing(preset: str, hub: str) -> None:
    m = compose_cfg(f"model={preset}").model
    assert (m.source, m.name_or_path, m.dtype, m.gradient_checkpointing) == ("hf", hub, "bf16", True)


def test_relora_reset_refuses_an_optimizer_without_adamw_moments() -> None:
    import torch

    from lorabench.training.optimizer import prune_moments

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)  # like bitsandbytes' optimizers: other state names
    p.grad = torch.ones(4)
    opt.step()
    with pytest.raises(ConfigError, match=r"^optim.name: the optimizer reset prunes torch AdamW's moments; SGD has none"):
        prune_moments(opt, [p], 0.99, "magnitude")
