"""Timed optimizer steps of stage-2 jobs, and their figures over steps and ranks.

A step is stage2.train_step, the step finetune runs, with its data (collate + to_device), forward,
backward and optimizer (clip + step + schedule + zero_grad) phases timed, torch.cuda.synchronize
around each on CUDA.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.distributed import held_numel
from dist_secvec.errors import UserError
from dist_secvec.profile import variants
from dist_secvec.profile.flops import flops_per_token
from dist_secvec.profile.memory import (grad_bytes, held_bytes, mark_memory, master_param_bytes, optimizer_state_bytes,
                                        param_bytes, peak_memory, peak_since, resident_bytes, secvec_grad_bytes,
                                        secvec_optimizer_bytes, vector_tensors, whole_bytes, zero_grad_bytes)
from dist_secvec.secvec import path_calls
from dist_secvec.stage2 import Stage2, train_step
from dist_secvec.training import pick_device

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer")
COMM_TIMER = "bwd_allreduce_microstep"  # deepspeed.utils.timer.BACKWARD_REDUCE_MICRO_TIMER


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def comm_seconds(engine) -> Optional[float]:
    """The gradient reduce time of the micro-step DeepSpeed just finished (its wall-clock timer,
    refreshed at every engine.step); None without DeepSpeed or with its timers off."""
    if not getattr(engine, "deepspeed", False):
        return None
    cache = getattr(engine.engine, "engine_timers_cache", None) or {}
    ms = cache.get(COMM_TIMER)
    return None if ms is None else ms / 1000.0


class StepRunner:
    """Optimizer steps of one job, one at a time, each phase timed: run_steps runs them back to
    back, measure_jobs interleaves the steps of several jobs. Every job draws its micro-batches in
    finetune's order from the same seed, so step i of each variant sees the same batches."""

    def __init__(self, job: Stage2):
        self.job = job
        self.micro = job.batches()
        self.records: list[dict] = []
        self.mem: dict = {"grad_bytes": 0, "secvec_grad_bytes": 0}
        self.zero_opt = job.engine.engine.optimizer if job.use_ds else None
        self.steps_done = 0
        self.peak: Optional[dict] = None  # set by the caller to report a peak taken earlier (see peak_memory)
        self.rec: dict = {}
        job.model.train()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """train_step's timer: adds the phase's seconds to the step's record."""
        job, dev, rec = self.job, self.job.device, self.rec
        if name == "optimizer":  # the gradients as they are before the optimizer step clears them
            mem = self.mem
            mem["grad_bytes"] = max(mem["grad_bytes"], grad_bytes(job.model) +
                                    (zero_grad_bytes(self.zero_opt) if job.use_ds else 0))
            mem["secvec_grad_bytes"] = max(mem["secvec_grad_bytes"], secvec_grad_bytes(job.sv_layers, job.folded))
        quiet = (contextlib.redirect_stdout(io.StringIO()) if job.use_ds and name == "optimizer"
                 else contextlib.nullcontext())  # DeepSpeed's timers print at its steps
        _sync(dev)
        t = time.perf_counter()
        with quiet:
            yield
        _sync(dev)
        rec[name] += time.perf_counter() - t
        if name == "optimizer" and job.use_ds:
            c = comm_seconds(job.engine)
            rec["comm"] = None if c is None or rec["comm"] is None else rec["comm"] + c

    def step(self, measured: bool = True) -> dict:
        self.rec = rec = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0,
                          "comm": 0.0 if self.job.use_ds else None}
        self.steps_done += 1
        res = train_step(self.job, self.micro, self.steps_done, self.phase)
        rec["step"] = sum(rec[p] for p in PHASES)
        rec["skipped"] = res.skipped
        rec["tokens_padded"] = sum(int(b["input_ids"].numel()) for b in res.batches)
        rec["tokens_nonpad"] = res.n_inputs
        rec["tokens_loss"] = sum(res.counts)
        rec["seq_len"] = statistics.mean(int(b["input_ids"].shape[1]) for b in res.batches)
        if measured:
            self.records.append(rec)
        return rec

    def finish(self) -> dict:
        """The measured records and the memory figures measured from the tensors (this rank's)."""
        job, model, mem = self.job, self.job.model, self.mem
        params = list(model.parameters())
        mem["param_bytes"] = param_bytes(model)
        mem["param_bytes_whole"] = sum(whole_bytes(p) for p in params)
        mem["param_bytes_resident"] = sum(resident_bytes(p) for p in params)
        mem["optimizer_state_bytes"] = optimizer_state_bytes(job.optimizer)
        mem["optimizer_master_bytes"] = master_param_bytes(job.optimizer, model, self.zero_opt)
        mem["secvec_optimizer_bytes"] = secvec_optimizer_bytes(job.optimizer, job.sv_layers, job.folded)
        if job.use_ds:  # a vector tensor in a ZeRO optimizer's partitioned groups: its fp32 master + 2 moments
            ids = {id(t) for t in vector_tensors(job.sv_layers, job.folded)}
            owned = [p for p in params if id(p) in ids and id(p) in job.engine.optimizer_param_ids()]
            if owned:
                log.error("%d security vector tensors are in the DeepSpeed optimizer", len(owned))
            mem["secvec_optimizer_bytes"] += sum(3 * 4 * held_numel(p) for p in owned)
        mem["secvec_param_bytes"] = sum(held_bytes(t) for t in job.sv_params)
        mem["peak"] = self.peak or peak_memory(job.device)
        return {"records": self.records, "memory": mem}


