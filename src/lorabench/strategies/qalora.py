"""QA-LoRA (Xu et al., ICLR 2024): group-pooled LoRA over an INT-N base that merges into INT-N.

The backbone's targeted linears are group-wise INT-N (`backbone/intn.py`); the adapter pools
its input over each quantization group (`adapters/qalora.py`); at the end the update is folded
into the zero points, the merged model (still INT-N) is saved, reloaded and scored.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lorabench.adapters.peft_format import write_peft_adapter
from lorabench.adapters.qalora import POOLINGS, inject_qalora, merge_qalora_and_unload, qalora_layers
from lorabench.adapters.targets import replace_module
from lorabench.backbone.intn import _CODE_QUANTIZERS, SUPPORTED_BITS, IntNLinear
from lorabench.errors import ConfigError
from lorabench.strategies.base import BaseFormat, Strategy, StrategyConfig, check_rank_and_dropout
from lorabench.strategies.registry import register
from lorabench.utils import atomic_write_text

MERGED_DIR = "merged_intn"  # sub-dir of the run dir holding the merged INT-N model
INTN_CONFIG = "intn_config.json"  # which layers are INT-N, and their format


@dataclass
class QALoRAConfig(StrategyConfig):
    name: str = "qalora"  # registry name
    lr: float = 2e-3  # tuned on the default task with pooling=sum (see conf/strategy/qalora.yaml)
    bits: int = 4  # INT-N width of the base weights (2, 3, 4 or 8)
    group_size: int = 32  # g: quantization group along in_features, also the pooling group
    quantizer: str = "rtn"  # how the codes are chosen: rtn (round-to-nearest from min/max); gptq not yet
    pooling: str = "sum"  # sum (paper's Algorithm 1; learns best here) | mean (official code; slower at every lr tried)
    rank: int = 8  # r: rank of the pooled update B@A
    alpha: float = 16.0  # α: the update is scaled by α/r
    dropout: float = 0.0  # dropout on the adapter input (before pooling)
    target_modules: Any = "all-linear"  # 'all-linear' or a list of module names (q_proj, ...)
    merge: str = "zeros"  # none | zeros: fold the adapter into the zero points, save, reload and score

    merge_choices = ("none", "zeros")

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"strategy.bits: INT-N supports bits in {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.group_size <= 0:
            raise ConfigError(f"strategy.group_size: must be a positive integer, got {self.group_size}")
        if self.quantizer not in _CODE_QUANTIZERS:
            raise ConfigError(
                f"strategy.quantizer: expected one of {sorted(_CODE_QUANTIZERS)}, got '{self.quantizer}'"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(f"strategy.pooling: expected one of {list(POOLINGS)}, got '{self.pooling}'")
        check_rank_and_dropout(self.rank, self.dropout)
        if self.merge not in self.merge_choices:
            raise ConfigError(f"strategy.merge: expected one of {list(self.merge_choices)}, got '{self.merge}'")


@register
class QALoRA(Strategy):
    """INT-N base (frozen codes, scales, zeros) + trainable fp32 pooled A and B."""

    name = "qalora"
    config_class = QALoRAConfig

    def base_format(self) -> Optional[BaseFormat]:
        c = self.cfg
        return BaseFormat(
            "intn", c.target_modules, {"bits": c.bits, "group_size": c.group_size, "quantizer": c.quantizer}
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        c = self.cfg
        self.adapted = inject_qalora(
            model, c.target_modules, c.rank, c.alpha, c.dropout, c.pooling, group_size=c.group_size
        )
        return model

    # The seed formula bits/8·N + 16M comes from Strategy.formula_bytes via BaseFormat.bits_per_weight.

    def merge_to_intn(self, model: nn.Module) -> nn.Module:
        """A copy of the model with every adapter folded into its zero points (still INT-N)."""
        return merge_qalora_and_unload(copy.deepcopy(model))

    def merged_for_eval(self, model: nn.Module, out_dir: Path) -> Optional[nn.Module]:
        """Merge into the zeros, save the INT-N model into `out_dir/merged_intn`, reload it and
        return the reloaded copy, so the score is that of the artifact on disk."""
        if self.cfg.merge == "none":
            return None
        merged = self.merge_to_intn(model)
        path = Path(out_dir) / MERGED_DIR
        save_intn_model(merged, path, extra={"merged_from": "qalora", "pooling": self.cfg.pooling})
        device = next(iter(merged.buffers())).device
        reloaded = load_intn_model(path, device=device)
        reloaded.train(model.training)
        return reloaded

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Bytes of the merged INT-N model (packed codes, scales, zeros, unquantized parts; tied
        tensors once) vs the same model with every weight in 16-bit. Merging changes no size."""
        return merged_model_bytes(model)

    def save_artifacts(self, model: nn.Module, out_dir: Path) -> None:
        """The trained pooled adapter (A is r × in/g) and its config; the merged model is
        written by `merged_for_eval`."""
        c = self.cfg
        config = {
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_qalora": True,  # PEFT's flag; note PEFT's QA-LoRA pools as mean × (in/g), see `pooling`
            "qalora_group_size": c.group_size,
            "pooling": c.pooling,
            "bits": c.bits,
            "quantizer": c.quantizer,
        }
        write_peft_adapter(Path(out_dir) / "adapter", qalora_layers(model), config)


