"""`dist-secvec profile`: time, throughput, FLOPs, MFU and memory of the stage-2 job.

Runs real optimizer steps of the configured stage-2 (finetune) job, built with the same setup
functions as `dist_secvec.finetune` (tokenizer, data, model, trainable part, frozen vector,
optimizer), and times each step split into data (collate + to_device), forward, backward and
optimizer (clip + step + schedule + zero_grad), with torch.cuda.synchronize around each phase on
CUDA.

The vector's overhead: next to the configured job it builds the same job with the vector off
(no_vector), attached on the torch path (torch) and on the Triton path (triton, CUDA only). Each
job is built and runs its warmup steps alone; then the jobs' measured steps are interleaved in
rounds (each job DIST_SECVEC_PROFILE_ROUND_STEPS steps in turn, default 2, the order rotated every
round), so drift in machine load hits all of them alike, and every job draws the same batches in
the same order. `overhead` in profile.json gives per variant the median step time and quartiles,
the ratio to no_vector (median of per-step ratios on the same batches), the vector's FLOP share
(its delta FLOPs in the job with it attached) and `within_target` (ratio - 1 <= 1.5 x FLOP share).
DIST_SECVEC_PROFILE_INTERLEAVE=0 runs the jobs one after the other, one alive at a time (when
several copies of the model do not fit).

Peak memory per variant (`variant_memory`, DIST_SECVEC_PROFILE_MEMORY): on CPU each variant in a
fresh process of its own (`python -m dist_secvec.profile --memory-child`, one per rank; under a
launcher the children of all ranks form a new process group), which builds the job and runs
warmup + DIST_SECVEC_PROFILE_MEMORY_STEPS (default 2) steps and reports its peak RSS: a process's
peak RSS cannot be reset and would hold every variant's job. A fresh process's peak RSS varies by
a few percent from run to run: DIST_SECVEC_PROFILE_MEMORY_REPEATS=N runs each variant N times
(interleaved) and keeps the median. On CUDA, in this process: the peak
allocated while the variant is built and warmed up, stats reset before, bytes of jobs already
alive subtracted. Each is compared with no_vector's (target: within 2%). `off` skips it.

Outputs in output_dir: profile.json, profile.md and profile_*.png. DIST_SECVEC_PROFILE_VARIANTS
(a comma list of no_vector,torch,triton; empty for none) limits the overhead variants run.

Model FLOPs are counted by hand (not by torch's FLOP counters, which count a full backward for
frozen weights); `flops_formula` in profile.json spells the count out.

Any launcher, any number of ranks: when the job runs under DeepSpeed (`deepspeed.zero_stage` or
`deepspeed.config` set, or WORLD_SIZE > 1) the job is built as `finetune` builds it
(init_distributed, ds_config, HfDeepSpeedConfig while a 16-bit base loads under ZeRO-3, no folding
under ZeRO-3, DeepSpeedEngine) and every rank times its own steps of finetune's loop (rank_batches,
token counts all-reduced, engine forward/backward/step). Rank 0 gathers every rank's figures
(all_gather_object) and writes the report: total and per-rank tokens/s, step times (a step of the
job takes as long as its slowest rank), peak memory per rank, and the parameter bytes each rank
holds (held_numel x element size: its ZeRO-3 partition, or the whole tensor) next to the whole
model's bytes (the 1-rank figure). Communication time comes from DeepSpeed's wall-clock timers
(`wall_clock_breakdown` is switched on for the profile): the gradient reduce of each backward
(`bwd_allreduce_microstep`); ZeRO-3's parameter all-gathers run inside forward/backward and are
not split out. One plain process reports comm_time_s null.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dist_secvec import runtime
from dist_secvec.config import Config, resolve_stage_defaults, validate
from dist_secvec.data import collate, load_samples, tokenize_samples
from dist_secvec.distributed import (DeepSpeedEngine, PlainEngine, barrier, ds_config, held_numel,
                                     init_distributed, is_partitioned, label_tokens, loss_weight, micro_loss, numel,
                                     partition_report, rank_batches, uses_deepspeed, zero_stage)
from dist_secvec.errors import ConfigError, UserError
from dist_secvec.finetune import fold_choice
from dist_secvec.model import add_trainable_adapter, load_model, load_tokenizer, unwrap_base
from dist_secvec.secvec import (attach_security_vector, check_fingerprint, fold_security_vector,
                                load_security_vector, path_calls)
from dist_secvec.training import build_optimizer, pick_device, to_device

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer")
# dense peak TFLOP/s by GPU name fragment: (bf16/fp16 tensor core, fp32 without TF32)
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}
VARIANTS = ("no_vector", "torch", "triton")


# ---------------------------------------------------------------------------------------------
# the job: finetune's setup, reused piece by piece


@dataclass
class Job:
    model: Any
    optimizer: Any
    scheduler: Any
    params: list
    sv_layers: list
    folded: list
    device: torch.device
    pad_id: int
    examples: list
    cfg: Config
    vector_mode: str  # off | attached | folded
    backend: Optional[str] = None
    engine: Any = None  # PlainEngine or DeepSpeedEngine (finetune's engine interface)
    ds: Optional[dict] = None  # the DeepSpeed config when the job runs under DeepSpeed
    hf_ds: Any = None  # HfDeepSpeedConfig kept alive with a ZeRO-3 16-bit model

    @property
    def zero_stage(self) -> Optional[int]:
        return None if self.ds is None else zero_stage(self.ds)


def profile_ds_config(cfg: Config) -> dict:
    """The run's DeepSpeed config with DeepSpeed's wall-clock timers on (communication time)."""
    ds = ds_config(cfg, runtime.world_size())
    if os.environ.get("DIST_SECVEC_PROFILE_DS_TIMERS", "1") != "0":
        ds["wall_clock_breakdown"] = True
    return ds


def build_job(cfg: Config, n_steps: int, vector: str = "configured", tok=None, examples=None) -> Job:
    """finetune's setup. vector: configured (as stage 2 would run: fold or attach) | off |
    torch | triton (attached on that path, never folded). Under DeepSpeed (uses_deepspeed) the
    model is loaded, partitioned and wrapped as finetune does it; every rank must call this."""
    cfg = resolve_stage_defaults(cfg, "finetune")
    use_ds = uses_deepspeed(cfg)
    ds = hf_ds = None
    if use_ds:
        init_distributed(cfg)
        ds = profile_ds_config(cfg)
        if zero_stage(ds) == 3 and cfg.model.quantization == "int8":
            raise ConfigError("config keys 'model.quantization=int8' and ZeRO stage 3: 8-bit bases train wrong "
                              "under ZeRO-3; use model.quantization=nf4 or ZeRO stage 2")
    stage = zero_stage(ds) if ds else None
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    if tok is None:
        tok = load_tokenizer(cfg.model)
    if examples is None:
        examples = tokenize_samples(tok, load_samples(cfg.data.train, cfg.data.format, cfg.data.split,
                                                      cfg.data.max_samples), cfg.data).examples
    if stage == 3 and cfg.model.quantization == "none":
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)  # from_pretrained partitions while loading (as in finetune)
    model = load_model(cfg.model, device, for_training=True)
    model = add_trainable_adapter(model, cfg.adapter)
    sv_layers, folded, mode, backend = [], [], "off", None
    if cfg.security_vector.path and vector != "off":
        sv = load_security_vector(cfg.security_vector.path)
        check_fingerprint(sv, model, cfg.model.path)
        fold = fold_choice(cfg, sv)[0] if vector == "configured" and stage != 3 else False
        if fold:
            folded, mode = fold_security_vector(model, sv), "folded"
        else:
            backend = cfg.security_vector.backend if vector == "configured" else vector
            sv_layers, mode = attach_security_vector(model, sv, backend=backend), "attached"
    sv_ids = {id(p) for layer in sv_layers for p in (layer.secvec_A, layer.secvec_B)}
    params = [p for p in model.parameters() if p.requires_grad]
    if any(id(p) in sv_ids for p in params):
        raise RuntimeError("security vector parameters are trainable")
    optimizer, scheduler = build_optimizer(params, cfg.optim, n_steps)
    if use_ds:
        with contextlib.redirect_stdout(io.StringIO()):  # ZeRO prints its init timers when they are on
            engine = DeepSpeedEngine(model, params, optimizer, scheduler, ds)
        if sv_ids & engine.optimizer_param_ids():
            raise RuntimeError("security vector parameters are in the DeepSpeed optimizer")
        model = engine.module
    else:
        engine = PlainEngine(model, params, optimizer, scheduler, cfg.optim.max_grad_norm)
    return Job(model, optimizer, scheduler, params, sv_layers, folded, device, tok.pad_token_id, examples, cfg,
               mode, backend, engine, ds, hf_ds)


# ---------------------------------------------------------------------------------------------
# measurement helpers (each works on tensors, so tests can check them against hand sums)


def tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def held_bytes(p: torch.Tensor) -> int:
    """Bytes of p this rank holds: held_numel (its ZeRO-3 partition, or the whole tensor) x the
    element size."""
    t = p.ds_tensor if is_partitioned(p) else p
    return held_numel(p) * t.element_size()


def whole_bytes(p: torch.Tensor) -> int:
    """Bytes of the whole parameter (what one rank without ZeRO-3 holds)."""
    t = p.ds_tensor if is_partitioned(p) else p
    return numel(p) * t.element_size()


def resident_bytes(p: torch.Tensor) -> int:
    """Bytes of p resident on this rank right now: its partition plus whatever is gathered in
    p.data (ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole on every rank)."""
    return tensor_bytes(p.data) + (tensor_bytes(p.ds_tensor) if is_partitioned(p) else 0)


def param_bytes(model) -> int:
    """Parameter bytes this rank holds (ZeRO-3: its partitions)."""
    return sum(held_bytes(p) for p in model.parameters())


def zero_grad_bytes(zero_optimizer) -> int:
    """Gradient bytes a ZeRO optimizer keeps outside p.grad: ZeRO-3's flat buffer of this rank's
    gradient partitions, or ZeRO-1/2's averaged gradient partitions; 0 for a plain optimizer."""
    buf = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(buf, torch.Tensor):
        return tensor_bytes(buf)
    total = 0
    avg = getattr(zero_optimizer, "averaged_gradients", None)
    if isinstance(avg, dict):
        for v in avg.values():
            total += sum(tensor_bytes(t) for t in (v or []) if isinstance(t, torch.Tensor))
    for t in getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or []:
        total += tensor_bytes(t.grad)
    return total


