"""QLoRA case: a frozen security vector and a trainable LoRA on one Llama linear layer, fwd + bwd.

For each layer shape and tokens-per-step M, with x (M, K) requiring grad, the base weight W (N, K)
frozen and the LoRA (A_l, B_l) trainable, it times y = f(x); y.backward(dy) (LoRA .grad reset
each step) for
  base      y = x W^T                                              frozen base only
  lora      y = x W^T + lora_B(lora_A(x)) * s_l                    peft's LoRA, no vector
  peft2     lora + vec_B(vec_A(x)) * s_v                           the vector as a 2nd (frozen) peft adapter
  separate  apply_secvec_delta(x, x W^T, A_v, B_v, s_v) + lora_B(lora_A(x)) * s_l
                                                                   today's stack: SecVecLinear under peft
  combined  apply_secvec_lora_delta(x, x W^T, A_v, B_v, s_v, A_l, B_l, s_l)
                                                                   one shrink over x for both
(torch path on CPU, Triton on CUDA; --backend forces one). It reports the median time (--stat
min: the fastest), the overhead over base, the vector's own cost (each variant's time over
`lora`), beside the vector's FLOP floor r_v (K + N) / (K N) of the base (forward 2 r_v (K+N) and dx 2 r_v (K+N) per token
against 2KN + 2KN for the frozen base); the activation bytes the autograd graph saves
(parameters excluded) and, on CUDA, the peak memory allocated during the step. The base here is
a dense weight (bitsandbytes 4-bit needs a GPU); the delta math is the same on a 4-bit base.

    python benchmarks/bench_secvec_lora_delta.py --models 7b --tokens 256 --out bench_out
    python benchmarks/bench_secvec_lora_delta.py --models 7b --tokens 256 --delta-only --out bench_out
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_secvec_delta import DTYPES, LAYERS, saved_bytes  # noqa: E402

from dist_secvec_kernels.dispatch import apply_secvec_delta, apply_secvec_lora_delta, resolve_backend  # noqa: E402

VARIANTS = ("base", "lora", "peft2", "separate", "combined")


def make_variants(K, N, r_v, r_l, s_v, s_l, dtype, device, backend, inplace, M, delta_only):
    W = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    if delta_only:  # the base's output as a precomputed constant: only the adapter work is timed
        const = torch.randn(M, N, dtype=dtype, device=device)
        base = lambda x: const.clone()  # noqa: E731  (a fresh non-leaf, as a linear's output)
    else:
        base = lambda x: F.linear(x, W)  # noqa: E731
    lin = lambda i, o, train: nn.Linear(i, o, bias=False).to(device, dtype).requires_grad_(train)  # noqa: E731
    vec_A, vec_B = lin(K, r_v, False), lin(r_v, N, False)
    lora_A, lora_B = lin(K, r_l, True), lin(r_l, N, True)
    nn.init.normal_(vec_B.weight, std=0.02)  # a trained vector is not zero
    nn.init.normal_(lora_B.weight, std=0.02)  # peft starts B at zero; mid-training it is not
    A_v, B_v, A_l, B_l = vec_A.weight, vec_B.weight, lora_A.weight, lora_B.weight
    lora = lambda x: lora_B(lora_A(x)) * s_l  # noqa: E731  (peft: lora_dropout 0 is nn.Identity)
    fns = {
        "base": base,
        "lora": lambda x: base(x) + lora(x),
        "peft2": lambda x: base(x) + lora(x) + vec_B(vec_A(x)) * s_v,
        "separate": lambda x: apply_secvec_delta(x, base(x), A_v, B_v, s_v, backend=backend,
                                                 inplace=inplace) + lora(x),
        "combined": lambda x: apply_secvec_lora_delta(x, base(x), A_v, B_v, s_v, A_l, B_l, s_l,
                                                      backend=backend, inplace=inplace),
    }
    return fns, [W, A_v, B_v, A_l, B_l]


def step(fn, x, dy, params, cuda):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(x)
    if y.requires_grad:  # --delta-only's base is a constant
        y.backward(dy)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    x.grad = None
    for p in params:
        p.grad = None
    return elapsed


def bench_one(model, layer, K, N, M, args, device):
    dtype, cuda = DTYPES[args.dtype], device.type == "cuda"
    fns, params = make_variants(K, N, args.rank, args.lora_rank, args.alpha / args.rank,
                                args.lora_alpha / args.lora_rank, dtype, device, args.backend, not args.no_inplace,
                                M, args.delta_only)
    ptrs = {p.data_ptr() for p in params}
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    for _ in range(args.warmup):
        for name in VARIANTS:
            step(fns[name], x, dy, params, cuda)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so drift in clock or load hits all alike
        for name in VARIANTS:
            times[name].append(step(fns[name], x, dy, params, cuda))
    row = {"model": model, "layer": layer, "K": K, "N": N, "tokens": M, "rank": args.rank,
           "lora_rank": args.lora_rank, "floor_pct": 100.0 * args.rank * (K + N) / (K * N)}
    for name in VARIANTS:
        row[f"{name}_median_ms"] = 1e3 * statistics.median(times[name])
        row[f"{name}_min_ms"] = 1e3 * min(times[name])
        row[f"{name}_ms"] = row[f"{name}_{args.stat}_ms"]
        row[f"{name}_saved_mib"] = saved_bytes(fns[name], x, ptrs) / 2**20
        row[f"{name}_peak_mib"] = None
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(fns[name], x, dy, params, cuda)
            row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for name in VARIANTS[1:]:
        row[f"{name}_overhead_pct"] = 100.0 * (row[f"{name}_ms"] / row["base_ms"] - 1)
    for name in ("peft2", "separate", "combined"):  # what the vector adds on top of the LoRA step
        row[f"{name}_vector_ms"] = row[f"{name}_ms"] - row["lora_ms"]
        row[f"{name}_vector_pct"] = 100.0 * row[f"{name}_vector_ms"] / row["base_ms"]
    return row


def markdown(rows):
    mib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| model | layer | K->N | tokens | base ms | lora ms (+%) | peft2 ms (+%) | separate ms (+%) "
             "| combined ms (+%) | vector cost ms (% of base): peft2/separate/combined | vector FLOP floor % "
             "| saved MiB " + "/".join(VARIANTS) + " | peak MiB " + "/".join(VARIANTS) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{v}_ms']:.1f} ({r[f'{v}_overhead_pct']:+.1f})" for v in VARIANTS[1:]]
        vec = " / ".join(f"{r[f'{v}_vector_ms']:+.1f} ({r[f'{v}_vector_pct']:+.1f}%)"
                         for v in ("peft2", "separate", "combined"))
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['K']}->{r['N']} | {r['tokens']} | {r['base_ms']:.1f} | "
            + " | ".join(cells) + f" | {vec} | {r['floor_pct']:.2f} "
            f"| {'/'.join(mib(r[f'{v}_saved_mib']) for v in VARIANTS)} "
            f"| {'/'.join(mib(r[f'{v}_peak_mib']) for v in VARIANTS)} |")
    return "\n".join(lines)


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["7b", "13b", "70b"] if cuda else ["7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if cuda else [256, 1024],
                   help="tokens per step (batch x sequence)")
    p.add_argument("--rank", type=int, default=8, help="security vector rank")
    p.add_argument("--alpha", type=float, default=16.0, help="security vector alpha")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    p.add_argument("--no-inplace", action="store_true", help="secvec paths write a fresh output, not into x W^T")
    p.add_argument("--delta-only", action="store_true",
                   help="replace the base matmul by a precomputed output: time only the LoRA + vector work "
                        "(the base's share of the step then reads as ~0; compare the ms columns)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="which statistic of the repeats the table and the overheads use (both go to the JSON); "
                        "min is steadier on a loaded, shared CPU")
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
                print(f"{model} {layer} {K}->{N} M={M}: base {r['base_ms']:.1f} ms, lora {r['lora_ms']:.1f} ms; "
                      f"vector on top of LoRA: peft2 {r['peft2_vector_ms']:+.1f} ms, separate "
                      f"{r['separate_vector_ms']:+.1f} ms, combined {r['combined_vector_ms']:+.1f} ms "
                      f"(floor {r['floor_pct']:.2f}% of base)", flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": args.dtype,
            "secvec_backend": resolve_backend(args.backend, device), "inplace": not args.no_inplace,
            "repeats": args.repeats, "warmup": args.warmup, "rank": args.rank, "alpha": args.alpha,
            "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "delta_only": args.delta_only, "stat": args.stat}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_secvec_lora_delta.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows)
    (args.out / "bench_secvec_lora_delta.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
