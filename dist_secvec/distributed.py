"""Data parallelism and ZeRO sharding with DeepSpeed, and the engine the training loop drives.

A run uses DeepSpeed when `deepspeed.zero_stage` or `deepspeed.config` is set, or when a launcher
started several ranks (WORLD_SIZE > 1); otherwise it is one plain-torch process. Both sides offer
the same small `Engine` interface (backward, step, save, load), so stage 2's loop is one loop.

Batches: every rank reads the same shuffled stream of examples (one seeded generator); each
global micro-batch is `micro_batch_size * world_size` consecutive examples and rank r trains on
its r-th slice. So 1 rank with micro-batch 4 sees exactly what 2 ranks with micro-batch 2 see.

Loss scaling: an optimizer step averages over every label token of the global batch (all ranks,
all micro-batches). A micro-batch with n label tokens out of N in the global batch contributes
loss * n / N; DeepSpeed averages gradients over the ranks, so each rank multiplies by the
world size to undo that average.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.errors import ConfigError

log = logging.getLogger(__name__)

# what a bare `deepspeed.zero_stage=N` (no JSON) runs with
BASE_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 0},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}


def uses_deepspeed(cfg: Config, several_ranks: bool = True) -> bool:
    """several_ranks: a launch of several ranks alone also means DeepSpeed (stage 2); stage 1 uses
    it only when deepspeed.zero_stage or deepspeed.config asks (else rank 0 trains alone)."""
    asked = cfg.deepspeed.zero_stage is not None or cfg.deepspeed.config is not None
    return asked or (several_ranks and runtime.world_size() > 1)


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> None:
    """Join the process group (gloo on CPU, nccl on GPU, picked by DeepSpeed's accelerator).
    A plain single process gets the environment of a one-rank launch."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=cfg.deepspeed.timeout_s)
    # DeepSpeed makes its own groups (ZeRO's reductions) with dist.new_group(ranks) and no timeout,
    # which falls back to these module defaults (30 min): a hung rank must time them out too
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(timeout=timeout, verbose=False, auto_mpi_discovery=False)
    unlink_shm_buffer()


def unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op) gives each rank a 66 MB buffer,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never
    unlinks it (deepspeed 0.19.8: shared_close is never called), so every CPU run would leave
    132 MB per 2 ranks in /dev/shm, memory that is only freed by a reboot. The
    op maps every other rank's buffer inside init_distributed; once every rank is past it (the
    barrier) the names are no longer needed: each rank removes its own, the mappings stay valid
    until the process exits, and even a killed run leaves nothing behind."""
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    if getattr(ds_comm.cdb, "shm_comm_op", None) is None:  # the same on every rank: no shm buffers
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def _read_ds_json(value: Any) -> dict:
    if value is None:
        return copy.deepcopy(BASE_DS_CONFIG)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    try:
        data = json.loads(Path(value).read_text())
    except OSError as e:
        raise ConfigError(f"config key 'deepspeed.config': cannot read '{value}' ({e.strerror}); fix the path")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config key 'deepspeed.config': '{value}' is not valid JSON ({e}); fix the file")
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'deepspeed.config': '{value}' must hold a JSON object")
    return data


def _fill(section: dict, key: str, value: Any, where: str, ours: str) -> None:
    """Set an "auto" (or absent) key; a concrete value must agree with the run config."""
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        raise ConfigError(f"DeepSpeed JSON {where}: '{key}' is {have!r} but {ours} gives {value!r}; "
                          f"set it to \"auto\" or make them agree")


def ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config of this run: the JSON (or the built-in base) with every "auto" filled
    from the run config, the ZeRO stage and offload switches applied, and no optimizer block (the
    optimizer is the run's torch AdamW over the trainable parameters only)."""
    src = cfg.deepspeed.config if isinstance(cfg.deepspeed.config, str) else "(inline)"
    ds = _read_ds_json(cfg.deepspeed.config)
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(f"DeepSpeed JSON {src}: remove the \"{block}\" block; the optimizer and schedule "
                              "come from the run config's optim section (optim.lr, optim.schedule, ...)")
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", o.micro_batch_size, src, "optim.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", o.gradient_accumulation_steps, src,
          "optim.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", o.micro_batch_size * o.gradient_accumulation_steps * world_size, src,
          "micro_batch_size x gradient_accumulation_steps x ranks")
    _fill(ds, "gradient_clipping", float(o.max_grad_norm or 0.0), src, "optim.max_grad_norm")
    dtype = cfg.model.dtype
    for name, want in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        block = ds.setdefault(name, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = want
        elif bool(block["enabled"]) != want:
            raise ConfigError(f"DeepSpeed JSON {src}: '{name}.enabled' is {block['enabled']} but model.dtype is "
                              f"{dtype}; set it to \"auto\"")
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.deepspeed.offload_param:
        if zero["stage"] != 3:
            raise ConfigError("config key 'deepspeed.offload_param': parameter offload needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # the run's torch AdamW steps on the CPU copy
    for k, v in list(zero.items()):
        if v == "auto":  # HF-style size keys we do not derive: DeepSpeed's defaults
            del zero[k]
    ds.setdefault("steps_per_print", 1000000000)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def partitioned_loading(ds: Optional[dict], quantization: str) -> Any:
    """Under ZeRO-3 with a 16-bit/32-bit base: the HfDeepSpeedConfig that makes from_pretrained
    partition the weights while loading (no rank holds the whole model) and makes generate keep
    the ranks in step; None otherwise (transformers loads a bitsandbytes base whole on each rank,
    deepspeed.initialize partitions it). Keep it alive while the model is in use."""
    if not ds or zero_stage(ds) != 3 or quantization != "none":
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds)


def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list, modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Whole tensors inside the block for ZeRO-3 partitioned parameters; a no-op otherwise."""
    zp = [p for p in params if is_partitioned(p)]
    if not zp:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zp, modifier_rank=modifier_rank):
        yield


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum over ranks (identity in one process)."""
    return _collective(values, lambda t, dist: dist.all_reduce(t))


def from_rank0(values: list[float]) -> list[float]:
    """Rank 0's values on every rank (identity in one process): a decision all ranks must share."""
    return _collective(values, lambda t, dist: dist.broadcast(t, 0))


def _collective(values: list[float], op) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        t = t.cuda()
    op(t, dist)
    return t.cpu().tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_batches(examples: list, micro_batch_size: int, rank: int, world: int,
                 generator: torch.Generator, shuffle: bool = True, skip: int = 0,
                 key: Optional[Callable] = None, per_step: int = 1) -> Iterator[list]:
    """This rank's micro-batches of an endless stream of examples, reshuffled each epoch by the
    seeded generator (the same on every rank); the first `skip` micro-batches are passed over
    (resume). Every micro-batch is full: the stream runs on into the next epoch.

    key, per_step: the rows of each optimizer step (per_step micro-batches on every rank) sorted by
    key(example) before they are dealt out, so that rows alike (the per-row gate's vector on or
    off) fill whole micro-batches. A step's gradient is a sum over its rows: the order inside it
    changes nothing but rounding."""
    def stream():
        while True:
            order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else range(len(examples))
            yield from order

    it = stream()
    size = micro_batch_size * world
    group = per_step if key is not None else 1
    n = 0
    while True:
        idx = [next(it) for _ in range(size * group)]
        if key is not None:
            idx.sort(key=lambda j: key(examples[j]))  # stable: ties keep the shuffled order
        for c in range(group):
            n += 1
            if n > skip:
                mine = idx[c * size + rank * micro_batch_size:c * size + (rank + 1) * micro_batch_size]
                yield [examples[j] for j in mine]


def label_tokens(group: list[dict]) -> tuple[list[int], float]:
    """The label tokens of each of this rank's micro-batches (collated, labels shifted as the loss
    sees them) and of the whole global batch: all ranks, all micro-batches, at least 1. Collective
    under several ranks: every rank calls it once per optimizer step."""
    from dist_secvec.data import IGNORE_INDEX

    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group]
    return counts, max(sum(all_reduce_sum([float(sum(counts))])), 1)


