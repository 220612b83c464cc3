"""Timing, memory and output code shared by the benchmark scripts in this folder.

The layer benchmarks (bench_secvec_delta.py, bench_secvec_lora_delta.py) time forward + backward
of several variants of one Llama linear layer per shape and tokens-per-step; bench_fold.py times
whole training steps. All of them interleave the variants round by round, so drift in clock or
load hits every variant alike, and write a JSON file and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

# (layer, K in, N out); 70B's k/v projections are 8192 -> 1024 under grouped-query attention.
LAYERS = {
    "7b": [("attn q/k/v/o", 4096, 4096), ("mlp gate/up", 4096, 11008), ("mlp down", 11008, 4096)],
    "13b": [("attn q/k/v/o", 5120, 5120), ("mlp gate/up", 5120, 13824), ("mlp down", 13824, 5120)],
    "70b": [("attn q/o", 8192, 8192), ("attn k/v", 8192, 1024), ("mlp gate/up", 8192, 28672),
            ("mlp down", 28672, 8192)],
    # the profile issue's CPU reference model (bench_profile_overhead.py): 512 hidden, intermediate 1344
    "ref512": [("attn q/k/v/o", 512, 512), ("mlp gate/up", 512, 1344), ("mlp down", 1344, 512)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(run: Callable[[], object], cuda: bool) -> float:
    """Seconds `run()` takes, with the GPU synchronized before and after."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """{name: [seconds]}: `warmup` untimed rounds, then `repeats` rounds, each calling every step
    (which returns its own time) once in order."""
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            t = step()
            if i >= warmup:
                times[name].append(t)
    return times


def peak_mib(run: Callable[[], object], device: torch.device) -> float | None:
    """CUDA: MiB allocated at the peak of `run()` above what was allocated before it; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def saved_bytes(fn, x, param_ptrs) -> int:
    """Bytes the autograd graph of fn(x) saves for backward, each storage once, parameters excluded."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def time_layer_variants(fns: dict, step: Callable, x, dy, ptrs, args, device, stat: str = "median") -> dict:
    """The per-variant columns of one layer-benchmark row: {name}_ms (by `stat`), {name}_median_ms,
    {name}_min_ms, {name}_saved_mib and {name}_peak_mib (CUDA), for fns {name: f(x) -> y} and
    step(fn, x, dy) -> seconds of one forward + backward."""
    times = interleaved({name: (lambda f=fn: step(f, x, dy)) for name, fn in fns.items()}, args.warmup, args.repeats)
    row = {}
    for name, fn in fns.items():
        row[f"{name}_median_ms"] = 1e3 * statistics.median(times[name])
        row[f"{name}_min_ms"] = 1e3 * min(times[name])
        row[f"{name}_ms"] = row[f"{name}_{stat}_ms"]
        row[f"{name}_saved_mib"] = saved_bytes(fn, x, ptrs) / 2**20
        row[f"{name}_peak_mib"] = peak_mib(lambda f=fn: step(f, x, dy), device)
    return row


def layer_arg_parser(description: str, cuda: bool) -> argparse.ArgumentParser:
    """The options every layer benchmark takes: shapes, tokens, dtype, backend, in place, repeats, out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["7b", "13b", "70b"] if cuda else ["7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if cuda else [256, 1024],
                   help="tokens per step (batch x sequence)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--no-inplace", action="store_true", help="secvec paths write a fresh output, not into x W^T")
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    return p


def layer_sweep(args, bench_one: Callable, describe: Callable[[dict], str]) -> list[dict]:
    """bench_one(model, layer, K, N, M) for every layer shape of --models and every --tokens, each
    row printed as it comes (describe(row) -> one line)."""
    rows = []
    for model in args.models:
        for layer, K, N in LAYERS[model]:
            for M in args.tokens:
                rows.append(bench_one(model, layer, K, N, M))
                print(f"{model} {layer} {K}->{N} M={M}: {describe(rows[-1])}", flush=True)
    return rows


def run_meta(args, device: torch.device, resolve_backend: Callable, **extra) -> dict:
    """Device, torch, threads and the common options of a layer benchmark, plus `extra`."""
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype,
            "secvec_backend": resolve_backend(args.backend, device), "inplace": not args.no_inplace,
            "repeats": args.repeats, "warmup": args.warmup, **extra}


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def write_outputs(out: Path, stem: str, data: dict, markdown: str) -> None:
    """out/stem.json (data) and out/stem.md (markdown), then the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
