"""SIGTERM/SIGINT during training: finish the current step, checkpoint, exit 0.

Cluster schedulers send SIGTERM before they kill a job (SLURM: at the time limit or on
preemption); a user presses Ctrl-C. Either sets a flag that the training loop reads once per
step; under several ranks the flag is summed over ranks, so every rank stops at the same step
and writes its part of the same checkpoint. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from dist_secvec.distributed import all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._old: dict = {}
        self._step: Optional[int] = None
        self._flag = False

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handler(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        """Whether any rank got a stop signal; asked once per step (cached), the same on every rank."""
        if self._step != step:
            self._step = step
            self._flag = all_reduce_sum([1.0 if self.signal_name else 0.0])[0] > 0
            if self._flag and self.signal_name is None:
                self.signal_name = "a stop signal on another rank"
        return self._flag
