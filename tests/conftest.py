"""Session fixtures: an isolated cache dir and quiet, single-threaded torch for every test.

Helpers (tiny models, configs, jobs, trainers) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Callable, Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LORABENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["WANDB_SILENT"] = "true"
    torch.set_num_threads(1)  # tiny models gain nothing from a second thread


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start child processes that never outlive the test, whatever its outcome: each starts in its
    own process group (its W&B service and workers with it), and the whole group is SIGKILLed at
    teardown. `sigint="ignored"` starts it with SIGINT ignored, as a non-interactive shell starts a
    background job; "default" gives it the default disposition."""
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], sigint: str = "default", **kwargs: Any) -> subprocess.Popen:
        disposition = {"ignored": signal.SIG_IGN, "default": signal.SIG_DFL}[sigint]

        def in_child() -> None:
            os.setpgrp()
            signal.signal(signal.SIGINT, disposition)

        proc = subprocess.Popen(cmd, preexec_fn=in_child, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # also what the child left running after it exited
        except ProcessLookupError:
            pass
        proc.wait()
