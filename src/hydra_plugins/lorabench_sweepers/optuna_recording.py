"""Hydra instantiates sweepers only from the `hydra_plugins` package, so this shim registers
lorabench's Optuna sweeper there; the logic is in lorabench.training.search (imported lazily:
Hydra imports every plugin module at start-up)."""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

# Hydra imports optuna when it instantiates the sampler, after its logging is set up; optuna's
# storage layer imports alembic, which then logs one INFO line per plugin it registers.
logging.getLogger("alembic").setLevel(logging.WARNING)


class RecordingOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's sweeper, configured the same way, whose study records failed and
    pruned trials instead of stopping at the first one."""

    def __init__(self, **kwargs: Any) -> None:
        from lorabench.training.search import RecordingOptunaSweeperImpl

        self.sweeper = RecordingOptunaSweeperImpl(**kwargs)