def grad_bytes(model) -> int:
    return sum(tensor_bytes(p.grad) for p in model.parameters())


def optimizer_state_bytes(optimizer, only: Optional[set] = None) -> int:
    """Bytes of every tensor in optimizer.state (for the params whose id is in `only`, if given)."""
    total = 0
    for p, state in optimizer.state.items():
        if only is not None and id(p) not in only:
            continue
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def vector_tensors(sv_layers: list, folded: list) -> list[torch.Tensor]:
    """The tensors that hold the vector: A and B of each SecVecLinear, and each base weight a
    folded vector lives in."""
    out = [t for layer in sv_layers for t in (layer.secvec_A, layer.secvec_B)]
    out += [f.linear.weight for f in folded]
    return out


def master_param_bytes(optimizer, model, zero_optimizer=None) -> int:
    """Bytes of the tensors the torch optimizer steps that are not the model's parameters: the
    fp32 master partitions a ZeRO optimizer keeps (ZeRO-3 takes them out of the param groups
    between steps, so its own lists count too); 0 in a plain run."""
    ids = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}
    cands = [p for g in optimizer.param_groups for p in g["params"]] + list(optimizer.state.keys())
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        cands += [t for t in getattr(zero_optimizer, attr, None) or [] if isinstance(t, torch.Tensor)]
    for t in cands:
        if isinstance(t, torch.Tensor) and id(t) not in ids:
            seen[id(t)] = t
    return sum(tensor_bytes(t) for t in seen.values())


def secvec_grad_bytes(sv_layers: list, folded: list) -> int:
    return sum(tensor_bytes(t.grad) for t in vector_tensors(sv_layers, folded))


def secvec_optimizer_bytes(optimizer, sv_layers: list, folded: list) -> int:
    ids = {id(t) for t in vector_tensors(sv_layers, folded)}
    in_groups = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) in ids)
    if in_groups:  # a vector tensor handed to the optimizer is a bug even before it has state
        log.error("%d security vector tensors are in the optimizer's param groups", in_groups)
    return optimizer_state_bytes(optimizer, ids)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda", "max_allocated": torch.cuda.max_memory_allocated(device),
                "max_reserved": torch.cuda.max_memory_reserved(device)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_rss", "max_rss": rss * (1 if sys.platform == "darwin" else 1024)}


# ---------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(model, seq_len: float, sv_layers: list, folded: list) -> tuple[float, str, dict]:
    """Model FLOPs per token of one training step (forward + backward), counted by hand."""
    base = unwrap_base(model)
    frozen = trainable = 0
    for m in base.modules():
        if isinstance(m, nn.Linear):  # base linears, lm_head, peft's lora_A/lora_B (bnb layers too)
            n = m.in_features * m.out_features
            if m.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    c = base.config
    n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    attn = 12 * n_layers * seq_len * n_heads * head_dim
    delta = 0
    for layer in sv_layers:
        if layer.active:
            r, k = getattr(layer.secvec_A, "ds_shape", layer.secvec_A.shape)  # ZeRO-3: the whole shape
            delta += 4 * r * (k + getattr(layer.secvec_B, "ds_shape", layer.secvec_B.shape)[0])
    total = 4 * frozen + 6 * trainable + attn + delta
    formula = (
        "flops_per_token = 4*P_frozen + 6*P_trainable + 12*n_layers*seq_len*n_heads*head_dim "
        "+ sum_adapted(4*r*(K+N)); "
        f"= 4*{frozen} + 6*{trainable} + 12*{n_layers}*{seq_len:.2f}*{n_heads}*{head_dim} + {delta} "
        f"= {total:.6g}. P = in*out of every nn.Linear (embedding lookups 0, biases/norms/softmax ignored); "
        "frozen weights: 2 fwd + 2 input-grad, trainable: + 2 weight-grad; attention: QK^T and AV, "
        "2 FLOPs per MAC each, fwd 4*seq_len*n_heads*head_dim per layer, x3 for fwd+bwd, seq_len = mean padded "
        "batch width, no causal halving; vector delta s*(x A^T) B^T: fwd 2r(K+N) + input-grad 2r(K+N), no "
        "weight grad, 0 when folded into the base weight. Excludes gradient-checkpointing recompute.")
    return float(total), formula, {"frozen_linear_params": frozen, "trainable_linear_params": trainable,
                                   "attention": attn, "secvec_delta": delta, "n_layers": n_layers,
                                   "n_heads": n_heads, "head_dim": head_dim, "seq_len": seq_len}


