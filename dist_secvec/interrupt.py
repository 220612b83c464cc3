"""SIGTERM/SIGINT in stage 2: stop cleanly, lose nothing, exit 0 with one line.

Cluster schedulers send SIGTERM before they kill a job (SLURM: at the time limit or on
preemption); a user presses Ctrl-C. What happens depends on the phase of the run:

- loading (data, tokenizer, model, vector, engine, checkpoint; before the first step): stop at
  once (`Stopped` raised from the handler): nothing was trained since the last checkpoint, and
  nothing half-written is left (every file written so far is written atomically).
- training: a flag that the loop reads once per step; under several ranks the flag is summed over
  ranks, so every rank stops at the same step and writes its part of the same checkpoint.
- finishing (checks, unfolding, the atomic save of final/): the save completes, then `Stopped`
  says so (the run is finished).

A second Ctrl-C interrupts at once in every phase.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from dist_secvec.distributed import all_reduce_sum
from dist_secvec.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _LoadInterrupted(BaseException):
    """Raised by the handler while loading; a BaseException so that no loader's `except Exception`
    turns it into a load error. The StopRequest that raised it turns it into `Stopped` on exit."""


def stopped_while_loading(signal_name: str) -> Stopped:
    return Stopped(f"stopped by {signal_name} while loading, before the first training step: nothing was trained "
                   "since the last checkpoint; resume with checkpoint.resume=latest")


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.phase = "load"  # load | train | finish
        self._old: dict = {}
        self._step: Optional[int] = None
        self._flag = False

    @contextlib.contextmanager
    def training(self) -> Iterator["StopRequest"]:
        """The training loop: a signal is a flag read once per step; after it, the finishing phase."""
        if self.signal_name is not None:  # arrived between two checks of the loading phase
            raise stopped_while_loading(self.signal_name)
        self.phase = "train"
        try:
            yield self
        finally:
            self.phase = "finish"

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        if exc_type is _LoadInterrupted:
            raise stopped_while_loading(self.signal_name or "a signal") from None

    def _handler(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        if self.phase == "load":
            raise _LoadInterrupted()

    def requested(self, step: int) -> bool:
        """Whether any rank got a stop signal; asked once per step (cached), the same on every rank."""
        if self._step != step:
            self._step = step
            self._flag = all_reduce_sum([1.0 if self.signal_name else 0.0])[0] > 0
            if self._flag and self.signal_name is None:
                self.signal_name = "a stop signal on another rank"
        return self._flag
