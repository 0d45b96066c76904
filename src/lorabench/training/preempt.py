"""Preemption: a signal asks a job to stop, the job stops at the next step boundary with a checkpoint.

SLURM warns a job before preempting it or hitting its time limit (SIGUSR1/SIGUSR2 through
`--signal`, SIGTERM on `scancel` and preemption). Acting inside the signal handler would
interrupt a step half-way (a torn optimizer update, a half-written file), so the handler only
notes the signal; the trainer asks `PreemptionGuard.requested()` between steps, writes a
checkpoint and raises `Preempted`. The job records `status: preempted`; under submitit the CLI
then hands over to submitit's own checkpoint-and-requeue handler (the launcher's `checkpoint`
hook resubmits the same job, which resumes from the checkpoint); elsewhere the process exits
with 128 + the signal number.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any, Callable, Optional

from lorabench.errors import Interrupted

# The signal submitit binds to checkpoint-and-requeue (its default; SUBMITIT_PREEMPT_SIGNAL overrides it).
SUBMITIT_SIGNAL = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


def preemption_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGUSR1 and submitit's requeue signal (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    names = dict.fromkeys(("SIGTERM", "SIGUSR1", SUBMITIT_SIGNAL))
    return tuple(getattr(signal, n) for n in names if hasattr(signal, n))


class Preempted(Interrupted):
    """The job stopped at a step boundary on a preemption signal, after writing its checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class PreemptionGuard:
    """While entered, SIGTERM/SIGUSR1/SIGUSR2 are noted instead of acted on; `requested()` says which.

    The handlers that were installed before (submitit's among them) are restored on exit, so the
    CLI can then hand a preempted job over to submitit's requeue handler.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum

    def requested(self) -> Optional[int]:
        """The first preemption signal received since entering, else None."""
        return self.signum

    def __enter__(self) -> "PreemptionGuard":
        try:
            for sig in preemption_signals():
                self.previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread (a thread-based launcher): signals stay as they were
            self.__exit__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def submitit_requeue_handler() -> Optional[Callable[[int, Optional[FrameType]], None]]:
    """submitit's checkpoint-and-requeue handler when this process is a submitit job, else None."""
    sig = getattr(signal, SUBMITIT_SIGNAL, None)
    handler = signal.getsignal(sig) if sig is not None else None
    if not os.environ.get("SUBMITIT_EXECUTOR") or not callable(handler):
        return None
    owner = getattr(handler, "__self__", None)
    return handler if type(owner).__module__.startswith("submitit.") else None


def requeue_or_exit(preempted: Preempted, message: Callable[[], str]) -> None:
    """Call after the guard has exited. Under submitit: its handler pickles the job through the launcher's `checkpoint` hook, requeues
    it and exits. Elsewhere: print `message()` and exit with 128 + the signal number."""
    import sys

    handler = submitit_requeue_handler()
    if handler is not None:
        print(f"lorabench: {preempted}; requeued through submitit", file=sys.stderr)
        handler(getattr(signal, SUBMITIT_SIGNAL), None)  # raises SystemExit after requeueing
    print(f"lorabench: {message()}", file=sys.stderr)
    sys.exit(128 + preempted.signum)