def peak_flops(cfg: Config, device: torch.device) -> tuple[Optional[float], str]:
    if cfg.profile.peak_tflops:
        return cfg.profile.peak_tflops * 1e12, "profile.peak_tflops"
    if device.type != "cuda":
        return None, "no accelerator peak on CPU (set profile.peak_tflops to get an MFU)"
    name = torch.cuda.get_device_name(device)
    for frag, (half, fp32) in GPU_PEAK_TFLOPS.items():
        if frag in name:
            low = cfg.model.dtype != "float32" or cfg.model.quantization != "none"
            return (half if low else fp32) * 1e12, f"table: {name} {'bf16' if low else 'fp32'} dense"
    return None, f"unknown GPU '{name}': set profile.peak_tflops"


# ---------------------------------------------------------------------------------------------
# the measured loop


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


COMM_TIMER = "bwd_allreduce_microstep"  # deepspeed.utils.timer.BACKWARD_REDUCE_MICRO_TIMER


def _comm_seconds(engine) -> Optional[float]:
    """The gradient reduce time of the micro-step DeepSpeed just finished (its wall-clock timer,
    refreshed at every engine.step); None without DeepSpeed or with its timers off."""
    if not getattr(engine, "deepspeed", False):
        return None
    cache = getattr(engine.engine, "engine_timers_cache", None) or {}
    ms = cache.get(COMM_TIMER)
    return None if ms is None else ms / 1000.0


