"""`dist-secvec profile`: time, throughput, FLOPs, MFU and memory of the stage-2 job.

Runs real optimizer steps of the configured stage-2 (finetune) job, built with the same setup
functions as `dist_secvec.finetune` (tokenizer, data, model, trainable part, frozen vector,
optimizer), and times each step split into data (collate + to_device), forward, backward and
optimizer (clip + step + schedule + zero_grad), with torch.cuda.synchronize around each phase on
CUDA. Then it repeats the job with the vector off, on the torch path and on the Triton path
(CUDA only) to report the vector's overhead as step-time ratios.

Outputs in output_dir: profile.json, profile.md and profile_*.png.

Model FLOPs are counted by hand (not by torch's FLOP counters, which count a full backward for
frozen weights); `flops_formula` in profile.json spells the count out.

Single process only: per-rank figures are lists of length runtime.world_size() and totals sum
them, but gathering them across DeepSpeed ranks is not implemented yet (world_size > 1 is
refused with a clear error).
"""

from __future__ import annotations

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
from dist_secvec.config import Config, validate
from dist_secvec.data import IGNORE_INDEX, collate, endless_batches, load_samples, tokenize_samples
from dist_secvec.errors import UserError
from dist_secvec.finetune import fold_choice
from dist_secvec.model import add_trainable_adapter, load_model, load_tokenizer, unwrap_base
from dist_secvec.secvec import (attach_security_vector, check_fingerprint, fold_security_vector,
                                load_security_vector)
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


def build_job(cfg: Config, n_steps: int, vector: str = "configured", tok=None, examples=None) -> Job:
    """finetune's setup. vector: configured (as stage 2 would run: fold or attach) | off |
    torch | triton (attached on that path, never folded)."""
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    if tok is None:
        tok = load_tokenizer(cfg.model)
    if examples is None:
        examples = tokenize_samples(tok, load_samples(cfg.data.train, cfg.data.format, cfg.data.split,
                                                      cfg.data.max_samples), cfg.data).examples
    model = load_model(cfg.model, device, for_training=True)
    model = add_trainable_adapter(model, cfg.adapter)
    sv_layers, folded, mode, backend = [], [], "off", None
    if cfg.security_vector.path and vector != "off":
        sv = load_security_vector(cfg.security_vector.path)
        check_fingerprint(sv, model, cfg.model.path)
        fold = fold_choice(cfg)[0] if vector == "configured" else False
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
    return Job(model, optimizer, scheduler, params, sv_layers, folded, device, tok.pad_token_id, examples, cfg,
               mode, backend)


# ---------------------------------------------------------------------------------------------
# measurement helpers (each works on tensors, so tests can check them against hand sums)


def tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def param_bytes(model) -> int:
    return sum(tensor_bytes(p) for p in model.parameters())


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
            r, k = layer.secvec_A.shape
            delta += 4 * r * (k + layer.secvec_B.shape[0])
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


