"""Fine-tuning strategies, one module each, found by scanning this package (see `registry`)."""

from lorabench.strategies.base import BaseFormat, Strategy, StrategyConfig
from lorabench.strategies.registry import available, build_strategy, discover, register, strategy_class

__all__ = [
    "BaseFormat",
    "Strategy",
    "StrategyConfig",
    "available",
    "build_strategy",
    "discover",
    "register",
    "strategy_class",
]
