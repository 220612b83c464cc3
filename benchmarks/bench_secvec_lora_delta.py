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

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (DTYPES, layer_arg_parser, layer_sweep, md_table, run_meta, time_layer_variants,  # noqa: E402
                     timed, write_outputs)

from dist_secvec.kernels.dispatch import apply_secvec_delta, apply_secvec_lora_delta, resolve_backend  # noqa: E402

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
    def run():
        y = fn(x)
        if y.requires_grad:  # --delta-only's base is a constant
            y.backward(dy)

    elapsed = timed(run, cuda)
    x.grad = None
    for p in params:
        p.grad = None
    return elapsed


def bench_one(model, layer, K, N, M, args, device):
    dtype, cuda = DTYPES[args.dtype], device.type == "cuda"
    fns, params = make_variants(K, N, args.rank, args.lora_rank, args.alpha / args.rank,
                                args.lora_alpha / args.lora_rank, dtype, device, args.backend, not args.no_inplace,
                                M, args.delta_only)
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    row = {"model": model, "layer": layer, "K": K, "N": N, "tokens": M, "rank": args.rank,
           "lora_rank": args.lora_rank, "floor_pct": 100.0 * args.rank * (K + N) / (K * N)}
    row.update(time_layer_variants(fns, lambda f, x, dy: step(f, x, dy, params, cuda), x, dy,
                                   {p.data_ptr() for p in params}, args, device, stat=args.stat))
    for name in VARIANTS[1:]:
        row[f"{name}_overhead_pct"] = 100.0 * (row[f"{name}_ms"] / row["base_ms"] - 1)
    for name in ("peft2", "separate", "combined"):  # what the vector adds on top of the LoRA step
        row[f"{name}_vector_ms"] = row[f"{name}_ms"] - row["lora_ms"]
        row[f"{name}_vector_pct"] = 100.0 * row[f"{name}_vector_ms"] / row["base_ms"]
    return row


def markdown(rows):
    mib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    header = (["model", "layer", "K->N", "tokens", "base ms"] + [f"{v} ms (+%)" for v in VARIANTS[1:]]
              + ["vector cost ms (% of base): peft2/separate/combined", "vector FLOP floor %",
                 "saved MiB " + "/".join(VARIANTS), "peak MiB " + "/".join(VARIANTS)])
    return md_table(header, [
        [r["model"], r["layer"], f"{r['K']}->{r['N']}", str(r["tokens"]), f"{r['base_ms']:.1f}"]
        + [f"{r[f'{v}_ms']:.1f} ({r[f'{v}_overhead_pct']:+.1f})" for v in VARIANTS[1:]]
        + [" / ".join(f"{r[f'{v}_vector_ms']:+.1f} ({r[f'{v}_vector_pct']:+.1f}%)" for v in ("peft2", "separate", "combined")),
           f"{r['floor_pct']:.2f}", "/".join(mib(r[f"{v}_saved_mib"]) for v in VARIANTS),
           "/".join(mib(r[f"{v}_peak_mib"]) for v in VARIANTS)]
        for r in rows])


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = layer_arg_parser(__doc__.split("\n\n")[0], cuda)
    p.add_argument("--rank", type=int, default=8, help="security vector rank")
    p.add_argument("--alpha", type=float, default=16.0, help="security vector alpha")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--delta-only", action="store_true",
                   help="replace the base matmul by a precomputed output: time only the LoRA + vector work "
                        "(the base's share of the step then reads as ~0; compare the ms columns)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="which statistic of the repeats the table and the overheads use (both go to the JSON); "
                        "min is steadier on a loaded, shared CPU")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    rows = layer_sweep(args, lambda *shape: bench_one(*shape, args, device),
                       lambda r: (f"base {r['base_ms']:.1f} ms, lora {r['lora_ms']:.1f} ms; vector on top of LoRA: "
                                  f"peft2 {r['peft2_vector_ms']:+.1f} ms, separate {r['separate_vector_ms']:+.1f} ms, "
                                  f"combined {r['combined_vector_ms']:+.1f} ms (floor {r['floor_pct']:.2f}% of base)"))
    meta = run_meta(args, device, resolve_backend, rank=args.rank, alpha=args.alpha, lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, delta_only=args.delta_only, stat=args.stat)
    write_outputs(args.out, "bench_secvec_lora_delta", {"meta": meta, "rows": rows},
                  f"{json.dumps(meta)}\n\n{markdown(rows)}")


if __name__ == "__main__":
    main()
