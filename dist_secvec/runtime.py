"""Process-level plumbing shared by every stage: ranks, logging, progress, seeds.

Logs name the rank that speaks; progress and info logs come from rank 0 only. Progress is a live
bar on a terminal and a line every ~10% in a log file (a bar's redraws would fill it with `\r`).
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from typing import Iterable, Optional



def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record, not as it was when logging was set up: a
    caller that swaps stderr (a notebook, a test's capture) never leaves the handler on a closed stream."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str = "info") -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, each line tagged with its rank."""
    lvl = getattr(logging, level.upper())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"[rank {rank()}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(lvl if is_main() else max(lvl, logging.WARNING))
    for noisy in ("datasets", "urllib3", "filelock", "httpx", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every start that the optional PyPI package `kernels` is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, unit: str = "it", **kwargs):
    """Progress on rank 0 when enabled: a tqdm bar when stderr is a terminal, else a LogProgress;
    elsewhere a bar that shows nothing (a plain iterator). Both take update / set_postfix / close."""
    from tqdm.auto import tqdm

    live = enabled and is_main()
    if live and not stderr_is_terminal():
        return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=kwargs.get("initial", 0))
    return tqdm(iterable, total=total, desc=desc, disable=not live, dynamic_ncols=True, leave=False, unit=unit,
                **kwargs)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LogProgress:
    """Progress for a log file: an info line at each tenth of the total and at least every
    `every_s` seconds while it advances, with the time elapsed and left."""

    log = logging.getLogger("dist_secvec.progress")

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every_s: float = 60.0):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.every_s = iterable, total, desc, unit, every_s
        self.n = self.start = initial
        self.t0 = self.last_t = time.monotonic()
        self.last_tenth = self._tenth()

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._tenth() > self.last_tenth or now - self.last_t >= self.every_s:
            self.last_t, self.last_tenth = now, self._tenth()
            elapsed = now - self.t0
            if not self.total:
                self.log.info("%s: %d %s, %s", self.desc, self.n, self.unit, _duration(elapsed))
                return
            done = self.n - self.start
            left = f", ~{_duration((self.total - self.n) * elapsed / done)} left" \
                if 0 < done and self.n < self.total else ""
            self.log.info("%s: %d/%d %s (%d%%), %s elapsed%s", self.desc, self.n, self.total, self.unit,
                          100 * self.n // self.total, _duration(elapsed), left)

    def set_postfix(self, *args, **kwargs) -> None:
        """Not shown: the stages log their losses in their own lines."""

    def close(self) -> None:
        pass


def library_progress(enabled: bool) -> None:
    """The hub's and transformers' own bars (downloads, "Loading weights", "Writing model shards")
    only on rank 0's terminal: anywhere else their redraws would land in a log file."""
    if enabled and is_main() and stderr_is_terminal():
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
