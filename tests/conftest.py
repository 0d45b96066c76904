"""Session fixtures: an isolated cache dir and quiet, single-threaded torch for every test.

Helpers (tiny models, configs, jobs, trainers) live in tests/helpers.py.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LORABENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["WANDB_SILENT"] = "true"
    torch.set_num_threads(1)  # tiny models gain nothing from a second thread
