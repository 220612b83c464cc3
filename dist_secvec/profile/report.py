"""profile.json (one nested schema), profile.md and the plots.

profile.json, schema 2:
    device, world_size, zero_stage, multi_rank
    job        what was profiled: model, adapter, dtype, batch shape, steps, and how the vector is held
               (vector_mode, vector_layers, vector_path_choice, vector_paths, vector_gate), and what
               data.audit flagged and did (audit, null when off)
    step_time  seconds per step: median, p25, p75, min, max, mean, n, per_rank (medians)
    phases     {data, forward, backward, optimizer}: the same spread each
    comm       DeepSpeed's gradient reduce time (the same spread + source), null in one plain process
    tokens     per_step, per_s and per_s_per_rank, each {nonpad, loss, padded}
    flops      per_token, formula, parts, achieved_per_s, peak_per_s, peak_source, mfu
    memory     peak {kind, bytes, reserved} per rank, breakdown (rank 0), per_rank tensor bytes,
               param_bytes_whole, param_memory_ratio
    secvec     the vector's grad and optimizer bytes (must be 0) and its parameter bytes
    partition  partition_report per rank under DeepSpeed, else null
    overhead   the vector's overhead: method, target, flop_share, memory {method, reason, target}
               and per variant (configured, no_vector, torch, ...) its step time, phases, the paired
               ratio to no_vector, within_target and its peak memory; reason when there is none
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from dist_secvec.files import write_text_atomic
from dist_secvec.config import Config
from dist_secvec.profile.flops import peak_flops
from dist_secvec.profile.measure import PHASES, spread

log = logging.getLogger(__name__)

SCHEMA = 2
TIME_TARGET = ("ratio - 1 <= 1.5 x flop_share (flop_share: the vector's delta FLOPs / the job's FLOPs with the "
               "vector attached; ratio: median over steps of step time / no_vector's step time on the same batches)")
TOKENS = ("nonpad", "loss", "padded")


def overhead_report(agg: dict, measured: dict, skipped: dict, memory: dict, per_round: int,
                    n_rounds: int, interleave: bool) -> dict:
    """Per variant: median step time and spread, the step-time ratio to no_vector (median of the
    per-step ratios: step i of both jobs sees the same batches in the same round), the vector's
    FLOP share (attached) and whether ratio - 1 <= 1.5 x that share (the target), and its peak
    memory against no_vector's (`memory`: peaks.variant_memory)."""
    share = None
    for name in ("torch", "triton", "unfused", "configured"):
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
        a, m = agg[name], measured[name]
        rec = {"mode": m["mode"], "backend": m["backend"], "vector_layers": m.get("n_layers"),
               "path_choice": m.get("path_choice"), "vector_paths": m.get("paths"),
               "step_time": a["step_time"], "phases": {p: a["phases"][p]["median"] for p in PHASES},
               "flops_per_token": a["flops_per_token"], "flop_share": share,
               "flop_share_computed": a["flops_parts"]["secvec_delta"] / a["flops_per_token"],
               "target_ratio": None if share is None else 1 + 1.5 * share}
        if nv is None:
            rec.update(ratio=None, ratio_of_medians=None, within_target=None, reason="no_vector not measured")
        else:
            paired = spread([t / b for t, b in zip(a["step_times"], nv["step_times"])])
            rec.update(ratio=paired["median"], ratio_p25=paired["p25"], ratio_p75=paired["p75"],
                       ratio_of_medians=a["step_time_s"] / nv["step_time_s"])
            if name == "no_vector":
                rec["within_target"] = None  # the baseline
            else:
                rec["within_target"] = None if share is None else bool(rec["ratio"] - 1 <= 1.5 * share)
                if share:
                    rec["overhead_over_flop_share"] = (rec["ratio"] - 1) / share
        rec["memory"] = mem.get(name)
        rep[name] = rec
    method = (f"interleaved: {n_rounds} rounds of {per_round} optimizer steps per variant, order rotated each "
              "round" if interleave else "one variant after the other (profile.interleave=false)")
    return {"reason": None, "method": method, "target": TIME_TARGET, "flop_share": share,
            "memory": {k: memory.get(k) for k in ("method", "reason", "target")}, "variants": rep}


def no_overhead(reason: str) -> dict:
    """The overhead section when no variant ran."""
    return {"reason": reason, "method": None, "target": TIME_TARGET, "flop_share": None,
            "memory": {"method": None, "reason": reason, "target": None}, "variants": None}


