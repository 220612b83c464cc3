"""Process-level plumbing shared by every stage: ranks, logging, progress, seeds.

Logs name the rank that speaks; progress bars and info logs come from rank 0 only.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Iterable, Optional

from dist_secvec import files

atomic_dir = files.atomic_dir  # dist_secvec.profile saves through runtime.atomic_dir


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def setup_logging(level: str = "info") -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, each line tagged with its rank."""
    lvl = getattr(logging, level.upper())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank()}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(lvl if is_main() else max(lvl, logging.WARNING))
    for noisy in ("datasets", "urllib3", "filelock", "httpx", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every start that the optional PyPI package `kernels` is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, **kwargs):
    """A tqdm bar on rank 0 (and only when enabled); a plain iterator elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not (enabled and is_main()), dynamic_ncols=True,
                leave=False, **kwargs)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
