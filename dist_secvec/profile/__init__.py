"""`dist-secvec profile`: time, throughput, FLOPs, MFU and memory of the stage-2 job.

Runs real optimizer steps of the configured stage-2 job: built by stage2.setup_stage2 and stepped
by stage2.train_step, the setup and the step `finetune` runs (under ZeRO-3 too: folded where
finetune folds, the row gate where it gates), each step timed in its data, forward, backward and
optimizer phases (measure).

The vector's overhead: next to the configured job, the variants named in `profile.variants`, each
the same config with a few security_vector overrides (variants.VARIANTS: no_vector, torch,
triton, unfused). Each job is built and runs its warmup steps alone; then their measured steps are
interleaved in rounds (`profile.round_steps` per job in turn, the order rotated every round), so
drift in machine load hits all of them alike, on the same batches in the same order
(`profile.interleave=false`: one after the other). Each variant's peak memory comes from a fresh
process or from this process's CUDA peak (`profile.memory`, peaks), against no_vector's.

Any launcher, any number of ranks: every rank times its own steps; rank 0 gathers every rank's
figures and writes profile.json (one nested schema, see report), profile.md and profile_*.png:
tokens/s in total and per rank, step times (a step lasts as long as its slowest rank), hand-counted
FLOPs (flops), peak memory per rank and the parameter bytes each rank holds next to the whole
model's. Communication time comes from DeepSpeed's wall-clock timers (`profile.deepspeed_timers`):
the gradient reduce of each backward; ZeRO-3's parameter all-gathers run inside forward/backward.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional

from dist_secvec import runtime
from dist_secvec.config import Config, validate
from dist_secvec.data import load_samples, tokenize_samples
from dist_secvec.distributed import barrier, init_distributed, uses_deepspeed
from dist_secvec.errors import UserError
from dist_secvec.model import load_tokenizer
from dist_secvec.profile.flops import flops_per_token, peak_flops
from dist_secvec.profile.measure import PHASES, StepRunner, aggregate, gather, measure_jobs, run_steps, spread
from dist_secvec.profile.memory import (optimizer_state_bytes, param_bytes, peak_memory, secvec_grad_bytes,
                                        secvec_optimizer_bytes)
from dist_secvec.profile.peaks import memory_in_processes, memory_mode, variant_memory
from dist_secvec.profile.report import build_report, no_overhead, overhead_report, summary_line, write_report
from dist_secvec.profile.variants import VARIANTS, build_variant, check_profile_config, runnable, variant_config
from dist_secvec.training import pick_device

__all__ = ["PHASES", "VARIANTS", "StepRunner", "aggregate", "build_variant", "cli_main", "flops_per_token", "gather",
           "measure_jobs", "memory_in_processes", "optimizer_state_bytes", "overhead_report", "param_bytes",
           "peak_flops", "peak_memory", "run_profile", "run_steps", "secvec_grad_bytes", "secvec_optimizer_bytes",
           "spread", "variant_config"]

log = logging.getLogger(__name__)


def run_profile(cfg: Config, prepare: Optional[Callable[[Config], Config]] = None) -> dict:
    """Profile the stage-2 job `cfg` describes, or the one `prepare(cfg)` builds (every rank calls it,
    once the process group is up: the demo's job builds its world and cache behind barriers)."""
    check_profile_config(cfg)
    if runtime.world_size() > 1 or uses_deepspeed(cfg):
        init_distributed(cfg)
    if prepare is not None:
        cfg = prepare(cfg)
        barrier()
    validate(cfg, "finetune")
    p = cfg.profile
    steps, warmup = p.steps, p.warmup
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # read and tokenized once: every variant trains on the same examples
    tok = load_tokenizer(cfg.model)
    train = tokenize_samples(tok, load_samples(cfg.data.train, cfg.data, cfg.data.split, cfg.data.max_samples),
                             cfg.data)
    if not train.examples:
        raise UserError("profile: no training examples left after tokenization")
    device = pick_device()

    skipped: dict[str, str] = {}
    timed: list[str] = []
    reason = None
    if not cfg.security_vector.path:
        reason = "no security vector configured (security_vector.path is null)"
    elif not p.variants:
        reason = "no overhead variants (profile.variants=[])"
    for v in p.variants if reason is None else []:
        why = runnable(v, device)
        if why:
            skipped[v] = why
        else:
            timed.append(v)
    names = ["configured"] + timed
    interleave = p.interleave and len(names) > 1
    n_rounds = math.ceil(steps / p.round_steps)
    # with variants, each job's peak is read after its warmup steps alone: at least one
    w = max(warmup, 1) if len(names) > 1 else warmup

    # each variant's peak memory in fresh processes (first: this process holds no job yet)
    mmode = memory_mode(cfg, device) if len(names) > 1 else "none"
    children = None
    if mmode == "process":
        children = memory_in_processes(cfg, names, min(steps, p.memory_steps), w, out,
                                       use_ds=runtime.world_size() > 1 or uses_deepspeed(cfg),
                                       repeats=p.memory_repeats)

    trace = None
    if p.trace:
        rank = runtime.rank()
        trace = out / ("trace.json" if rank == 0 else f"trace_rank{rank}.json")
    measured = measure_jobs(cfg, names, steps, w, tok, train, trace, interleave, p.round_steps)
    agg = {name: aggregate(m["ranks"]) for name, m in measured.items()}
    if reason is not None:
        overhead = no_overhead(reason)
    else:
        memory = (variant_memory(mmode, measured, children, measured["configured"]["device"]) if len(names) > 1
                  else {"method": None, "reason": "no variant ran next to the configured job", "target": None})
        overhead = overhead_report(agg, measured, skipped, memory, p.round_steps, n_rounds, interleave)
    report = build_report(cfg, measured, agg, overhead, w)
    if runtime.is_main():
        write_report(out, report)
        sv = report["secvec"]
        if sv["grad_bytes"] or sv["optimizer_bytes"]:
            log.error("the security vector got gradients (%d B) or optimizer state (%d B)",
                      sv["grad_bytes"], sv["optimizer_bytes"])
    barrier()
    return report


def cli_main(config: Optional[str], overrides: list[str], steps: Optional[int] = None,
             warmup: Optional[int] = None, debug: bool = False, base: Optional[dict] = None,
             prepare: Optional[Callable[[Config], Config]] = None) -> int:
    """`dist-secvec profile`: with --config the configured stage-2 job; without it, the job
    `prepare` builds from the defaults `base` (the CLI passes the demo's)."""
    from dist_secvec.config import load_config

    extra = ([f"profile.steps={steps}"] if steps is not None else []) + (
        [f"profile.warmup={warmup}"] if warmup is not None else [])
    if config is None:
        cfg = validate(load_config(None, list(overrides) + extra, base=base), "demo")
    else:
        cfg = validate(load_config(config, list(overrides) + extra), "profile")
    runtime.setup_logging("debug" if debug else cfg.logging.level)
    r = run_profile(cfg, prepare=prepare if config is None else None)
    if runtime.is_main():
        print(summary_line(r, Path(cfg.output_dir)))
    return 0