class StepRunner:
    """Optimizer steps of finetune's loop on one job, one at a time, each phase timed: run_steps
    runs them back to back, the overhead rounds interleave the steps of several jobs. Every job
    draws its micro-batches with finetune's rank_batches from the same seed, so step i of each
    variant sees the same batches."""

    def __init__(self, job: Job):
        cfg, model = job.cfg, job.model
        if job.engine is None:  # a Job built by hand: the plain engine over its optimizer
            job.engine = PlainEngine(model, job.params, job.optimizer, job.scheduler, cfg.optim.max_grad_norm)
        self.job = job
        self.use_ds = job.ds is not None
        self.world = runtime.world_size() if self.use_ds else 1
        rank = runtime.rank() if self.use_ds else 0
        gen = torch.Generator().manual_seed(cfg.seed)
        self.micro = rank_batches(job.examples, cfg.optim.micro_batch_size, rank, self.world, gen,
                                  cfg.data.shuffle)  # finetune's order
        self.records: list[dict] = []
        self.mem: dict = {"grad_bytes": 0, "secvec_grad_bytes": 0}
        self.zero_opt = job.engine.engine.optimizer if self.use_ds else None
        self.quiet = (lambda: contextlib.redirect_stdout(io.StringIO())) if self.use_ds else contextlib.nullcontext
        self.steps_done = 0
        self.peak: Optional[dict] = None  # set by the caller to report a peak taken earlier (see peak_memory)
        model.train()

    def step(self, measured: bool = True) -> dict:
        job, dev, eng, use_ds, quiet = self.job, self.job.device, self.job.engine, self.use_ds, self.quiet
        ga = job.cfg.optim.gradient_accumulation_steps
        pc = time.perf_counter
        _sync(dev)
        t = pc()
        group = [to_device(collate(next(self.micro), job.pad_id), dev) for _ in range(ga)]
        counts, n_tokens = label_tokens(group)  # the global batch's label tokens (all ranks)
        _sync(dev)
        rec = {"data": pc() - t, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        comm: Optional[float] = 0.0 if use_ds else None
        for i, (b, n) in enumerate(zip(group, counts)):
            t = pc()
            loss = micro_loss(eng, b, n)
            _sync(dev)
            rec["forward"] += pc() - t
            t = pc()
            eng.backward(loss * loss_weight(n, self.world, n_tokens))
            _sync(dev)
            rec["backward"] += pc() - t
            if i < ga - 1:
                t = pc()
                with quiet():
                    eng.step(boundary=False)  # DeepSpeed counts micro-steps; a no-op for the plain engine
                _sync(dev)
                rec["optimizer"] += pc() - t
                c = _comm_seconds(eng)
                comm = None if c is None or comm is None else comm + c
        self.steps_done += 1
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at profile step {self.steps_done}")
        mem = self.mem
        mem["grad_bytes"] = max(mem["grad_bytes"], grad_bytes(job.model) +
                                (zero_grad_bytes(self.zero_opt) if use_ds else 0))
        mem["secvec_grad_bytes"] = max(mem["secvec_grad_bytes"], secvec_grad_bytes(job.sv_layers, job.folded))
        t = pc()
        with quiet():
            eng.step(boundary=True)  # clip + optimizer step + schedule + zero_grad (ZeRO: its step)
        _sync(dev)
        rec["optimizer"] += pc() - t
        if use_ds:
            c = _comm_seconds(eng)
            comm = None if c is None or comm is None else comm + c
        rec["comm"] = comm
        rec["step"] = sum(rec[p] for p in PHASES)
        rec["tokens_padded"] = sum(int(b["input_ids"].numel()) for b in group)
        rec["tokens_nonpad"] = sum(int(b["attention_mask"].sum()) for b in group)
        rec["tokens_loss"] = sum(counts)
        rec["seq_len"] = statistics.mean(int(b["input_ids"].shape[1]) for b in group)
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
        if self.use_ds:  # a vector tensor in a ZeRO optimizer's partitioned groups: its fp32 master + 2 moments
            ids = {id(t) for t in vector_tensors(job.sv_layers, job.folded)}
            owned = [p for p in params if id(p) in ids and id(p) in job.engine.optimizer_param_ids()]
            if owned:
                log.error("%d security vector tensors are in the DeepSpeed optimizer", len(owned))
            mem["secvec_optimizer_bytes"] += sum(3 * 4 * held_numel(p) for p in owned)
        mem["secvec_param_bytes"] = sum(held_bytes(t) for layer in job.sv_layers
                                        for t in (layer.secvec_A, layer.secvec_B))
        mem["peak"] = self.peak or peak_memory(job.device)
        return {"records": self.records, "memory": mem}


def run_steps(job: Job, steps: int, warmup: int, trace_path: Optional[Path] = None) -> dict:
    """warmup + steps optimizer steps of finetune's loop back to back, each phase timed; returns
    per-step records and the memory figures measured from the tensors (this rank's)."""
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


def summarize(job: Job, result: dict) -> dict:
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


# ---------------------------------------------------------------------------------------------
# the command


def default_job_config(cfg: Config) -> Config:
    """The embedded demo's stage-2 job (vector active): demo world, cached aligned base, a stage-1
    vector (cached next to the base; a short stage 1 is trained when none is there)."""
    from dist_secvec.demo.run import _cache_root, _stage_config, aligned_base, demo_world
    from dist_secvec.train_sv import run_train_sv

    quick = cfg.demo.quick
    out = Path(cfg.output_dir)
    sizes, world, data = demo_world(cfg)  # written by rank 0
    barrier()
    base_dir = aligned_base(cfg, sizes, data, world.texts(), quick)  # every rank (data parallel) or the cache
    vec_dir = _cache_root(cfg) / f"secvec-{base_dir.name}"
    # rank 0 decides and trains the ~100-sample stage 1 alone; the others wait at the barrier
    if gather(not (vec_dir / "secvec.json").exists())[0] and runtime.is_main():
        log.info("no cached stage-1 vector for %s: training a short one", base_dir.name)
        sv_cfg = _stage_config(cfg, "train_sv", quick, model={"path": str(base_dir)}, output_dir=str(out / "stage1"),
                               optim={"epochs": 5},
                               security_vector={"harmful_data": [data["harmful_sv"]],
                                                "benign_data": [data["kl_benign"]]})
        sv = run_train_sv(sv_cfg)
        import shutil

        with runtime.atomic_dir(vec_dir) as tmp:
            for f in sv.vector_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
    barrier()
    log.info("profiling the demo's stage-2 job: base %s, vector %s", base_dir, vec_dir)
    return _stage_config(cfg, "finetune", quick, model={"path": str(base_dir)}, output_dir=str(out),
                         data={"train": [data["finetune_mixed"]]}, security_vector={"path": str(vec_dir)})


def profile_variants() -> tuple[str, ...]:
    """The overhead variants to run: all of VARIANTS, or the comma list in
    DIST_SECVEC_PROFILE_VARIANTS (empty: none; benchmarks and tests use it to save time)."""
    env = os.environ.get("DIST_SECVEC_PROFILE_VARIANTS")
    if env is None:
        return VARIANTS
    names = tuple(v.strip() for v in env.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise UserError(f"DIST_SECVEC_PROFILE_VARIANTS: unknown variant(s) {', '.join(bad)}; "
                        f"choose from {', '.join(VARIANTS)}")
    return names


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UserError(f"{name}={raw!r}: need an integer >= {minimum}")
    return value


def memory_mode(device: torch.device) -> str:
    """How each variant's peak memory is measured (DIST_SECVEC_PROFILE_MEMORY): process (a fresh
    process per variant: its peak RSS, or its CUDA peak; the default on CPU, where a process's
    peak RSS cannot be reset and would include every job the process holds), inline (CUDA: the
    peak allocated while the variant is built and warmed up, with the peak stats reset and the
    bytes already allocated by other jobs subtracted; the default on CUDA), off."""
    mode = os.environ.get("DIST_SECVEC_PROFILE_MEMORY", "auto").strip() or "auto"
    if mode not in ("auto", "process", "inline", "off"):
        raise UserError(f"DIST_SECVEC_PROFILE_MEMORY={mode!r}: choose auto, process, inline or off")
    if mode == "auto":
        return "inline" if device.type == "cuda" else "process"
    return mode


def _vector_arg(name: str) -> str:
    return {"configured": "configured", "no_vector": "off"}.get(name, name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _variant_backend(name: str):
    """A variant names its path itself: DIST_SECVEC_BACKEND applies to the configured job only."""
    saved = os.environ.pop("DIST_SECVEC_BACKEND", None) if name != "configured" else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ["DIST_SECVEC_BACKEND"] = saved


def _mark_memory(device: torch.device) -> int:
    """Reset the CUDA peak stats; the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, base: int) -> dict:
    """peak_memory, plus on CUDA the peak allocated above `base` (what this job added)."""
    peak = peak_memory(device)
    if peak["kind"] == "cuda":
        peak["baseline_allocated"] = base
        peak["job_max_allocated"] = peak["max_allocated"] - base
    return peak


def _partition(job: Job) -> dict:
    sv_ids = {id(t) for t in vector_tensors(job.sv_layers, [])}
    return partition_report({
        "security_vector": [p for p in job.model.parameters() if id(p) in sv_ids], "trainable": job.params,
        "frozen": [p for p in job.model.parameters() if not p.requires_grad and id(p) not in sv_ids]})[0]


def measure_jobs(cfg: Config, names: list[str], steps: int, warmup: int, tok, examples,
                 trace_path: Optional[Path] = None, interleave: bool = True, per_round: int = 2) -> dict:
    """Time `steps` optimizer steps of each job in `names` (configured first; no_vector, torch,
    triton: the vector off / attached on that path). Each job is built and runs its `warmup`
    steps alone (its peak memory is read then: the configured job is built first, so its peak is
    its own); then, interleaved, rounds in which every job runs `per_round` steps in turn, the
    order rotated by one each round, so drifting machine load hits all of them alike. With
    interleave False each job runs all its steps and is dropped before the next is built.
    Collective under several ranks: every rank runs the same rounds. Returns, per name, every
    rank's summary (gathered) and the job's mode/backend/device/stage."""
    device = pick_device()
    out: dict[str, dict] = {}

    def build(name: str) -> StepRunner:
        base = _mark_memory(device)
        with _variant_backend(name):  # the kernels read DIST_SECVEC_BACKEND at every call: steps too
            job = build_job(cfg, steps + warmup, _vector_arg(name), tok, examples)
            runner = StepRunner(job)
            for _ in range(warmup):
                runner.step(measured=False)
        if interleave:  # later jobs join this process: its peak is taken now, before they are built
            runner.peak = _peak_since(device, base)
        out[name] = {"mode": job.vector_mode, "backend": job.backend, "device": job.device,
                     "zero_stage": job.zero_stage}
        return runner

    def done(name: str, runner: StepRunner) -> None:
        mine = summarize(runner.job, runner.finish())
        if name == "configured":
            mine["partition"] = _partition(runner.job)
        out[name]["ranks"] = gather(mine)
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
            with _variant_backend(name):
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
                with _variant_backend(name):
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
                        "DIST_SECVEC_PROFILE_INTERLEAVE=0 to run them one after the other, or fewer with "
                        "DIST_SECVEC_PROFILE_VARIANTS=no_vector") from e


def memory_in_processes(cfg: Config, names: list[str], steps: int, warmup: int, out: Path,
                        use_ds: bool, repeats: int = 1) -> dict[str, list]:
    """Each variant's peak memory in fresh processes (one per rank: under a launcher the children
    of all ranks form a process group of their own on a new port): build the job, run warmup +
    steps optimizer steps, report the process's peak RSS (CUDA: peak allocated). With repeats > 1
    every variant runs that many times (variants interleaved) and the run with the median peak is
    kept (a fresh process's peak RSS varies by a few percent from run to run). Returns, per name,
    every rank's {"peak": ..., "memory": ..., "peak_repeats": [...]} or {"error": ...}."""
    import subprocess

    rank = runtime.rank()
    work = out / ".profile_memory"
    work.mkdir(parents=True, exist_ok=True)
    timeout = _env_int("DIST_SECVEC_PROFILE_MEMORY_TIMEOUT", 1800)
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            port = gather(_free_port() if rank == 0 else None)[0]
            spec = work / f"{name}_rank{rank}.json"
            result_file = work / f"{name}_rank{rank}.result.json"
            result_file.unlink(missing_ok=True)
            spec.write_text(json.dumps({"cfg": cfg.to_dict(), "variant": name, "steps": steps, "warmup": warmup,
                                        "result": str(result_file)}))
            env = dict(os.environ)
            if name != "configured":
                env.pop("DIST_SECVEC_BACKEND", None)
            if use_ds:  # the children of every rank: a new group, same ranks, a new port
                env.update(RANK=str(rank), WORLD_SIZE=str(runtime.world_size()), MASTER_PORT=str(port),
                           LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                           MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
            else:
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(k, None)
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-m", "dist_secvec.profile", "--memory-child", str(spec)],
                                   env=env, capture_output=True, text=True, timeout=timeout)
                if p.returncode == 0 and result_file.exists():
                    res = json.loads(result_file.read_text())
                else:
                    res = {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-800:]}"}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {timeout} s (DIST_SECVEC_PROFILE_MEMORY_TIMEOUT)"}
            res["seconds"] = time.perf_counter() - t0
            if "error" in res:
                log.warning("memory of variant %s in a separate process failed: %s", name, res["error"])
            runs[name].append(res)
    results: dict[str, list] = {}
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        if len(ok) < len(runs[name]):
            mine = next(r for r in runs[name] if "error" in r)
        else:
            ok.sort(key=lambda r: _peak_bytes(r["peak"]))
            mine = ok[(len(ok) - 1) // 2]  # the median run (the lower middle one of an even count)
            mine["peak_repeats"] = [_peak_bytes(r["peak"]) for r in runs[name]]
        results[name] = gather(mine)
    return results


def _memory_child(spec_path: str) -> int:
    """`python -m dist_secvec.profile --memory-child SPEC`: one variant's job in this fresh
    process; writes its peak memory and memory figures to SPEC's result file."""
    spec = json.loads(Path(spec_path).read_text())
    from dist_secvec.config import load_config

    cfg = load_config(None, None, base=spec["cfg"])
    logging.basicConfig(level=logging.WARNING)
    job = build_job(cfg, spec["steps"] + spec["warmup"], _vector_arg(spec["variant"]))
    res = run_steps(job, spec["steps"], spec["warmup"])
    mem = res["memory"]
    if runtime.is_main() or job.ds is not None:
        Path(spec["result"]).write_text(json.dumps({"peak": mem["peak"], "memory": mem, "mode": job.vector_mode,
                                                    "pid": os.getpid(),
                                                    "steps": spec["steps"], "warmup": spec["warmup"]}))
    if job.ds is not None:
        barrier()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _peak_bytes(peak: Optional[dict]) -> Optional[int]:
    if not peak:
        return None
    return peak.get("job_max_allocated", peak.get("max_allocated", peak.get("max_rss")))


def variant_memory(mode: str, measured: dict, children: Optional[dict], device: torch.device) -> dict:
    """Each variant's peak memory per rank and its ratio to no_vector's (the target: within 2%)."""
    per: dict[str, Any] = {}
    if mode == "process":
        for name, ranks in (children or {}).items():
            errs = [r["error"] for r in ranks if "error" in r]
            per[name] = ({"peak_memory_bytes": None, "error": errs[0]} if errs else
                         {"peak_memory_bytes": [_peak_bytes(r["peak"]) for r in ranks],
                          "peak_memory_repeats": [r.get("peak_repeats") for r in ranks],
                          "peak_memory_kind": ranks[0]["peak"]["kind"],
                          "seconds": max(r["seconds"] for r in ranks)})
        method = ("a fresh process per variant (and rank): the peak of building the job and running "
                  f"its warmup + measured steps ({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'}; "
                  "the median of DIST_SECVEC_PROFILE_MEMORY_REPEATS runs)")
    elif mode == "inline" and device.type == "cuda":
        for name, rec in measured.items():
            peaks = [r["memory"]["peak"] for r in rec["ranks"]]
            per[name] = {"peak_memory_bytes": [_peak_bytes(p) for p in peaks], "peak_memory_kind": "cuda"}
        method = ("this process, CUDA: peak allocated while the variant is built and runs its warmup steps, the "
                  "peak stats reset before and the bytes other jobs hold subtracted")
    else:
        reason = ("DIST_SECVEC_PROFILE_MEMORY=off" if mode == "off" else
                  "a CPU process's peak RSS cannot be reset and holds every job: set "
                  "DIST_SECVEC_PROFILE_MEMORY=process for a fresh process per variant")
        return {"method": None, "reason": reason, "variants": None}
    base = per.get("no_vector", {}).get("peak_memory_bytes")
    for name, rec in per.items():
        mine = rec.get("peak_memory_bytes")
        if base and mine and all(base) and all(m is not None for m in mine):
            ratio = max(m / b for m, b in zip(mine, base))  # the worst rank
            rec["ratio_to_no_vector"] = ratio
            rec["within_2pct"] = ratio <= 1.02
        else:
            rec["ratio_to_no_vector"] = rec["within_2pct"] = None
    return {"method": method, "target": "peak within 2% of no_vector (worst rank)", "variants": per}


def overhead_report(agg: dict, measured: dict, skipped: dict, memory: dict, per_round: int,
                    n_rounds: int, interleave: bool) -> dict:
    """Per variant: median step time and spread, the step-time ratio to no_vector (median of the
    per-step ratios: step i of both jobs sees the same batches in the same round), the vector's
    FLOP share (attached) and whether ratio - 1 <= 1.5 x that share (the target)."""
    share = None
    for name in ("torch", "triton", "configured"):
        if name in agg and agg[name]["flops_parts"]["secvec_delta"] > 0:
            share = agg[name]["flops_parts"]["secvec_delta"] / agg[name]["flops_per_token"]
            break
    nv = agg.get("no_vector")
    mem = memory.get("variants") or {}
    rep: dict[str, Any] = {}
    for name in list(agg) + [v for v in skipped if v not in agg]:
        if name in skipped:
            rep[name] = {"ratio": None, "flop_share": share, "within_target": None, "skipped": skipped[name]}
            continue
        a = agg[name]
        rec = {"step_time_s": a["step_time_s"], "step_time_p25": a["step_time"]["p25"],
               "step_time_p75": a["step_time"]["p75"], "n_steps": a["step_time"]["n"],
               "mode": measured[name]["mode"], "backend": measured[name]["backend"],
               "vector_paths": measured[name].get("paths"), "flop_share": share,
               "flop_share_computed": a["flops_parts"]["secvec_delta"] / a["flops_per_token"],
               "target_ratio": None if share is None else 1 + 1.5 * share}
        if nv is None:
            rec.update(ratio=None, within_target=None, reason="no_vector not measured")
        else:
            paired = spread([t / b for t, b in zip(a["step_times"], nv["step_times"])])
            rec.update(ratio=paired["median"], ratio_p25=paired["p25"], ratio_p75=paired["p75"],
                       ratio_of_medians=a["step_time_s"] / nv["step_time_s"])
            if name == "no_vector":
                rec["within_target"] = None  # the baseline
            else:
                rec["within_target"] = None if share is None else bool(rec["ratio"] - 1 <= 1.5 * share)
        m = mem.get(name) or {}
        rec["peak_memory_bytes"] = m.get("peak_memory_bytes")
        rec["peak_memory_ratio"] = m.get("ratio_to_no_vector")
        rec["memory_within_target"] = m.get("within_2pct")
        rep[name] = rec
    method = (f"interleaved: {n_rounds} rounds of {per_round} optimizer steps per variant, order rotated each "
              "round" if interleave else "one variant after the other (DIST_SECVEC_PROFILE_INTERLEAVE=0)")
    return {"variants": rep, "method": method,
            "target": "ratio - 1 <= 1.5 x flop_share (flop_share: the vector's delta FLOPs / the job's FLOPs with "
                      "the vector attached; ratio: median over steps of step time / no_vector's step time on the "
                      "same batches)"}


def run_profile(cfg: Config, default_job: bool = False) -> dict:
    if runtime.world_size() > 1 or uses_deepspeed(cfg):
        init_distributed(cfg)  # before the demo's world and cache: they wait for rank 0 at barriers
    if default_job:
        cfg = default_job_config(cfg)
        barrier()
    validate(cfg, "finetune")
    steps, warmup = cfg.profile.steps, cfg.profile.warmup
    if steps < 1 or warmup < 0:
        raise UserError(f"profile: need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model)
    examples = tokenize_samples(tok, load_samples(cfg.data.train, cfg.data.format, cfg.data.split,
                                                  cfg.data.max_samples), cfg.data).examples
    if not examples:
        raise UserError("profile: no training examples left after tokenization")
    rank = runtime.rank()
    device = pick_device()

    # which variants: the vector off, on the torch path, on the Triton path (CUDA only)
    skipped: dict[str, str] = {}
    timed: list[str] = []
    if not cfg.security_vector.path:
        overhead_reason = "no security vector configured (security_vector.path is null)"
    else:
        overhead_reason = None
        for v in profile_variants():
            if v == "triton" and device.type != "cuda":
                skipped[v] = "Triton path needs CUDA; this run is on CPU"
                continue
            if v == "triton":
                try:
                    importlib.import_module("dist_secvec_kernels.secvec_delta")
                except Exception as e:  # no usable triton
                    skipped[v] = f"triton unavailable: {type(e).__name__}: {e}"
                    continue
            timed.append(v)
    names = ["configured"] + timed
    interleave = os.environ.get("DIST_SECVEC_PROFILE_INTERLEAVE", "1").strip() != "0" and len(names) > 1
    per_round = _env_int("DIST_SECVEC_PROFILE_ROUND_STEPS", 2)
    n_rounds = math.ceil(steps / per_round)
    # with variants, each job's peak is read after its warmup steps alone: at least one
    w = max(warmup, 1) if len(names) > 1 else warmup

    # each variant's peak memory in fresh processes (first: this process holds no job yet)
    mmode = memory_mode(device) if len(names) > 1 else "off"
    children = None
    if mmode == "process":
        mem_steps = min(steps, _env_int("DIST_SECVEC_PROFILE_MEMORY_STEPS", 2))
        children = memory_in_processes(cfg, names, mem_steps, w, out,
                                       use_ds=runtime.world_size() > 1 or uses_deepspeed(cfg),
                                       repeats=_env_int("DIST_SECVEC_PROFILE_MEMORY_REPEATS", 1))

    trace = None
    if cfg.profile.trace:
        trace = out / ("trace.json" if rank == 0 else f"trace_rank{rank}.json")
    measured = measure_jobs(cfg, names, steps, w, tok, examples, trace, interleave, per_round)
    agg = {name: aggregate(m["ranks"]) for name, m in measured.items()}
    main, ranks = agg["configured"], measured["configured"]["ranks"]
    cm = measured["configured"]
    main_mode, main_backend, dev, stage = cm["mode"], cm["backend"], cm["device"], cm["zero_stage"]

    # the overhead: the old per-variant table (secvec_overhead) and the interleaved report (overhead)
    variants: dict[str, Any] = {}
    memory = variant_memory(mmode, measured, children, dev) if len(names) > 1 else {
        "method": None, "reason": overhead_reason or "no overhead variants (DIST_SECVEC_PROFILE_VARIANTS)",
        "variants": None}
    overhead = None
    if cfg.security_vector.path:
        for v in profile_variants():
            if v in skipped:
                variants[v] = {"step_time_ratio": None, "reason": skipped[v]}
                continue
            s = agg[v]
            variants[v] = {"step_time_s": s["step_time_s"], "step_time": s["step_time"],
                           "phases": {p: s["phases"][p]["median"] for p in PHASES},
                           "flops_per_token": s["flops_per_token"]}
        base_t = variants["no_vector"]["step_time_s"] if "no_vector" in variants else None
        for v, rec in variants.items():
            if rec.get("step_time_s") is not None:
                rec["step_time_ratio"] = rec["step_time_s"] / base_t if base_t else None
        variants["configured"] = {"step_time_s": main["step_time_s"],
                                  "step_time_ratio": main["step_time_s"] / base_t if base_t else None,
                                  "mode": main_mode, "backend": main_backend}
        fshare = main["flops_parts"]["secvec_delta"] / main["flops_per_token"] if main["flops_per_token"] else None
        variants["configured"]["secvec_flop_share"] = fshare
        if fshare and base_t:  # the target: overhead at most 1.5x the delta's FLOP share
            variants["configured"]["overhead_over_flop_share"] = (main["step_time_s"] / base_t - 1) / fshare
        if len(names) > 1 or skipped:
            overhead = overhead_report(agg, measured, skipped, memory, per_round, n_rounds, interleave)

    # aggregation over ranks
    ws = len(ranks)
    tps_rank = [r["tokens_per_s_rank"] for r in ranks]
    mems = [r["memory"] for r in ranks]
    peaks = [m["peak"] for m in mems]
    mem, peak = mems[0], peaks[0]
    peak_bytes = [p.get("max_allocated", p.get("max_rss")) for p in peaks]
    accounted = mem["param_bytes"] + mem["grad_bytes"] + mem["optimizer_state_bytes"] + mem["optimizer_master_bytes"]
    activation = (peak["max_allocated"] - accounted) if peak["kind"] == "cuda" else None
    peak_f, peak_src = peak_flops(cfg, dev)
    achieved = sum(r["achieved_flops_per_s_rank"] for r in ranks)
    per_rank_params = [m["param_bytes"] for m in mems]
    whole = mem["param_bytes_whole"]
    comm = main["comm"]
    report = {
        "world_size": ws,
        "zero_stage": stage,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "job": {"model": cfg.model.path, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
                "adapter": cfg.adapter.type, "security_vector": cfg.security_vector.path, "vector_mode": main_mode,
                "backend": main_backend, "micro_batch_size": cfg.optim.micro_batch_size,
                "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
                "max_length": cfg.data.max_length, "steps": steps, "warmup": w,
                "deepspeed": stage is not None, "zero_stage": stage},
        "step_time_s": main["step_time_s"],
        "step_time": main["step_time"],
        "step_time_s_per_rank": main["step_time_s_per_rank"],
        "phases": main["phases"],
        "comm_time_s": None if comm is None else comm["median"],
        "comm_time": comm,
        "comm_time_source": (None if comm is None else
                             "DeepSpeed wall_clock_breakdown timer bwd_allreduce_microstep summed over the step's "
                             "micro-steps (gradient reduce after backward; ZeRO-3 parameter all-gathers are inside "
                             "forward/backward and not split out); max over ranks"),
        "tokens_per_step": main["tokens_per_step"],
        "tokens_per_s": sum(r["nonpad"] for r in tps_rank),
        "tokens_per_s_per_rank": [r["nonpad"] for r in tps_rank],
        "loss_tokens_per_s": sum(r["loss"] for r in tps_rank),
        "loss_tokens_per_s_per_rank": [r["loss"] for r in tps_rank],
        "padded_tokens_per_s": sum(r["padded"] for r in tps_rank),
        "padded_tokens_per_s_per_rank": [r["padded"] for r in tps_rank],
        "flops_per_token": main["flops_per_token"],
        "flops_formula": main["flops_formula"],
        "flops_parts": main["flops_parts"],
        "achieved_flops_per_s": achieved,
        "achieved_flops_note": "flops_per_token x padded tokens/s (padding is computed too), summed over ranks",
        "peak_flops_per_s": peak_f,
        "peak_flops_source": peak_src,
        "mfu": achieved / (peak_f * ws) if peak_f else None,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": peak["kind"],
        "peak_reserved_bytes": [p.get("max_reserved") for p in peaks],
        "memory_breakdown": {"param_bytes": mem["param_bytes"], "grad_bytes": mem["grad_bytes"],
                             "optimizer_state_bytes": mem["optimizer_state_bytes"],
                             "optimizer_master_bytes": mem["optimizer_master_bytes"],
                             "activation_bytes_estimate": activation,
                             "secvec_param_bytes": mem["secvec_param_bytes"]},
        "param_bytes_per_rank": per_rank_params,
        "param_bytes_whole": whole,
        "param_memory_ratio": max(per_rank_params) / whole if whole else None,
        "param_memory_note": ("bytes of parameters each rank holds (held_numel x element size: its ZeRO-3 "
                              "partition, else the whole tensor); param_bytes_whole is the whole model, the "
                              "1-rank figure; param_memory_ratio = max per-rank / whole"),
        "param_bytes_resident_per_rank": [m["param_bytes_resident"] for m in mems],
        "grad_bytes_per_rank": [m["grad_bytes"] for m in mems],
        "optimizer_state_bytes_per_rank": [m["optimizer_state_bytes"] for m in mems],
        "optimizer_master_bytes_per_rank": [m["optimizer_master_bytes"] for m in mems],
        "partition": [r.get("partition") for r in ranks] if stage is not None else None,
        "secvec_grad_bytes": sum(m["secvec_grad_bytes"] for m in mems),
        "secvec_optimizer_bytes": sum(m["secvec_optimizer_bytes"] for m in mems),
        "secvec_grad_bytes_per_rank": [m["secvec_grad_bytes"] for m in mems],
        "secvec_optimizer_bytes_per_rank": [m["secvec_optimizer_bytes"] for m in mems],
        "secvec_overhead": variants or None,
        "overhead": None if overhead is None else overhead["variants"],
        "overhead_method": None if overhead is None else overhead["method"],
        "overhead_target": None if overhead is None else overhead["target"],
        "variant_memory": memory["variants"],
        "variant_memory_method": memory["method"] or memory.get("reason"),
        "secvec_overhead_reason": overhead_reason,
        "multi_rank": ("figures of every rank gathered by rank 0 (all_gather_object); step times: per step the "
                       "slowest rank; tokens/s: summed over ranks" if ws > 1 else "single process"),
    }
    if runtime.is_main():
        write_report(out, report)
        if report["secvec_grad_bytes"] or report["secvec_optimizer_bytes"]:
            log.error("the security vector got gradients (%d B) or optimizer state (%d B)",
                      report["secvec_grad_bytes"], report["secvec_optimizer_bytes"])
    barrier()
    return report


# ---------------------------------------------------------------------------------------------
# report files


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def write_report(out: Path, r: dict) -> None:
    (out / "profile.json").write_text(json.dumps(r, indent=2) + "\n")
    ph = r["phases"]
    zs = "" if r.get("zero_stage") is None else f", DeepSpeed ZeRO-{r['zero_stage']}"
    lines = [f"# stage-2 profile ({r['device']}, world_size {r['world_size']}{zs})", "",
             f"job: {r['job']}", "",
             "| metric | value |", "|---|---|",
             f"| step time (median, s) | {r['step_time_s']:.4f} [p25 {r['step_time']['p25']:.4f}, "
             f"p75 {r['step_time']['p75']:.4f}, n={r['step_time']['n']}] |"]
    for p in PHASES:
        lines.append(f"| {p} (median, s) | {ph[p]['median']:.4f} [p25 {ph[p]['p25']:.4f}, p75 {ph[p]['p75']:.4f}] |")
    mfu = r["mfu"]
    comm = "n/a (no DeepSpeed timers)" if r["comm_time_s"] is None else f"{r['comm_time_s']:.4f}"
    lines += [f"| tokens/s non-pad (total; per rank) | {r['tokens_per_s']:.0f}; {r['tokens_per_s_per_rank']} |",
              f"| tokens/s with loss (total) | {r['loss_tokens_per_s']:.0f} |",
              f"| tokens/s incl. padding (total) | {r['padded_tokens_per_s']:.0f} |",
              f"| model FLOPs / token | {r['flops_per_token']:.4g} |",
              f"| achieved FLOP/s | {r['achieved_flops_per_s']:.4g} |",
              f"| MFU | {'n/a (' + r['peak_flops_source'] + ')' if mfu is None else f'{100 * mfu:.2f}%'} |",
              f"| peak memory ({r['peak_memory_kind']}, per rank) | "
              f"{', '.join(_fmt_bytes(b) for b in r['peak_memory_bytes'])} |",
              f"| step time per rank (median, s) | {', '.join(f'{t:.4f}' for t in r['step_time_s_per_rank'])} |",
              f"| communication (median, s) | {comm} |",
              f"| parameter bytes held per rank | {', '.join(_fmt_bytes(b) for b in r['param_bytes_per_rank'])} "
              f"(whole model {_fmt_bytes(r['param_bytes_whole'])}, ratio {r['param_memory_ratio']:.3f}) |"]
    for k, v in r["memory_breakdown"].items():
        lines.append(f"| {k} | {_fmt_bytes(v)} |")
    lines += [f"| secvec_grad_bytes (measured) | {r['secvec_grad_bytes']} |",
              f"| secvec_optimizer_bytes (measured) | {r['secvec_optimizer_bytes']} |", ""]
    if r["secvec_overhead"]:
        lines += ["## the vector's overhead (step time / step time without the vector)", "",
                  "| variant | step time (s) | ratio | note |", "|---|---|---|---|"]
        for v, rec in r["secvec_overhead"].items():
            t = rec.get("step_time_s")
            ratio = rec.get("step_time_ratio")
            lines.append(f"| {v} | {'n/a' if t is None else f'{t:.4f}'} | "
                         f"{'n/a' if ratio is None else f'{ratio:.3f}'} | "
                         f"{rec.get('reason') or rec.get('mode') or ''} |")
    else:
        lines.append(f"overhead: n/a ({r['secvec_overhead_reason']})")
    if r.get("overhead"):
        lines += ["", f"## overhead, {r['overhead_method']}", "", f"target: {r['overhead_target']}", "",
                  "| variant | step ms median [p25, p75] | ratio [p25, p75] | FLOP share | target ratio | within | "
                  "peak memory vs no_vector | within 2% |", "|---|---|---|---|---|---|---|---|"]
        f3 = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)  # noqa: E731
        for v, rec in r["overhead"].items():
            if rec.get("skipped"):
                lines.append(f"| {v} | skipped: {rec['skipped']} | | {f3(rec['flop_share'], '{:.2%}')} | | | | |")
                continue
            lines.append(
                f"| {v} | {1000 * rec['step_time_s']:.1f} [{1000 * rec['step_time_p25']:.1f}, "
                f"{1000 * rec['step_time_p75']:.1f}] | {f3(rec['ratio'])} [{f3(rec.get('ratio_p25'))}, "
                f"{f3(rec.get('ratio_p75'))}] | {f3(rec['flop_share'], '{:.2%}')} | {f3(rec['target_ratio'])} | "
                f"{'-' if rec['within_target'] is None else rec['within_target']} | "
                f"{f3(rec['peak_memory_ratio'], '{:.4f}')} | "
                f"{'-' if rec['memory_within_target'] is None else rec['memory_within_target']} |")
    lines += ["", f"per-variant peak memory: {r['variant_memory_method']}"]
    lines += ["", "FLOPs: " + r["flops_formula"], ""]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    try:
        plot_report(out, r)
    except Exception as e:  # plots are a convenience; the numbers are in profile.json
        log.warning("could not draw the profile plots: %s", e)


def plot_report(out: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # step-time breakdown, one stacked bar per measured variant
    bars = {"configured": {p: r["phases"][p]["median"] for p in PHASES}}
    for v, rec in (r["secvec_overhead"] or {}).items():
        if "phases" in rec:
            bars[v] = rec["phases"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = [0.0] * len(bars)
    for p, color in zip(PHASES, ("#9467bd", "#1f77b4", "#ff7f0e", "#2ca02c")):
        vals = [1000 * b[p] for b in bars.values()]
        ax.bar(list(bars), vals, bottom=bottom, label=p, color=color)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_ylabel("median ms / step")
    ax.set_title("step time by phase", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "profile_step_time.png", dpi=110)
    plt.close(fig)

    mb = r["memory_breakdown"]
    ws = r["world_size"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    items = {"params": mb["param_bytes"], "grads": mb["grad_bytes"], "optimizer": mb["optimizer_state_bytes"],
             "fp32 master": mb.get("optimizer_master_bytes") or 0,
             "activations (est.)": mb["activation_bytes_estimate"] or 0,
             f"peak ({r['peak_memory_kind']})": r["peak_memory_bytes"][0]}
    ax = axes[0]
    ax.bar(list(items), [v / 2 ** 20 for v in items.values()], color="#1f77b4")
    ax.set_ylabel("MiB")
    ax.set_title("memory breakdown (rank 0)", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    ax = axes[1]
    x = list(range(ws))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [b / 2 ** 20 for b in r["peak_memory_bytes"]], w, label=f"peak ({r['peak_memory_kind']})")
    ax.bar([i + w / 2 for i in x], [b / 2 ** 20 for b in r["param_bytes_per_rank"]], w, label="params held")
    ax.axhline(r["param_bytes_whole"] / 2 ** 20, color="k", lw=0.8, ls="--", label="whole model params")
    ax.set_xticks(x, [f"rank {i}" for i in x])
    ax.set_ylabel("MiB")
    ax.set_title("memory per rank", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "profile_memory.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if r.get("overhead"):  # interleaved: paired ratios, their quartiles, and the target
        ov = {v: rec.get("ratio") for v, rec in r["overhead"].items()}
        targets = [rec.get("target_ratio") if not rec.get("skipped") and v != "no_vector" else None
                   for v, rec in r["overhead"].items()]
        err = [[(x - (rec.get("ratio_p25") or x)) if x else 0 for x, rec in zip(ov.values(), r["overhead"].values())],
               [((rec.get("ratio_p75") or x) - x) if x else 0 for x, rec in zip(ov.values(), r["overhead"].values())]]
    else:
        ov = {v: rec.get("step_time_ratio") for v, rec in (r["secvec_overhead"] or {}).items()}
        targets, err = [None] * len(ov), None
    names = list(ov)
    ax.bar(names, [x or 0 for x in ov.values()], color="#d62728", yerr=err, capsize=3)
    for i, x in enumerate(ov.values()):
        ax.text(i, (x or 0) + 0.01, "n/a" if x is None else f"{x:.3f}", ha="center", fontsize=9)
    for i, t in enumerate(targets):
        if t is not None:
            ax.plot([i - 0.4, i + 0.4], [t, t], color="k", ls="--", lw=1, label="target" if i == targets.index(t) else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / no vector")
    ax.set_title("security vector overhead", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "profile_overhead.png", dpi=110)
    plt.close(fig)


def cli_main(config: Optional[str], overrides: list[str], steps: Optional[int] = None,
             warmup: Optional[int] = None, debug: bool = False) -> int:
    """`dist-secvec profile`: with --config the configured stage-2 job, without it the demo's."""
    from dist_secvec.config import load_config

    extra = ([f"profile.steps={steps}"] if steps is not None else []) + (
        [f"profile.warmup={warmup}"] if warmup is not None else [])
    if config is None:
        from dist_secvec.demo.run import demo_defaults

        base = demo_defaults()
        base["output_dir"] = "runs/profile"
        cfg = validate(load_config(None, list(overrides) + extra, base=base), "demo")
    else:
        cfg = validate(load_config(config, list(overrides) + extra), "profile")
    runtime.setup_logging("debug" if debug else cfg.logging.level)
    r = run_profile(cfg, default_job=config is None)
    if runtime.is_main():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
        ov = r["secvec_overhead"] or {}
        ratios = ", ".join(f"{k} {v['step_time_ratio']:.3f}" for k, v in ov.items()
                           if v.get("step_time_ratio") is not None)
        within = "".join(f"; {k}: paired ratio {v['ratio']:.3f}, target <= {v['target_ratio']:.3f} "
                         f"({'met' if v['within_target'] else 'missed'})"
                         for k, v in (r.get("overhead") or {}).items()
                         if v.get("within_target") is not None and v.get("target_ratio") is not None)
        print(f"step {r['step_time_s'] * 1000:.1f} ms (median), {r['tokens_per_s']:.0f} tokens/s "
              f"({r['loss_tokens_per_s']:.0f} with loss), {r['flops_per_token']:.4g} FLOPs/token, MFU {mfu}, "
              f"peak {r['peak_memory_kind']} {r['peak_memory_bytes'][0] / 2 ** 20:.0f} MiB, "
              f"secvec grad/optimizer bytes {r['secvec_grad_bytes']}/{r['secvec_optimizer_bytes']}; "
              f"overhead vs no vector: {ratios or 'n/a'}{within}; {r['world_size']} rank(s), parameter bytes per rank "
              f"{r['param_memory_ratio']:.3f} of the whole model; report: {Path(cfg.output_dir) / 'profile.md'}")
    return 0


if __name__ == "__main__":  # the hidden child of memory_in_processes
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        sys.exit(_memory_child(sys.argv[2]))
    sys.exit("usage: python -m dist_secvec.profile --memory-child SPEC (internal; use `dist-secvec profile`)")