def micro_loss(engine, batch: dict, n: int) -> torch.Tensor:
    """The forward of one micro-batch through the engine (never engine.module: ZeRO-3 counts its
    micro-steps there): the mean loss over its n label tokens. With none (rows cut to their prompt)
    the forward still runs, so every rank gathers the same ZeRO-3 parameters, and the loss is 0."""
    if n:
        return engine(**batch).loss
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum() * 0


def loss_weight(n: int, world: int, n_tokens: float) -> float:
    """What a micro-batch's mean loss is multiplied by before backward, so that after DeepSpeed's
    average over ranks (and none over micro-batches) the gradient is that of the mean over all
    n_tokens label tokens of the global batch: ranks x micro-batch x accumulation == one batch."""
    return n * world / n_tokens


# ---------------------------------------------------------------------------------------------
# the engine


class PlainEngine:
    """One process, plain torch: AdamW over the trainable parameters, clipping, schedule."""

    deepspeed = False

    def __init__(self, model, params: list, optimizer, scheduler, max_grad_norm: Optional[float]):
        self.module, self.params, self.optimizer, self.scheduler = model, params, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self._clipped: Optional[float] = None  # the norm check_grads clipped by, for the step after it

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def check_grads(self) -> tuple[bool, Optional[float]]:
        """At the accumulation boundary, before step or skip_step: (every gradient finite, the total
        norm; None without clipping). With optim.max_grad_norm the gradients are clipped here, and
        clipping's total norm is the check (NaN/inf when any gradient is); without, one pass."""
        if not self.max_grad_norm:
            return self.grads_finite(), None
        self._clipped = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        return math.isfinite(self._clipped), self._clipped

    def step(self, boundary: bool) -> Optional[float]:
        """At the accumulation boundary: clip (unless check_grads did), update, advance the
        schedule; returns the grad norm."""
        if not boundary:
            return None
        norm, self._clipped = self._clipped, None
        if norm is None and self.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        self._clipped = None
        self.optimizer.zero_grad(set_to_none=True)

    def grads_finite(self) -> bool:
        """Without clipping: the total norm alone, one fused pass and one sync (not one per tensor)."""
        from dist_secvec.training import grad_total_norm

        return math.isfinite(grad_total_norm(self.params))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def optimizer_param_ids(self) -> set[int]:
        return {id(p) for g in self.optimizer.param_groups for p in g["params"]}


