"""Preemption: a signal asks a job to stop, the job stops at the next step boundary with a checkpoint.

SLURM warns a job before preempting it or hitting its time limit (SIGUSR1/SIGUSR2 through
`--signal`, SIGTERM on `scancel` and preemption). Acting inside the signal handler would
interrupt a step half-way (a torn optimizer update, a half-written file), so the handler only
notes the signal; the trainer asks `PreemptionGuard.requested()` between steps, writes a
checkpoint and raises `Preempted`. The job records `status: preempted`; under submitit the CLI
then hands over to submitit's own checkpoint-and-requeue handler (the launcher's `checkpoint`
hook resubmits the same job, which resumes from the checkpoint); elsewhere the process exits
with 128 + the signal number.

Ctrl-C (SIGINT) is handled by the same guard, whatever disposition the process inherited (a
job started in the background by a non-interactive shell inherits SIGINT as ignored, and Python
then installs no KeyboardInterrupt handler). Inside the training loop's deferred sections (a
step, its log lines, a checkpoint write: `deferred_interrupts`) it is noted like SIGTERM and the
trainer stops at the next step boundary with a checkpoint; everywhere else (loading, evaluation,
merging: sections with no step boundary soon, `interruptible`) the handler raises
KeyboardInterrupt at once, and the job resumes from its last checkpoint. Either way the job ends
`interrupted` and the CLI prints one line and exits 130.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Iterator, Optional

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


# Module state, since signal dispositions are process-wide: how many deferred sections enclose
# the running code, and the guard whose handlers are installed.
_deferring = 0
_active: Optional["PreemptionGuard"] = None


class PreemptionGuard:
    """While entered, SIGTERM/SIGUSR1/SIGUSR2 (and SIGINT inside deferred sections) are noted
    instead of acted on; `requested()` says which. SIGINT outside a deferred section raises
    KeyboardInterrupt.

    The handlers that were installed before (submitit's among them, or SIGINT's inherited
    SIG_IGN) are restored on exit, so the CLI can then hand a preempted job over to submitit's
    requeue handler.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.interrupted = False  # a SIGINT arrived (Ctrl-C wins over a requeue: the user asked to stop)
        self.previous: dict[int, Any] = {}
        self._outer: Optional[PreemptionGuard] = None

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            self.interrupted = True
            if not _deferring:
                raise KeyboardInterrupt

    def requested(self) -> Optional[int]:
        """SIGINT if one arrived since entering, else the first preemption signal, else None."""
        return int(signal.SIGINT) if self.interrupted else self.signum

    def __enter__(self) -> "PreemptionGuard":
        global _active
        try:
            for sig in (*preemption_signals(), signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._note)
        except ValueError:  # not the main thread (a thread-based launcher): signals stay as they were
            self.__exit__()
            return self
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        if _active is self:
            _active = self._outer


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A section that SIGINT must not cut (a training step, a log line, a checkpoint write): the
    signal is noted and the trainer acts on it at the next step boundary."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextmanager
def interruptible() -> Iterator[None]:
    """A section with no step boundary soon (an evaluation) inside a deferred one: SIGINT raises
    KeyboardInterrupt at once, also when it arrived just before the section began."""
    global _deferring
    saved, _deferring = _deferring, 0
    try:
        if _active is not None and _active.interrupted:
            raise KeyboardInterrupt
        yield
    finally:
        _deferring = saved


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

