"""Where a logged training record goes: the run's JSONL log and the trackers `logging.report_to` names.

Both stages write every logged record (a training step, a harm-watch check, a held-out epoch)
through one `RunLog.write`, so train_log.jsonl and TensorBoard / Weights & Biases always hold the
same numbers. Only rank 0 writes; on the other ranks a RunLog does nothing.

TensorBoard event files go to output_dir/tensorboard (`tensorboard --logdir runs/`); a resumed run
purges the events after its checkpoint's step, as train_log.jsonl is truncated there.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

from dist_secvec.config import Config
from dist_secvec.training import append_jsonl

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def scalars(rec: dict, group: str) -> dict[str, float]:
    """A record's numbers as tracker tags `group/key` (the step is the x axis, not a scalar)."""
    out = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"{group}/{k}"] = float(v)
    return out


class _TensorBoard:
    def __init__(self, log_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # resume: the events of steps after the checkpoint (written by the run that was stopped) go
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start > 0 else None)
        log.info("logging.report_to: TensorBoard event files in %s", log_dir)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)
        self.writer.flush()  # logged steps are few: a killed run keeps everything up to its last one

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: Config):
        import wandb

        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.logging.project, dir=str(out), name=out.name, config=cfg.to_dict())

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Appends records to `path` (JSONL) and hands their numbers to the configured trackers."""

    def __init__(self, path: Path, cfg: Config, start: int = 0, enabled: bool = True):
        self.path, self.enabled, self.trackers = Path(path), enabled, []
        if not enabled:
            return
        names = cfg.logging.report_to
        if "tensorboard" in names:
            self.trackers.append(_TensorBoard(Path(cfg.output_dir) / TENSORBOARD_DIR, start))
        if "wandb" in names:
            self.trackers.append(_WandB(cfg))

    def write(self, rec: dict, group: str, step: Optional[int] = None) -> None:
        """`rec` as one JSONL line; its numbers as `group/<key>` at `step` (default rec["step"])."""
        if not self.enabled:
            return
        append_jsonl(self.path, rec)
        if self.trackers:
            values = scalars(rec, group)
            for t in self.trackers:
                t.log(values, rec["step"] if step is None else step)

    def close(self) -> None:
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # a tracker that fails to close must not hide the run's own outcome
                log.warning("closing %s failed: %s", type(t).__name__.strip("_"), e)
        self.trackers = []

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