def build_report(cfg: Config, measured: dict, agg: dict, overhead: dict, warmup: int) -> dict:
    """profile.json's content (the schema above) from the configured job's figures on every rank."""
    main, cm = agg["configured"], measured["configured"]
    ranks = cm["ranks"]
    dev, stage = cm["device"], cm["zero_stage"]
    ws = len(ranks)
    tps = [r["tokens_per_s_rank"] for r in ranks]
    mems = [r["memory"] for r in ranks]
    peaks = [m["peak"] for m in mems]
    mem, peak = mems[0], peaks[0]
    accounted = mem["param_bytes"] + mem["grad_bytes"] + mem["optimizer_state_bytes"] + mem["optimizer_master_bytes"]
    peak_f, peak_src = peak_flops(cfg, dev)
    achieved = sum(r["achieved_flops_per_s_rank"] for r in ranks)
    per_rank_params = [m["param_bytes"] for m in mems]
    whole = mem["param_bytes_whole"]
    comm = main["comm"]
    return {
        "schema": SCHEMA,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "world_size": ws,
        "zero_stage": stage,
        "multi_rank": ("figures of every rank gathered by rank 0 (all_gather_object); step times: per step the "
                       "slowest rank; tokens/s: summed over ranks" if ws > 1 else "single process"),
        "job": {"model": cfg.model.path, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
                "adapter": cfg.adapter.type, "security_vector": cfg.security_vector.path,
                "vector_mode": cm["mode"], "vector_layers": cm["n_layers"], "vector_path_choice": cm["path_choice"],
                "vector_paths": cm["paths"], "vector_gate": cm["gate"], "backend": cm["backend"],
                "audit": cm.get("audit"),
                "micro_batch_size": cfg.optim.micro_batch_size,
                "gradient_accumulation_steps": cfg.optim.gradient_accumulation_steps,
                "max_length": cfg.data.max_length, "steps": cfg.profile.steps, "warmup": warmup,
                "deepspeed": stage is not None, "zero_stage": stage},
        "step_time": {**main["step_time"], "per_rank": main["step_time_s_per_rank"]},
        "phases": main["phases"],
        "comm": None if comm is None else {
            **comm, "source": "DeepSpeed wall_clock_breakdown timer bwd_allreduce_microstep summed over the step's "
                              "micro-steps (gradient reduce after backward; ZeRO-3 parameter all-gathers are inside "
                              "forward/backward and not split out); max over ranks"},
        "tokens": {"per_step": main["tokens_per_step"],
                   "per_s": {k: sum(r[k] for r in tps) for k in TOKENS},
                   "per_s_per_rank": {k: [r[k] for r in tps] for k in TOKENS}},
        "flops": {"per_token": main["flops_per_token"], "formula": main["flops_formula"],
                  "parts": main["flops_parts"], "achieved_per_s": achieved,
                  "achieved_note": "per_token x padded tokens/s (padding is computed too), summed over ranks",
                  "peak_per_s": peak_f, "peak_source": peak_src,
                  "mfu": achieved / (peak_f * ws) if peak_f else None},
        "memory": {
            "peak": {"kind": peak["kind"], "bytes": [p.get("max_allocated", p.get("max_rss")) for p in peaks],
                     "reserved": [p.get("max_reserved") for p in peaks]},
            "breakdown": {"param_bytes": mem["param_bytes"], "grad_bytes": mem["grad_bytes"],
                          "optimizer_state_bytes": mem["optimizer_state_bytes"],
                          "optimizer_master_bytes": mem["optimizer_master_bytes"],
                          "activation_bytes_estimate": (peak["max_allocated"] - accounted) if peak["kind"] == "cuda"
                          else None,
                          "secvec_param_bytes": mem["secvec_param_bytes"]},
            "per_rank": {k: [m[k] for m in mems] for k in ("param_bytes", "param_bytes_resident", "grad_bytes",
                                                            "optimizer_state_bytes", "optimizer_master_bytes")},
            "param_bytes_whole": whole,
            "param_memory_ratio": max(per_rank_params) / whole if whole else None,
            "param_memory_note": ("bytes of parameters each rank holds (held_numel x element size: its ZeRO-3 "
                                  "partition, else the whole tensor); param_bytes_whole is the whole model, the "
                                  "1-rank figure; param_memory_ratio = max per-rank / whole")},
        "secvec": {"grad_bytes": sum(m["secvec_grad_bytes"] for m in mems),
                   "optimizer_bytes": sum(m["secvec_optimizer_bytes"] for m in mems),
                   "grad_bytes_per_rank": [m["secvec_grad_bytes"] for m in mems],
                   "optimizer_bytes_per_rank": [m["secvec_optimizer_bytes"] for m in mems],
                   "param_bytes_per_rank": [m["secvec_param_bytes"] for m in mems]},
        "partition": cm["partition"] if stage is not None else None,
        "overhead": overhead,
    }


