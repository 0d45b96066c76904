"""Fine-tuning strategies. Importing this package registers every built-in strategy."""

from lorabench.strategies.base import BaseFormat, Strategy, StrategyConfig
from lorabench.strategies.registry import available, build_strategy, register, strategy_class

# Each import registers one strategy (one file per method).
from lorabench.strategies import full, lora  # noqa: E402,F401
from lorabench.strategies import qlora, peft_ref  # noqa: E402,F401
from lorabench.strategies import qalora  # noqa: E402,F401
from lorabench.strategies import relora  # noqa: E402,F401

__all__ = [
    "BaseFormat",
    "Strategy",
    "StrategyConfig",
    "available",
    "build_strategy",
    "register",
    "strategy_class",
]