def run_steps(job: Job, steps: int, warmup: int, trace_path: Optional[Path] = None) -> dict:
    """warmup + steps optimizer steps of finetune's loop, each phase timed; returns per-step records
    and the memory figures measured from the tensors."""
    cfg, dev, model = job.cfg, job.device, job.model
    ga = cfg.optim.gradient_accumulation_steps
    gen = torch.Generator().manual_seed(cfg.seed)
    micro = endless_batches(job.examples, cfg.optim.micro_batch_size, gen, cfg.data.shuffle)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    records, mem = [], {"grad_bytes": 0, "secvec_grad_bytes": 0}
    prof = None
    for step in range(warmup + steps):
        if step == warmup and trace_path is not None:
            prof = torch.profiler.profile(record_shapes=False)
            prof.__enter__()
        pc = time.perf_counter
        _sync(dev)
        t = pc()
        group = [to_device(collate(next(micro), job.pad_id), dev) for _ in range(ga)]
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group]
        _sync(dev)
        rec = {"data": pc() - t, "forward": 0.0, "backward": 0.0}
        n_tokens = max(sum(counts), 1)
        for b, n in zip(group, counts):
            t = pc()
            loss = model(**b).loss
            _sync(dev)
            rec["forward"] += pc() - t
            t = pc()
            (loss * (n / n_tokens)).backward()
            _sync(dev)
            rec["backward"] += pc() - t
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at profile step {step + 1}")
        mem["grad_bytes"] = max(mem["grad_bytes"], grad_bytes(model))
        mem["secvec_grad_bytes"] = max(mem["secvec_grad_bytes"], secvec_grad_bytes(job.sv_layers, job.folded))
        t = pc()
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(job.params, cfg.optim.max_grad_norm)
        job.optimizer.step()
        job.scheduler.step()
        job.optimizer.zero_grad(set_to_none=True)
        _sync(dev)
        rec["optimizer"] = pc() - t
        rec["step"] = sum(rec[p] for p in PHASES)
        rec["tokens_padded"] = sum(int(b["input_ids"].numel()) for b in group)
        rec["tokens_nonpad"] = sum(int(b["attention_mask"].sum()) for b in group)
        rec["tokens_loss"] = sum(counts)
        rec["seq_len"] = statistics.mean(int(b["input_ids"].shape[1]) for b in group)
        if step >= warmup:
            records.append(rec)
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(str(trace_path))
    mem["param_bytes"] = param_bytes(model)
    mem["optimizer_state_bytes"] = optimizer_state_bytes(job.optimizer)
    mem["secvec_optimizer_bytes"] = secvec_optimizer_bytes(job.optimizer, job.sv_layers, job.folded)
    mem["secvec_param_bytes"] = sum(tensor_bytes(t) for layer in job.sv_layers
                                    for t in (layer.secvec_A, layer.secvec_B))
    mem["peak"] = peak_memory(dev)
    return {"records": records, "memory": mem}


def spread(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1],
            "mean": statistics.fmean(v), "n": len(v)}


def gather(value: Any) -> list:
    """One value per rank. Single process: [value]; DeepSpeed multi-rank is not implemented yet."""
    ws = runtime.world_size()
    if ws == 1:
        return [value]
    raise UserError(f"dist-secvec profile: WORLD_SIZE={ws}, but multi-rank (DeepSpeed) profiling is not "
                    "implemented yet; run it as a single process")


def summarize(job: Job, result: dict) -> dict:
    recs = result["records"]
    step = spread([r["step"] for r in recs])
    total_time = sum(r["step"] for r in recs)
    tps = {k: sum(r[f"tokens_{k}"] for r in recs) / total_time for k in ("padded", "nonpad", "loss")}
    seq_len = statistics.mean(r["seq_len"] for r in recs)
    fpt, formula, parts = flops_per_token(job.model, seq_len, job.sv_layers, job.folded)
    return {"step_time_s": step["median"], "step_time": step,
            "phases": {p: spread([r[p] for r in recs]) for p in PHASES},
            "tokens_per_s_rank": tps, "flops_per_token": fpt, "flops_formula": formula, "flops_parts": parts,
            "achieved_flops_per_s_rank": fpt * tps["padded"], "memory": result["memory"],
            "tokens_per_step": {k: statistics.mean(r[f"tokens_{k}"] for r in recs)
                                for k in ("padded", "nonpad", "loss")}}


# ---------------------------------------------------------------------------------------------
# the command


def default_job_config(cfg: Config) -> Config:
    """The embedded demo's stage-2 job (vector active): demo world, cached aligned base, a stage-1
    vector (cached next to the base; a short stage 1 is trained when none is there)."""
    from dist_secvec.demo.run import _cache_root, _stage_config, aligned_base, demo_world
    from dist_secvec.train_sv import run_train_sv

    quick = cfg.demo.quick
    out = Path(cfg.output_dir)
    sizes, world, data = demo_world(cfg)
    base_dir = aligned_base(cfg, sizes, data, world.texts(), quick)
    vec_dir = _cache_root(cfg) / f"secvec-{base_dir.name}"
    if not (vec_dir / "secvec.json").exists():
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
    log.info("profiling the demo's stage-2 job: base %s, vector %s", base_dir, vec_dir)
    return _stage_config(cfg, "finetune", quick, model={"path": str(base_dir)}, output_dir=str(out),
                         data={"train": [data["finetune_mixed"]]}, security_vector={"path": str(vec_dir)})