def merged_model_bytes(model: nn.Module) -> dict[str, float]:
    """Held bytes and logical parameter count of everything but the adapters, counted by storage."""
    adapters = {id(p) for _, m in qalora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)}
    seen: set[int] = set()
    held = 0
    logical = 0
    for module in model.modules():
        if isinstance(module, IntNLinear):
            logical += module.in_features * module.out_features
            for t in (module.qweight, module.scales, module.zeros):
                held += t.numel() * t.element_size()
            if module.bias is not None:
                logical += module.bias.numel()
                held += module.bias.numel() * module.bias.element_size()
            continue
        for p in module.parameters(recurse=False):
            if id(p) in adapters or p.untyped_storage().data_ptr() in seen:
                continue
            seen.add(p.untyped_storage().data_ptr())
            logical += p.numel()
            held += p.numel() * p.element_size()
    return {"merged/model_bytes": float(held), "merged/model_bytes_16bit": float(2 * logical)}


# ---- the merged INT-N model on disk ------------------------------------------------------------
def save_intn_model(model: nn.Module, path: Path, extra: Optional[dict[str, Any]] = None) -> None:
    """`model.safetensors` (every tensor, codes packed) + the HF `config.json` + `intn_config.json`."""
    if not hasattr(model, "config"):
        raise ConfigError("saving an INT-N model needs a Hugging Face model (with .config)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = {
        n: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "group_size": m.group_size, "bias": m.bias is not None}
        for n, m in model.named_modules()
        if isinstance(m, IntNLinear)
    }
    dtypes = {p.dtype for p in model.parameters()}
    dtype = str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else "float32"
    model.config.save_pretrained(path)
    tmp = path / "model.safetensors.tmp"
    save_model(model, str(tmp))  # handles tied embeddings (saved once)
    tmp.replace(path / "model.safetensors")
    meta = {"format": "lorabench-intn", "dtype": dtype, "layers": layers, **(extra or {})}
    atomic_write_text(path / INTN_CONFIG, json.dumps(meta, indent=2))


def load_intn_model(path: Path, device: Optional[torch.device] = None) -> nn.Module:
    """Rebuild the architecture from `config.json`, put empty IntNLinear layers where the json
    says, and load every tensor strictly (a missing or extra tensor is an error)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / INTN_CONFIG).read_text())
    if meta.get("format") != "lorabench-intn":
        raise ConfigError(f"{path / INTN_CONFIG}: not a lorabench INT-N model")
    dtype = getattr(torch, meta["dtype"])
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for name, spec in meta["layers"].items():
        replace_module(
            model, name,
            IntNLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                       spec["bias"], dtype=dtype),
        )
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    if device is not None:
        model.to(device)
    model.eval()
    return model