class DeepSpeedEngine:
    """deepspeed.initialize around the model, the run's torch AdamW and schedule."""

    deepspeed = True

    def __init__(self, model, params: list, optimizer, scheduler, ds: dict):
        import deepspeed

        self.ds = ds
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        self.module = self.engine.module

    def __call__(self, **batch):
        # through the engine, not the module: its forward advances ZeRO's micro-step counter,
        # without which a second micro-batch overwrites the first one's gradients
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop weights by tokens itself

    def step(self, boundary: bool) -> Optional[float]:
        self.engine.step()  # DeepSpeed counts micro-steps and updates at its accumulation boundary
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step_applied(self) -> bool:
        """Whether the last boundary step updated the weights: False when DeepSpeed's ZeRO
        optimizer found a non-finite gradient norm and dropped the step itself."""
        return bool(self.engine.was_step_applied())

    def skip_reason(self) -> Optional[str]:
        """Why this engine cannot skip a step cleanly (None: it can; see skip_step)."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = self.engine.optimizer
        if isinstance(opt, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            return None
        if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "overflow"):
            return None  # ZeRO stage 0, fp32: the run's own AdamW, unwrapped
        return f"DeepSpeed's {type(opt).__name__} (ZeRO stage 0 with 16-bit weights)"

    def skip_step(self) -> None:
        """The accumulation boundary of a step whose loss was NaN/inf on some rank (every rank
        calls it: the ranks agree on the verdict). It goes through DeepSpeed's own overflow path,
        the one a fp16 overflow takes, forced: the ZeRO optimizer (its collectives unchanged)
        reports an overflow, drops the reduced gradients (partitions, offload buffers) and does
        not update; the engine then counts a skipped step, does not advance the schedule, zeroes
        the gradients and advances its micro-step and global-step counters as for any boundary.
        The weights, optimizer states and schedule stay exactly as before the step."""
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        opt = self.engine.optimizer
        assert self.engine.is_gradient_accumulation_boundary(), "skip_step outside an accumulation boundary"
        patch: dict = {}  # instance attributes set for this one step, restored (or removed) after it
        if isinstance(opt, DeepSpeedZeroOptimizer):  # ZeRO 1 and 2
            check = opt.check_overflow

            def forced_check(*args, **kwargs):
                check(*args, **kwargs)
                opt.overflow = True
            patch = {"check_overflow": forced_check, "check_grad_overflow": True}
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            check = opt._overflow_check_and_loss_scale_update

            def forced_check(*args, **kwargs):
                check(*args, **kwargs)
                opt.overflow = True
                return True
            patch = {"_overflow_check_and_loss_scale_update": forced_check}
        elif self.skip_reason() is None:  # the bare torch optimizer (ZeRO 0, fp32): no update at all
            patch = {"step": lambda *args, **kwargs: opt.zero_grad(set_to_none=True), "overflow": True}
        else:
            raise RuntimeError(f"skip_step: {self.skip_reason()} cannot skip a step")  # refused before training
        missing = object()
        saved = {k: opt.__dict__.get(k, missing) for k in patch}
        opt.__dict__.update(patch)
        try:
            self.engine.step()
        finally:
            for k, v in saved.items():
                if v is missing:
                    opt.__dict__.pop(k, None)
                else:
                    opt.__dict__[k] = v
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step that was to be skipped")  # a bug

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def optimizer_param_ids(self) -> set[int]:
        """The parameters the (ZeRO) optimizer owns: its partitioned 16-bit groups."""
        opt = self.engine.optimizer
        groups = getattr(opt, "fp16_groups", None) or getattr(opt, "bit16_groups", None)
        if groups is None:
            groups = [g["params"] for g in opt.param_groups]
        return {id(p) for g in groups for p in g}


def numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, partitioned (ZeRO-3) or not."""
    return int(getattr(p, "ds_numel", p.numel()))


def held_numel(p: torch.nn.Parameter) -> int:
    """Elements this rank holds: its ZeRO-3 partition, or the whole tensor."""
    return int(p.ds_tensor.numel()) if is_partitioned(p) else int(p.numel())


def partition_report(groups: dict[str, list]) -> list[dict]:
    """Per rank and parameter group: elements held vs total and the largest share of any one
    parameter this rank holds (1/ranks, rounded up, when ZeRO-3 partitions everything).
    Collective: every rank calls it; every rank gets the list for all ranks."""
    import torch.distributed as dist

    mine = {}
    for name, params in groups.items():
        params = [p for p in params if numel(p)]
        mine[name] = {"held": sum(held_numel(p) for p in params), "total": sum(numel(p) for p in params),
                      "max_share": max((held_numel(p) / numel(p) for p in params), default=0.0)}
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