def run_steps(job: Stage2, steps: int, warmup: int, trace_path: Optional[Path] = None) -> dict:
    """warmup + steps optimizer steps back to back, each phase timed; returns per-step records and
    the memory figures measured from the tensors (this rank's)."""
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    runner = StepRunner(job)
    prof = None
    for step in range(warmup + steps):
        if step == warmup and trace_path is not None:
            prof = torch.profiler.profile(record_shapes=False)
            prof.__enter__()
        runner.step(measured=step >= warmup)
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(str(trace_path))
    return runner.finish()


def spread(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) >= 2 else [v[0]] * 3  # within [min, max]
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1],
            "mean": statistics.fmean(v), "n": len(v)}


def gather(value: Any) -> list:
    """One value per rank, in rank order, on every rank (all_gather_object); [value] in one process.
    Collective under several ranks: every rank calls it at the same point."""
    import torch.distributed as dist

    ws = runtime.world_size()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    if ws == 1:
        return [value]
    raise UserError(f"dist-secvec profile: WORLD_SIZE={ws} but no process group was joined; start every rank "
                    "through a launcher (launch/deepspeed.sh, launch/torchrun.sh)")


def summarize(job: Stage2, result: dict) -> dict:
    """This rank's figures, with the per-step times kept for the aggregation over ranks."""
    recs = result["records"]
    total_time = sum(r["step"] for r in recs)
    tps = {k: sum(r[f"tokens_{k}"] for r in recs) / total_time for k in ("padded", "nonpad", "loss")}
    seq_len = statistics.mean(r["seq_len"] for r in recs)
    fpt, formula, parts = flops_per_token(job.model, seq_len, job.sv_layers, job.folded)
    return {"step_times": [r["step"] for r in recs], "phase_times": {p: [r[p] for r in recs] for p in PHASES},
            "comm_times": [r["comm"] for r in recs],
            "tokens_per_s_rank": tps, "flops_per_token": fpt, "flops_formula": formula, "flops_parts": parts,
            "achieved_flops_per_s_rank": fpt * tps["padded"], "memory": result["memory"],
            "tokens_per_step": {k: statistics.mean(r[f"tokens_{k}"] for r in recs)
                                for k in ("padded", "nonpad", "loss")}}


def aggregate(ranks: list[dict]) -> dict:
    """The job's figures from every rank's summary: a step of the job lasts as long as its slowest
    rank (per step, max over ranks, then median/spread over steps); tokens per step summed."""
    r0 = ranks[0]
    per_step = lambda key: [max(v) for v in zip(*(r[key] for r in ranks))]  # noqa: E731
    step = spread(per_step("step_times"))
    phases = {p: spread([max(v) for v in zip(*(r["phase_times"][p] for r in ranks))]) for p in PHASES}
    comm = None
    if all(c is not None for r in ranks for c in r["comm_times"]):
        comm = spread([max(v) for v in zip(*(r["comm_times"] for r in ranks))])
    return {"step_time_s": step["median"], "step_time": step, "step_times": per_step("step_times"),
            "phases": phases, "comm": comm,
            "step_time_s_per_rank": [statistics.median(r["step_times"]) for r in ranks],
            "flops_per_token": r0["flops_per_token"], "flops_formula": r0["flops_formula"],
            "flops_parts": r0["flops_parts"],
            "tokens_per_step": {k: sum(r["tokens_per_step"][k] for r in ranks) for k in ("padded", "nonpad", "loss")}}


