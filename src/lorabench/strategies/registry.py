"""Name → Strategy class. Built-in strategies are found by scanning this package, third-party
ones through the `lorabench.strategies` entry-point group or a `strategy._target_` class path,
so adding a strategy never means editing a list.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lorabench.errors import ConfigError
from lorabench.registry import Registry
from lorabench.strategies.base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name")
ENTRY_POINT_GROUP = "lorabench.strategies"  # third-party packages list their strategy modules here
_NOT_STRATEGIES = {"base", "registry"}  # modules of this package that define no strategy
_discovered = False


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available as `strategy=<cls.name>`."""
    return STRATEGIES.add(cls.name, cls)


def discover() -> None:
    """Import every module of this package and every entry point once (each registers itself)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("lorabench.strategies")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name not in _NOT_STRATEGIES and not info.name.startswith("_"):
            _import(f"lorabench.strategies.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _import(ep.value.split(":")[0])


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # a broken strategy file names itself in one line
        raise ConfigError(f"strategy module '{module}' failed to import: {type(e).__name__}: {e}") from e


def available() -> list[str]:
    """Sorted names of every registered strategy."""
    discover()
    return STRATEGIES.names()


def strategy_class(name: str) -> type[Strategy]:
    """Look up a strategy by name, with a one-line error naming the choices."""
    discover()
    return STRATEGIES.get(name)


def _class_for(node: DictConfig | dict[str, Any]) -> type[Strategy]:
    """The class a node selects: `_target_` (a class path, registered on first use) or `name`."""
    target = node.get("_target_")
    if target:
        module, _, attr = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"strategy._target_: cannot import '{target}' ({type(e).__name__}: {e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError(f"strategy._target_: '{target}' is not a lorabench Strategy subclass")
        return register(cls)
    return strategy_class(node.get("name"))


def validate_strategy_config(node: DictConfig | dict[str, Any]) -> Any:
    """Check a strategy node against its dataclass schema; return the typed config object."""
    cls = _class_for(node)
    schema = OmegaConf.structured(cls.config_class)
    try:
        if isinstance(node, DictConfig):  # resolve ${...} against the whole tree first
            node = OmegaConf.to_container(node, resolve=True)
        node = {k: v for k, v in node.items() if k != "_target_"}
        merged = OmegaConf.merge(schema, node)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"strategy.{key}: {msg} (strategy '{cls.name}')") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def build_strategy(node: DictConfig | dict[str, Any], seed: int = 0) -> Strategy:
    """Validate the node and instantiate its strategy."""
    cls = _class_for(node)
    return cls(validate_strategy_config(node), seed=seed)


def store_schemas() -> None:
    """Put each strategy's dataclass in Hydra's ConfigStore as `strategy/<name>_schema`, so
    a strategy YAML lists it in its defaults and holds only its deviations."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name in available():
        cs.store(group="strategy", name=f"{name}_schema", node=STRATEGIES.get(name).config_class)