def summary_line(r: dict, out: Path) -> str:
    """The one line `dist-secvec profile` prints."""
    mfu = "n/a" if r["flops"]["mfu"] is None else f"{100 * r['flops']['mfu']:.2f}%"
    ov = r["overhead"]["variants"] or {}
    ratios = ", ".join(f"{k} {v['ratio']:.3f}" for k, v in ov.items() if v.get("ratio") is not None)
    within = "".join(f"; {k}: target <= {v['target_ratio']:.3f} ({'met' if v['within_target'] else 'missed'})"
                     for k, v in ov.items() if v.get("within_target") is not None)
    mem, tok = r["memory"], r["tokens"]["per_s"]
    return (f"step {r['step_time']['median'] * 1000:.1f} ms (median), {tok['nonpad']:.0f} tokens/s "
            f"({tok['loss']:.0f} with loss), {r['flops']['per_token']:.4g} FLOPs/token, MFU {mfu}, "
            f"peak {mem['peak']['kind']} {mem['peak']['bytes'][0] / 2 ** 20:.0f} MiB, "
            f"secvec grad/optimizer bytes {r['secvec']['grad_bytes']}/{r['secvec']['optimizer_bytes']}; "
            f"overhead vs no vector (paired ratio): {ratios or 'n/a'}{within}; {r['world_size']} rank(s), parameter "
            f"bytes per rank {mem['param_memory_ratio']:.3f} of the whole model; report: {out / 'profile.md'}")


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def write_report(out: Path, r: dict) -> None:
    write_text_atomic(out / "profile.json", json.dumps(r, indent=2) + "\n")
    st, ph, tok, fl, mem = r["step_time"], r["phases"], r["tokens"], r["flops"], r["memory"]
    zs = "" if r.get("zero_stage") is None else f", DeepSpeed ZeRO-{r['zero_stage']}"
    lines = [f"# stage-2 profile ({r['device']}, world_size {r['world_size']}{zs})", "",
             f"job: {r['job']}", "",
             "| metric | value |", "|---|---|",
             f"| step time (median, s) | {st['median']:.4f} [p25 {st['p25']:.4f}, p75 {st['p75']:.4f}, n={st['n']}] |"]
    for p in PHASES:
        lines.append(f"| {p} (median, s) | {ph[p]['median']:.4f} [p25 {ph[p]['p25']:.4f}, p75 {ph[p]['p75']:.4f}] |")
    comm = "n/a (no DeepSpeed timers)" if r["comm"] is None else f"{r['comm']['median']:.4f}"
    mfu = fl["mfu"]
    whole = mem["param_bytes_whole"]
    lines += [f"| tokens/s non-pad (total; per rank) | {tok['per_s']['nonpad']:.0f}; "
              f"{', '.join(f'{x:.0f}' for x in tok['per_s_per_rank']['nonpad'])} |",
              f"| tokens/s with loss (total) | {tok['per_s']['loss']:.0f} |",
              f"| tokens/s incl. padding (total) | {tok['per_s']['padded']:.0f} |",
              f"| model FLOPs / token | {fl['per_token']:.4g} |",
              f"| achieved FLOP/s | {fl['achieved_per_s']:.4g} |",
              f"| MFU | {'n/a (' + fl['peak_source'] + ')' if mfu is None else f'{100 * mfu:.2f}%'} |",
              f"| peak memory ({mem['peak']['kind']}, per rank) | "
              f"{', '.join(_fmt_bytes(b) for b in mem['peak']['bytes'])} |",
              f"| step time per rank (median, s) | {', '.join(f'{t:.4f}' for t in st['per_rank'])} |",
              f"| communication (median, s) | {comm} |",
              f"| parameter bytes held per rank | "
              f"{', '.join(_fmt_bytes(b) for b in mem['per_rank']['param_bytes'])} "
              f"(whole model {_fmt_bytes(whole)}, ratio {mem['param_memory_ratio']:.3f}) |"]
    for k, v in mem["breakdown"].items():
        lines.append(f"| {k} | {_fmt_bytes(v)} |")
    lines += [f"| secvec grad bytes (measured) | {r['secvec']['grad_bytes']} |",
              f"| secvec optimizer bytes (measured) | {r['secvec']['optimizer_bytes']} |", ""]
    ov = r["overhead"]
    if ov["variants"]:
        lines += [f"## the vector's overhead, {ov['method']}", "", f"target: {ov['target']}", "",
                  "| variant | vector | step ms median [p25, p75] | ratio [p25, p75] | FLOP share | target ratio | "
                  "within | peak memory vs no_vector | within 2% |", "|---|---|---|---|---|---|---|---|---|"]
        f3 = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)  # noqa: E731
        for v, rec in ov["variants"].items():
            if rec.get("skipped"):
                lines.append(f"| {v} | - | skipped: {rec['skipped']} | | {f3(rec['flop_share'], '{:.2%}')} | | | | |")
                continue
            t, m = rec["step_time"], rec["memory"] or {}
            lines.append(
                f"| {v} | {rec['mode']} | {1000 * t['median']:.1f} [{1000 * t['p25']:.1f}, {1000 * t['p75']:.1f}] | "
                f"{f3(rec['ratio'])} [{f3(rec.get('ratio_p25'))}, {f3(rec.get('ratio_p75'))}] | "
                f"{f3(rec['flop_share'], '{:.2%}')} | {f3(rec['target_ratio'])} | "
                f"{'-' if rec['within_target'] is None else rec['within_target']} | "
                f"{f3(m.get('ratio'), '{:.4f}')} | {'-' if m.get('within_2pct') is None else m['within_2pct']} |")
        lines += ["", f"per-variant peak memory: {ov['memory']['method'] or ov['memory']['reason']}"]
    else:
        lines.append(f"overhead: n/a ({ov['reason']})")
    lines += ["", "FLOPs: " + fl["formula"], ""]
    write_text_atomic(out / "profile.md", "\n".join(lines) + "\n")
    try:
        plot_report(out, r)
    except Exception as e:  # plots are a convenience; the numbers are in profile.json
        log.warning("could not draw the profile plots: %s", e)