def measure_jobs(cfg: Config, names: list[str], steps: int, warmup: int, tok, train,
                 trace_path: Optional[Path] = None, interleave: bool = True, per_round: int = 2) -> dict:
    """Time `steps` optimizer steps of each job in `names` (configured first, then variants.VARIANTS).
    Each job is built and runs its `warmup` steps alone (its peak memory is read then: the
    configured job is built first, so its peak is its own); then, interleaved, rounds in which
    every job runs `per_round` steps in turn, the order rotated by one each round, so drifting
    machine load hits all of them alike. With interleave False each job runs all its steps and is
    dropped before the next is built. Collective under several ranks: every rank runs the same
    rounds. Returns, per name, every rank's summary (gathered) and how the job holds the vector."""
    device = pick_device()
    out: dict[str, dict] = {}
    # data.audit: the configured job audits data.train's rows as finetune does (the scores cached);
    # every variant then trains on the rows it left, with their weights, so all see the same batches
    audited = cfg.data.audit != "off" and bool(cfg.security_vector.path)
    rows: dict = {"train": train, "row_weight": None}

    def build(name: str) -> StepRunner:
        base = mark_memory(device)
        own = audited and name == "configured"
        job = variants.build_variant(cfg, name, tok, None if own else rows["train"], rows["row_weight"])
        if own:
            rows.update(train=job.train, row_weight=job.row_weight)
        runner = StepRunner(job)
        for _ in range(warmup):
            runner.step(measured=False)
        if interleave:  # later jobs join this process: its peak is taken now, before they are built
            runner.peak = peak_since(device, base)
        out[name] = {"mode": job.mode, "backend": job.cfg.security_vector.backend if job.sv_layers else None,
                     "n_layers": len(job.sv_layers or job.folded), "path_choice": job.path_choice,
                     "gate": job.gate_info, "device": job.device, "zero_stage": job.stage,
                     "partition": job.partition, "audit": job.audit_info}
        return runner

    def done(name: str, runner: StepRunner) -> None:
        out[name]["ranks"] = gather(summarize(runner.job, runner.finish()))
        out[name]["paths"] = path_calls(runner.job.sv_layers)  # which code computed the vector (rank 0's)

    def traced(runner: StepRunner, n: int) -> None:
        prof = torch.profiler.profile(record_shapes=False)
        with prof:
            for _ in range(n):
                runner.step()
        prof.export_chrome_trace(str(trace_path))

    if not interleave:
        for name in names:
            runner = build(name)
            if name == "configured" and trace_path is not None:
                traced(runner, steps)
            else:
                for _ in range(steps):
                    runner.step()
            done(name, runner)
            del runner
        return out
    runners: dict[str, StepRunner] = {}
    with _out_of_memory_hint(names, runners):
        for name in names:
            runners[name] = build(name)
        n_rounds = math.ceil(steps / per_round)
        for r in range(n_rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                runner = runners[name]
                n = min(per_round, steps - len(runner.records))
                if name == "configured" and trace_path is not None and r == 0:
                    traced(runner, n)  # the trace: the configured job's steps of the first round
                    continue
                for _ in range(n):
                    runner.step()
    for name in names:
        done(name, runners[name])
    return out


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e)))


@contextlib.contextmanager
def _out_of_memory_hint(names: list[str], built: dict):
    """Interleaving holds every variant's job (model, optimizer, activations) at once: a job that
    only just fits alone runs out of memory here. Say so in one line with the way out."""
    try:
        yield
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        raise UserError(f"profile: out of memory with {len(built)} of the variants {', '.join(names)} built at once "
                        "(they are interleaved step by step, so all of them are held together): set "
                        "profile.interleave=false to run them one after the other, or fewer with "
                        "profile.variants=[no_vector]") from e
