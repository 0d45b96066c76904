"""Name → Strategy class, filled by the `@register` decorator in each strategy file."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lorabench.errors import ConfigError
from lorabench.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available as `strategy=<cls.name>`."""
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Sorted names of every registered strategy."""
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    """Look up a strategy by name, with a one-line error naming the choices."""
    if name not in _REGISTRY:
        raise ConfigError(f"strategy.name: unknown strategy '{name}', expected one of {available()}")
    return _REGISTRY[name]


def validate_strategy_config(node: DictConfig | dict[str, Any]) -> Any:
    """Check a strategy node against its dataclass schema; return the typed config object."""
    name = node.get("name")
    cls = strategy_class(name)
    schema = OmegaConf.structured(cls.config_class)
    try:
        if isinstance(node, DictConfig):  # resolve ${...} against the whole tree first
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(schema, node)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"strategy.{key}: {msg}") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def build_strategy(node: DictConfig | dict[str, Any], seed: int = 0) -> Strategy:
    """Validate the node and instantiate its strategy."""
    cfg = validate_strategy_config(node)
    return strategy_class(cfg.name)(cfg, seed=seed)