def plot_report(out: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = r["overhead"]["variants"] or {}
    # step-time breakdown, one stacked bar per measured variant
    bars = {"configured": {p: r["phases"][p]["median"] for p in PHASES}}
    for v, rec in variants.items():
        if v != "configured" and "phases" in rec:
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

    mem = r["memory"]
    mb, peak = mem["breakdown"], mem["peak"]
    ws = r["world_size"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    items = {"params": mb["param_bytes"], "grads": mb["grad_bytes"], "optimizer": mb["optimizer_state_bytes"],
             "fp32 master": mb.get("optimizer_master_bytes") or 0,
             "activations (est.)": mb["activation_bytes_estimate"] or 0,
             f"peak ({peak['kind']})": peak["bytes"][0]}
    ax = axes[0]
    ax.bar(list(items), [v / 2 ** 20 for v in items.values()], color="#1f77b4")
    ax.set_ylabel("MiB")
    ax.set_title("memory breakdown (rank 0)", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    ax = axes[1]
    x = list(range(ws))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [b / 2 ** 20 for b in peak["bytes"]], w, label=f"peak ({peak['kind']})")
    ax.bar([i + w / 2 for i in x], [b / 2 ** 20 for b in mem["per_rank"]["param_bytes"]], w, label="params held")
    ax.axhline(mem["param_bytes_whole"] / 2 ** 20, color="k", lw=0.8, ls="--", label="whole model params")
    ax.set_xticks(x, [f"rank {i}" for i in x])
    ax.set_ylabel("MiB")
    ax.set_title("memory per rank", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "profile_memory.png", dpi=110)
    plt.close(fig)

    # paired ratios, their quartiles, and the target
    fig, ax = plt.subplots(figsize=(6, 3.6))
    recs = list(variants.values())
    ratios = [rec.get("ratio") for rec in recs]
    targets = [rec.get("target_ratio") if not rec.get("skipped") and v != "no_vector" else None
               for v, rec in variants.items()]
    err = [[(x - (rec.get("ratio_p25") or x)) if x else 0 for x, rec in zip(ratios, recs)],
           [((rec.get("ratio_p75") or x) - x) if x else 0 for x, rec in zip(ratios, recs)]]
    ax.bar(list(variants), [x or 0 for x in ratios], color="#d62728", yerr=err if recs else None, capsize=3)
    for i, x in enumerate(ratios):
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
