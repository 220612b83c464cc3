"""The profiled jobs: the configured stage-2 job and its overhead variants.

A variant is the user's config with a few security_vector overrides; every job is built by
stage2.setup_stage2, exactly as `finetune` builds it (folded or attached, the paths chosen at
attach from the variant's own keys, the row gate).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

import torch

from dist_secvec.config import Config
from dist_secvec.errors import ConfigError, UserError
from dist_secvec.stage2 import Stage2, setup_stage2

VARIANTS = {
    "no_vector": {"path": None},  # the baseline: the same job without the vector
    "torch": {"backend": "torch", "fold": False},
    "triton": {"backend": "triton", "fold": False},
    "unfused": {"fold": False, "fused_lora": False, "weight_delta": False},  # the plain delta on every layer
}


def variant_config(cfg: Config, name: str) -> Config:
    """The config of job `name`: configured (the user's) or one of VARIANTS."""
    if name == "configured":
        return cfg
    return dataclasses.replace(cfg, security_vector=dataclasses.replace(cfg.security_vector, **VARIANTS[name]))


def build_variant(cfg: Config, name: str = "configured", tok=None, train=None,
                  row_weight: Optional[dict] = None) -> Stage2:
    """Job `name`, built as finetune builds it; every rank calls this. Without `train`, data.train's
    rows are read and, under data.audit, audited as finetune does; `train` and `row_weight`: the
    rows (and data.audit=downweight's weights) another job's audit left, trained as given."""
    job = setup_stage2(variant_config(cfg, name), tok=tok, train=train, ds_timers=cfg.profile.deepspeed_timers)
    if row_weight is not None:
        job.row_weight = row_weight
    return job


def check_profile_config(cfg: Config) -> None:
    """The profile section's keys, in one line each (exit 2)."""
    p = cfg.profile
    if p.steps < 1 or p.warmup < 0:
        raise UserError(f"profile: need --steps >= 1 and --warmup >= 0, got {p.steps} and {p.warmup}")
    bad = [v for v in p.variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"config key 'profile.variants': unknown variant(s) {', '.join(bad)}; "
                          f"choose from {', '.join(VARIANTS)}")
    if len(set(p.variants)) < len(p.variants):
        raise ConfigError(f"config key 'profile.variants': {p.variants} names a variant twice")
    for key in ("round_steps", "memory_steps", "memory_repeats"):
        if getattr(p, key) < 1:
            raise ConfigError(f"config key 'profile.{key}': must be >= 1, got {getattr(p, key)}")
    if p.memory_timeout_s <= 0:
        raise ConfigError(f"config key 'profile.memory_timeout_s': must be > 0, got {p.memory_timeout_s}")


def runnable(name: str, device: torch.device) -> Optional[str]:
    """Why variant `name` cannot run here (None: it can)."""
    if name != "triton":
        return None
    if device.type != "cuda":
        return "Triton path needs CUDA; this run is on CPU"
    try:
        importlib.import_module("dist_secvec.kernels.secvec_delta")
    except Exception as e:  # no usable triton
        return f"triton unavailable: {type(e).__name__}: {e}"
    return None
