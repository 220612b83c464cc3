"""Pieces both training stages share: device, optimizer, schedule, step count, loss helpers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_secvec.config import OptimConfig


def pick_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK under a launcher), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def total_steps(n_examples: int, cfg: OptimConfig, world_size: int = 1) -> int:
    """Optimizer steps: optim.max_steps, or optim.epochs passes over the data (a global batch is
    micro_batch_size x gradient_accumulation_steps x ranks examples)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None:
        raise RuntimeError("optim.epochs unresolved: call config.resolve_stage_defaults first")  # a bug
    per_epoch = math.ceil(n_examples / (cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size))
    return max(1, per_epoch * cfg.epochs)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, steps: int):
    """torch AdamW over exactly `params` (never the security vector) and a warmup schedule. In one
    plain process its fused kernel (one pass per tensor, where torch's default on CPU runs a chain
    of element-wise ops per tensor); under DeepSpeed, which steps it over its own partitions,
    torch's default."""
    import torch.distributed as dist
    from transformers import get_scheduler

    if cfg.lr is None:
        raise RuntimeError("optim.lr unresolved: call config.resolve_stage_defaults first")  # a bug

    fused = not (dist.is_available() and dist.is_initialized()) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=steps)
    return optimizer, scheduler


def grad_total_norm(params: list[torch.nn.Parameter]) -> float:
    """The total 2-norm of the gradients, the one clipping takes, in one fused pass and one sync:
    NaN/inf when any gradient is, so it is also the non-finite check."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`; other inputs (a packed batch's flags and lengths) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def masked_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p_ref || p) = sum_v p_ref (log p_ref - log p)."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