def run_profile(cfg: Config, default_job: bool = False) -> dict:
    gather(None)  # refuses multi-rank before anything is loaded
    if default_job:
        cfg = default_job_config(cfg)
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

    # the configured job, fully measured
    job = build_job(cfg, steps + warmup, "configured", tok, examples)
    main = summarize(job, run_steps(job, steps, warmup, out / "trace.json" if cfg.profile.trace else None))
    main_mode, main_backend = job.vector_mode, job.backend
    dev = job.device
    del job

    # the vector's overhead: the same job with the vector off, on the torch path, on the Triton path
    variants: dict[str, Any] = {}
    if not cfg.security_vector.path:
        overhead_reason = "no security vector configured (security_vector.path is null)"
    else:
        overhead_reason = None
        for v in VARIANTS:
            if v == "triton" and dev.type != "cuda":
                variants[v] = {"step_time_ratio": None, "reason": "Triton path needs CUDA; this run is on CPU"}
                continue
            if v == "triton":
                try:
                    import dist_secvec_kernels.secvec_delta  # noqa: F401
                except Exception as e:  # no usable triton
                    variants[v] = {"step_time_ratio": None, "reason": f"triton unavailable: {type(e).__name__}: {e}"}
                    continue
            saved = os.environ.pop("DIST_SECVEC_BACKEND", None)  # the variant names its path itself
            try:
                vjob = build_job(cfg, steps + warmup, "off" if v == "no_vector" else v, tok, examples)
                s = summarize(vjob, run_steps(vjob, steps, warmup))
            finally:
                if saved is not None:
                    os.environ["DIST_SECVEC_BACKEND"] = saved
            del vjob
            variants[v] = {"step_time_s": s["step_time_s"], "step_time": s["step_time"],
                           "phases": {p: s["phases"][p]["median"] for p in PHASES},
                           "flops_per_token": s["flops_per_token"]}
        base_t = variants["no_vector"]["step_time_s"]
        for v, rec in variants.items():
            if rec.get("step_time_s") is not None:
                rec["step_time_ratio"] = rec["step_time_s"] / base_t
        variants["configured"] = {"step_time_s": main["step_time_s"], "step_time_ratio": main["step_time_s"] / base_t,
                                  "mode": main_mode, "backend": main_backend}

    # aggregation over ranks (single process for now)
    ws = runtime.world_size()
    tps_rank = gather(main["tokens_per_s_rank"])
    mem = main["memory"]
    peak = mem["peak"]
    peak_bytes = peak.get("max_allocated", peak.get("max_rss"))
    accounted = mem["param_bytes"] + mem["grad_bytes"] + mem["optimizer_state_bytes"]
    activation = (peak["max_allocated"] - accounted) if peak["kind"] == "cuda" else None
    peak_f, peak_src = peak_flops(cfg, dev)
    achieved = sum(gather(main["achieved_flops_per_s_rank"]))
    report = {
        "world_size": ws,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "job": {"model": cfg.model.path, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
                "adapter": cfg.adapter.type, "security_vector": cfg.security_vector.path, "vector_mode": main_mode,
                "backend": main_backend, "micro_batch_size": cfg.optim.micro_batch_size,
                "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
                "max_length": cfg.data.max_length, "steps": steps, "warmup": warmup},
        "step_time_s": main["step_time_s"],
        "step_time": main["step_time"],
        "phases": main["phases"],
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
        "achieved_flops_note": "flops_per_token x padded tokens/s (padding is computed too)",
        "peak_flops_per_s": peak_f,
        "peak_flops_source": peak_src,
        "mfu": achieved / (peak_f * ws) if peak_f else None,
        "peak_memory_bytes": gather(peak_bytes),
        "peak_memory_kind": peak["kind"],
        "peak_reserved_bytes": gather(peak.get("max_reserved")),
        "memory_breakdown": {"param_bytes": mem["param_bytes"], "grad_bytes": mem["grad_bytes"],
                             "optimizer_state_bytes": mem["optimizer_state_bytes"],
                             "activation_bytes_estimate": activation,
                             "secvec_param_bytes": mem["secvec_param_bytes"]},
        "secvec_grad_bytes": mem["secvec_grad_bytes"],
        "secvec_optimizer_bytes": mem["secvec_optimizer_bytes"],
        "secvec_overhead": variants or None,
        "secvec_overhead_reason": overhead_reason,
        "multi_rank": "not implemented: single process only (DeepSpeed multi-rank is a later issue)",
    }
    write_report(out, report)
    if report["secvec_grad_bytes"] or report["secvec_optimizer_bytes"]:
        log.error("the security vector got gradients (%d B) or optimizer state (%d B)",
                  report["secvec_grad_bytes"], report["secvec_optimizer_bytes"])
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
    lines = [f"# stage-2 profile ({r['device']}, world_size {r['world_size']})", "",
             f"job: {r['job']}", "",
             "| metric | value |", "|---|---|",
             f"| step time (median, s) | {r['step_time_s']:.4f} [p25 {r['step_time']['p25']:.4f}, "
             f"p75 {r['step_time']['p75']:.4f}, n={r['step_time']['n']}] |"]
    for p in PHASES:
        lines.append(f"| {p} (median, s) | {ph[p]['median']:.4f} [p25 {ph[p]['p25']:.4f}, p75 {ph[p]['p75']:.4f}] |")
    mfu = r["mfu"]
    lines += [f"| tokens/s non-pad (total; per rank) | {r['tokens_per_s']:.0f}; {r['tokens_per_s_per_rank']} |",
              f"| tokens/s with loss (total) | {r['loss_tokens_per_s']:.0f} |",
              f"| tokens/s incl. padding (total) | {r['padded_tokens_per_s']:.0f} |",
              f"| model FLOPs / token | {r['flops_per_token']:.4g} |",
              f"| achieved FLOP/s | {r['achieved_flops_per_s']:.4g} |",
              f"| MFU | {'n/a (' + r['peak_flops_source'] + ')' if mfu is None else f'{100 * mfu:.2f}%'} |",
              f"| peak memory ({r['peak_memory_kind']}, per rank) | "
              f"{', '.join(_fmt_bytes(b) for b in r['peak_memory_bytes'])} |"]
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
    items = {"params": mb["param_bytes"], "grads": mb["grad_bytes"], "optimizer": mb["optimizer_state_bytes"],
             "activations (est.)": mb["activation_bytes_estimate"] or 0,
             f"peak ({r['peak_memory_kind']})": r["peak_memory_bytes"][0]}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(list(items), [v / 2 ** 20 for v in items.values()], color="#1f77b4")
    ax.set_ylabel("MiB")
    ax.set_title("memory breakdown (rank 0)", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "profile_memory.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ov = {v: rec.get("step_time_ratio") for v, rec in (r["secvec_overhead"] or {}).items()}
    names = list(ov)
    ax.bar(names, [x or 0 for x in ov.values()], color="#d62728")
    for i, x in enumerate(ov.values()):
        ax.text(i, (x or 0) + 0.01, "n/a" if x is None else f"{x:.3f}", ha="center", fontsize=9)
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
        print(f"step {r['step_time_s'] * 1000:.1f} ms (median), {r['tokens_per_s']:.0f} tokens/s "
              f"({r['loss_tokens_per_s']:.0f} with loss), {r['flops_per_token']:.4g} FLOPs/token, MFU {mfu}, "
              f"peak {r['peak_memory_kind']} {r['peak_memory_bytes'][0] / 2 ** 20:.0f} MiB, "
              f"secvec grad/optimizer bytes {r['secvec_grad_bytes']}/{r['secvec_optimizer_bytes']}; "
              f"overhead vs no vector: {ratios or 'n/a'}; report: {Path(cfg.output_dir) / 'profile.md'}")
    return 0
