"""QA-LoRA's variant of the LoRA layer: the adapter sees the input pooled over each
quantization group, so its update folds into the INT-N base's zero points.

`y = Wq x + (α/r) · B(A(dropout(pool(x))))`, pool = mean (official code) or sum (the paper's
Algorithm 1) over each group of g consecutive input features, g = the quantization group.
Dropout after pooling is the official code's order (its mask is in/g wide, not in wide);
`dropout_position=before_pool` gives PEFT's `pool(dropout(x))`.
The update then depends on x only through group aggregates, so its weight change is constant
inside each (group, output) cell (docs/qalora.md#merge-into-the-zero-points):
mean: `z' = z − (α/r)(BA)ᵀ / (g·s)`; sum: `z' = z − (α/r)(BA)ᵀ / s`. q and s stay bitwise;
z' is held in fp32 (exact up to float rounding) or, by choice, fp16 (`strategy.merged_zeros`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorabench.adapters.lora import LoRALinear, LoraVariant, inject_lora, lora_layers
from lorabench.errors import ConfigError
from lorabench.quant.intn import FLOAT_ZEROS, IntNLinear
from lorabench.utils import atomic_write_text

POOLINGS = ("mean", "sum")
DROPOUT_POSITIONS = ("after_pool", "before_pool")  # official code: dropout(pool(x)) | PEFT: pool(dropout(x))


class QALoRAVariant(LoraVariant):
    """Group pooling before A (A is r × in/g, xavier-uniform as the official code); merge into zeros."""

    def __init__(self, base_layer: nn.Module, pooling: str = "sum", group_size: Optional[int] = None,
                 name: str = "layer", dropout_position: str = "after_pool", merged_zeros: str = "fp32") -> None:
        check_pooling_target(base_layer, group_size, name)
        if pooling not in POOLINGS:
            raise ConfigError(f"strategy.pooling: expected one of {list(POOLINGS)}, got '{pooling}'")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ConfigError(f"strategy.dropout_position: expected one of {list(DROPOUT_POSITIONS)}, got '{dropout_position}'")
        if merged_zeros not in FLOAT_ZEROS:
            raise ConfigError(f"strategy.merged_zeros: expected one of {list(FLOAT_ZEROS)}, got '{merged_zeros}'")
        self.pooling = pooling
        self.merged_zeros = merged_zeros
        self.dropout_position = dropout_position
        self.group_size = base_layer.group_size
        self.n_groups = base_layer.in_features // self.group_size
        self.zeros_were_integer = False  # set by merge: unmerge then restores packed integer zeros

    def a_in_features(self, base_layer: nn.Module) -> int:
        return self.n_groups

    def init_lora_a(self, weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        nn.init.xavier_uniform_(weight, generator=generator)

    def adapter_input(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., in/g): mean or sum over each contiguous group of g features."""
        grouped = x.reshape(*x.shape[:-1], self.n_groups, self.group_size)
        return grouped.mean(-1) if self.pooling == "mean" else grouped.sum(-1)

    def dropped_input(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        """dropout(pool(x)) (official code; the saved mask is in/g wide) or pool(dropout(x)) (PEFT)."""
        if self.dropout_position == "after_pool":
            return layer.lora_dropout(self.adapter_input(layer, x))
        return self.adapter_input(layer, layer.lora_dropout(x))

    def pooled_delta(self, layer: LoRALinear) -> torch.Tensor:
        """(α/r)·B@A, (out, in/g) in fp32, divided by g for mean pooling: the weight change of
        every input inside one group."""
        d = (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling
        return d / self.group_size if self.pooling == "mean" else d

    def delta_weight(self, layer: LoRALinear) -> torch.Tensor:
        """The equivalent dense (out, in) change: each group's entry spread over its g inputs."""
        return self.pooled_delta(layer).repeat_interleave(self.group_size, dim=1)

    def merge(self, layer: LoRALinear) -> None:
        """s·(q − z') = s·(q − z) + ΔW gives z' = z − ΔW/s; q and s are not touched. z' is
        fractional, so the base switches to float zero points: computed in fp32 and held so
        (`merged_zeros=fp32`) or rounded once to fp16."""
        base = layer.base_layer
        self.zeros_were_integer = not base.fractional_zeros
        z = base.zero_points() - self.pooled_delta(layer).t() / base.scales.float()
        base.set_fractional_zeros(z, FLOAT_ZEROS[self.merged_zeros])

    def unmerge(self, layer: LoRALinear) -> None:
        """z = z' + ΔW/s. Integer zeros before the merge are restored exactly (packed again)
        when the float held z' to within 1/4 (|z'| < 1/eps: 1024 for fp16, 2^23 for fp32, where
        half a step is ≤ 1/4), so rounding recovers the integers; otherwise z stays fractional."""
        base = layer.base_layer
        held = base.zero_points()
        dtype = base.zeros.dtype
        z = held + self.pooled_delta(layer).t() / base.scales.float()
        maxq = (1 << base.bits) - 1
        zr = z.round()
        if (self.zeros_were_integer and bool((held.abs() < 1 / torch.finfo(dtype).eps).all())
                and bool(((zr >= 0) & (zr <= maxq)).all())):
            base.set_integer_zeros(zr)
        else:
            base.set_fractional_zeros(z, dtype)


def check_pooling_target(layer: nn.Module, group_size: Optional[int], name: str) -> None:
    """Refuse what would make the zero-point merge inexact: a non-INT-N base, a pooling group
    different from the quantization group, or a group that does not tile in_features."""
    if not isinstance(layer, IntNLinear):
        raise ConfigError(
            f"strategy.target_modules: '{name}' has no INT-N base (got {type(layer).__name__}); "
            "QA-LoRA adapts only quantized linears: add it to strategy.quantize_modules"
        )
    g = layer.group_size if group_size is None else group_size
    if g <= 0 or layer.in_features % g:
        raise ConfigError(
            f"strategy.group_size: pooling group {g} does not divide in_features={layer.in_features} of layer '{name}'"
        )
    if g != layer.group_size:
        raise ConfigError(
            f"strategy.group_size: pooling group {g} differs from the quantization group {layer.group_size} "
            f"of layer '{name}'; the merge into zero points is exact only when they are equal"
        )


def inject_qalora(
    model: nn.Module,
    target_modules: Any,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    pooling: str = "sum",
    group_size: Optional[int] = None,
    dropout_position: str = "after_pool",
    merged_zeros: str = "fp32",
) -> list[str]:
    """Freeze `model` and wrap every targeted IntNLinear in a pooled LoRA layer; return the names.

    All targets are checked before any module changes, so a refusal leaves the model intact.
    """
    return inject_lora(
        model, target_modules, rank, alpha, dropout,
        variant=lambda name, base: QALoRAVariant(base, pooling, group_size, name, dropout_position, merged_zeros),
    )


def qalora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every pooled (QA-LoRA) layer in the model, in module order."""
    return [(n, m) for n, m in lora_layers(model) if isinstance(m.variant, QALoRAVariant)]


# ---- the adapter on disk ----------------------------------------------------------------------
QALORA_FORMAT = "lorabench-qalora"  # `format` of adapter_config.json: not PEFT's (see FORWARD)
ADAPTER_CONFIG = "adapter_config.json"  # the config, with the forward equation spelled out
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # `<layer>.lora_A.weight` (r × in/g), `<layer>.lora_B.weight` (out × r)
POOL_EQUATION = {
    "sum": "pool(x)[l] = sum_{i = l*g .. l*g+g-1} x[i]",
    "mean": "pool(x)[l] = (1/g) * sum_{i = l*g .. l*g+g-1} x[i]",
}


def forward_equation(pooling: str, dropout_position: str = "after_pool") -> str:
    """The function the saved adapter computes, as text a reader can reimplement."""
    where = "after pooling (on pool(x))" if dropout_position == "after_pool" else "to x before pooling"
    return (
        "y = W_q x + (lora_alpha / r) * B (A pool(x)); " + POOL_EQUATION[pooling]
        + "; g = group_size; W_q[o, i] = scales[i // g, o] * (codes[o, i] - zeros[i // g, o]) "
        f"(INT-N, bits, RTN codes of the base model); lora_dropout applies {where}, in training only"
    )


def save_qalora_adapter(out_dir: Path, layers: list[tuple[str, LoRALinear]], config: dict[str, Any]) -> None:
    """`adapter_model.safetensors` + `adapter_config.json` in this harness's own format.

    Not PEFT's: PEFT's `use_qalora` pools as mean × (in/g), which is another function than
    either pooling trained here (docs/qalora.md#pooling), so a PEFT-labelled file would load
    without error and compute something else. The config has no `peft_type`, so PEFT refuses it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers:
        tensors[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out_dir / ADAPTER_WEIGHTS)
    meta = {
        "format": QALORA_FORMAT,
        "forward": forward_equation(config["pooling"], config.get("dropout_position", "after_pool")),
        **config,
        "layers": [name for name, _ in layers],
    }
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(meta, indent=2))


def load_qalora_adapter(model: nn.Module, path: Path) -> None:
    """Copy a saved adapter into `model`'s (freshly wrapped) QA-LoRA layers, strictly: the
    format, pooling, group size, rank and scaling must match, and every tensor must be there
    with its shape; anything else is one ConfigError line naming the file."""
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg_path}: not a readable adapter config ({type(e).__name__})") from e
    if meta.get("format") != QALORA_FORMAT:
        raise ConfigError(f"{cfg_path}: format must be '{QALORA_FORMAT}', got {meta.get('format')!r}")
    layers = dict(qalora_layers(model))
    if sorted(meta.get("layers", [])) != sorted(layers):
        raise ConfigError(f"{cfg_path}: layers {meta.get('layers')} differ from the model's {sorted(layers)}")
    for name, layer in layers.items():
        want = {"pooling": layer.variant.pooling, "group_size": layer.variant.group_size,
                "r": layer.rank, "scaling": layer.scaling}
        for key, value in want.items():
            if meta.get(key) != value:
                raise ConfigError(f"{cfg_path}: {key} is {meta.get(key)!r}, layer '{name}' has {value!r}")
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ConfigError(f"{path / ADAPTER_WEIGHTS}: not a readable safetensors file ({type(e).__name__})") from e
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    if set(tensors) != expected:
        raise ConfigError(f"{path / ADAPTER_WEIGHTS}: tensors differ from the model's (missing "
                          f"{sorted(expected - set(tensors))[:3]}, extra {sorted(set(tensors) - expected)[:3]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for ab, lin in (("A", layer.lora_A), ("B", layer.lora_B)):
                t = tensors[f"{name}.lora_{ab}.weight"]
                if t.shape != lin.weight.shape:
                    raise ConfigError(f"{path / ADAPTER_WEIGHTS}: {name}.lora_{ab}.weight is "
                                      f"{tuple(t.shape)}, the model's is {tuple(lin.weight.shape)}")
                lin.weight.copy_(t)
