"""Cost of a frozen security vector on one Llama linear layer, forward + backward.

For each layer shape and tokens-per-step M, with x (M, K) requiring grad and the base weight W
(N, K) frozen, it times y = f(x); y.backward(dy) for
  base    y = x W^T
  peft    y = x W^T + lora_B(lora_A(dropout(x))) * s     frozen nn.Linear A, B as peft runs them
  secvec  y = apply_secvec_delta(x, x W^T, A, B, s)      torch path on CPU, Triton on CUDA
and reports the median time, the overhead of peft and secvec over base, and beside it the FLOP
floor of the delta:  delta / base = 4 r (K + N) / 4 K N = r (K + N) / (K N)  (forward 2r(K+N)
and dx 2r(K+N) per token, against 2KN + 2KN for the frozen base matmul). Memory: the bytes the
autograd graph saves for backward (saved_tensors_hooks, parameters excluded, each storage once)
and, on CUDA, the peak allocated during the step above what was allocated before it.

    python benchmarks/bench_secvec_delta.py --models 7b --tokens 256 1024 --out bench_out
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_secvec_kernels.dispatch import apply_secvec_delta, resolve_backend

# (layer, K in, N out); 70B's k/v projections are 8192 -> 1024 under grouped-query attention.
LAYERS = {
    "7b": [("attn q/k/v/o", 4096, 4096), ("mlp gate/up", 4096, 11008), ("mlp down", 11008, 4096)],
    "13b": [("attn q/k/v/o", 5120, 5120), ("mlp gate/up", 5120, 13824), ("mlp down", 13824, 5120)],
    "70b": [("attn q/o", 8192, 8192), ("attn k/v", 8192, 1024), ("mlp gate/up", 8192, 28672),
            ("mlp down", 28672, 8192)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("base", "peft", "secvec")


def make_variants(K, N, r, alpha, dtype, device, backend, inplace, lora_dropout):
    W = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    lora_A = nn.Linear(K, r, bias=False).to(device, dtype).requires_grad_(False)
    lora_B = nn.Linear(r, N, bias=False).to(device, dtype).requires_grad_(False)
    nn.init.normal_(lora_B.weight, std=0.02)  # peft starts B at zero; a trained vector is not
    # peft uses Identity for lora_dropout = 0; a positive one also saves an M x K mask per layer.
    dropout, s = (nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()), alpha / r
    A, B = lora_A.weight, lora_B.weight
    return {
        "base": lambda x: F.linear(x, W),
        "peft": lambda x: F.linear(x, W) + lora_B(lora_A(dropout(x))) * s,
        "secvec": lambda x: apply_secvec_delta(x, F.linear(x, W), A, B, s, backend=backend, inplace=inplace),
    }, {W.data_ptr(), A.data_ptr(), B.data_ptr()}


def saved_bytes(fn, x, param_ptrs):
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


def step(fn, x, dy, cuda):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x).backward(dy)
    if cuda:
        torch.cuda.synchronize()
    x.grad = None
    return time.perf_counter() - t0


def bench_one(model, layer, K, N, M, args, device):
    dtype, cuda = DTYPES[args.dtype], device.type == "cuda"
    fns, params = make_variants(K, N, args.rank, args.alpha, dtype, device, args.backend, not args.no_inplace,
                               args.lora_dropout)
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    for _ in range(args.warmup):
        for name in VARIANTS:
            step(fns[name], x, dy, cuda)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so drift in clock or load hits all three alike
        for name in VARIANTS:
            times[name].append(step(fns[name], x, dy, cuda))
    row = {"model": model, "layer": layer, "K": K, "N": N, "tokens": M, "rank": args.rank,
           "floor_pct": 100.0 * args.rank * (K + N) / (K * N)}
    for name in VARIANTS:
        row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        row[f"{name}_saved_mib"] = saved_bytes(fns[name], x, params) / 2**20
        row[f"{name}_peak_mib"] = None
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(fns[name], x, dy, cuda)
            row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for name in ("peft", "secvec"):
        row[f"{name}_overhead_pct"] = 100.0 * (row[f"{name}_ms"] / row["base_ms"] - 1)
    return row


def markdown(rows):
    mib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| model | layer | K->N | tokens | base ms | peft ms (+%) | secvec ms (+%) | FLOP floor % "
             "| saved MiB base/peft/secvec | peak MiB base/peft/secvec |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['K']}->{r['N']} | {r['tokens']} | {r['base_ms']:.1f} "
            f"| {r['peft_ms']:.1f} ({r['peft_overhead_pct']:+.1f}) | {r['secvec_ms']:.1f} "
            f"({r['secvec_overhead_pct']:+.1f}) | {r['floor_pct']:.2f} "
            f"| {'/'.join(mib(r[f'{v}_saved_mib']) for v in VARIANTS)} "
            f"| {'/'.join(mib(r[f'{v}_peak_mib']) for v in VARIANTS)} |")
    return "\n".join(lines)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["7b", "13b", "70b"] if cuda else ["7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if cuda else [256, 1024],
                   help="tokens per step (batch x sequence)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="peft variant's lora_dropout")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--no-inplace", action="store_true", help="secvec writes a fresh output, not into x W^T")
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        for layer, K, N in LAYERS[model]:
            for M in args.tokens:
                rows.append(bench_one(model, layer, K, N, M, args, device))
                r = rows[-1]
                print(f"{model} {layer} {K}->{N} M={M}: base {r['base_ms']:.1f} ms, peft "
                      f"{r['peft_overhead_pct']:+.1f}%, secvec {r['secvec_overhead_pct']:+.1f}%, "
                      f"floor {r['floor_pct']:.2f}%", flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype,
            "secvec_backend": resolve_backend(args.backend, device), "inplace": not args.no_inplace,
            "repeats": args.repeats, "warmup": args.warmup, "lora_dropout": args.lora_dropout,
            "rank": args.rank, "alpha": args.alpha}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_secvec_delta.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows)
    (args.out / "bench_secvec_delta.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
