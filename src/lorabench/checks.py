"""Register every schema with Hydra and check a composed config before any work.

One place that knows all groups, so a bad key or value is one line naming it
(`lorabench: error: strategy.rank: must be a positive integer, got 0`), never a traceback.
"""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lorabench.backbone.gguf import check_llama_family, resolve_gguf
from lorabench.config import GROUP_SCHEMAS, LorabenchConfig
from lorabench.data import validate_task
from lorabench.errors import ConfigError
from lorabench.strategies.registry import store_schemas, validate_strategy_config
from lorabench.training.optimizer import OPTIMIZERS
from lorabench.training.schedules import available_schedules, build_schedule


def register_configs() -> None:
    """Put every schema in Hydra's ConfigStore (config.yaml lists `lorabench_schema` first;
    each strategy YAML lists `<name>_schema`)."""
    cs = ConfigStore.instance()
    cs.store(name="lorabench_schema", node=LorabenchConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    store_schemas()


def _positive(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    v = OmegaConf.select(cfg, key)
    if v is None or v < 0 or (v == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: expected a number {want}, got {v}")


def _choice(cfg: DictConfig, key: str, choices: list[str]) -> None:
    v = OmegaConf.select(cfg, key)
    if v not in choices:
        raise ConfigError(f"{key}: expected one of {choices}, got '{v}'")


def validate(cfg: DictConfig) -> Any:
    """Check the whole tree before any work; returns the typed strategy config."""
    _choice(cfg, "model.source", ["tiny", "hf", "gguf"])
    _choice(cfg, "model.dtype", ["fp32", "bf16"])
    if cfg.model.source == "hf" and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: required with model.source=hf (a hub id or a local model dir)")
    if cfg.model.source == "gguf":  # the file and the extra that ships it, before any job starts
        if not cfg.model.gguf_file:
            raise ConfigError("model.gguf_file: required with model.source=gguf (a .gguf path or <package>:<file>)")
        check_llama_family(resolve_gguf(cfg.model.gguf_file))
    _choice(cfg, "optim.name", list(OPTIMIZERS))
    for key in ("model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads"):
        _positive(cfg, key)
    _positive(cfg, "model.pretrain_steps", allow_zero=True)
    _positive(cfg, "optim.lr")
    _positive(cfg, "optim.weight_decay", allow_zero=True)
    _positive(cfg, "optim.warmup_steps", allow_zero=True)
    _positive(cfg, "optim.max_grad_norm", allow_zero=True)
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: expected a value in [0, 1], got {cfg.optim.min_lr_ratio}")
    _choice(cfg, "optim.scheduler", available_schedules())
    build_schedule(cfg.optim, cfg.trainer.max_steps)  # schedules refuse bad settings (e.g. a restart period) here
    for key in ("trainer.max_steps", "trainer.batch_size", "trainer.grad_accum_steps", "trainer.eval_batch_size"):
        _positive(cfg, key)
    for key in ("trainer.eval_every", "trainer.checkpoint_every", "trainer.log_every", "trainer.threads"):
        _positive(cfg, key, allow_zero=True)
    _choice(cfg, "trainer.device", ["auto", "cpu", "cuda"])
    _choice(cfg, "logger.backend", ["wandb", "none"])
    _choice(cfg, "logger.mode", ["offline", "online", "disabled"])
    _choice(cfg, "task.loss_on", ["answer", "all"])
    validate_task(cfg.task)
    return validate_strategy_config(cfg.strategy)
