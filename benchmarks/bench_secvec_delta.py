"""Cost of a frozen security vector on one Llama linear layer, forward + backward.

For each layer shape and tokens-per-step M, with x (M, K) requiring grad and the base weight W
(N, K) frozen, it times y = f(x); y.backward(dy) for
  base    y = x W^T
  peft    y = x W^T + lora_B(lora_A(dropout(x))) * s     frozen nn.Linear A, B as peft runs them
  secvec  y = apply_secvec_delta(x, x W^T, A, B, s)      torch path on CPU, Triton on CUDA
and, with --trainable-base (full fine-tuning: W gets a gradient in every variant, dW = dy^T x),
  weight_delta  y = apply_secvec_weight_delta(x, W, None, A, B, s) = x (W + s B A)^T   torch path
(the layer and the vector in one Function, forming W + s B A in forward and backward; the trainer
takes it on the torch backend when M (K + N) >= N K), and reports the median time, the overhead
of each variant over base, and beside it the FLOP
floor of the delta:  delta / base = 4 r (K + N) / 4 K N = r (K + N) / (K N)  (forward 2r(K+N)
and dx 2r(K+N) per token, against 2KN + 2KN for the frozen base matmul). Memory: the bytes the
autograd graph saves for backward (saved_tensors_hooks, parameters excluded, each storage once)
and, on CUDA, the peak allocated during the step above what was allocated before it.

    python benchmarks/bench_secvec_delta.py --models 7b --tokens 256 1024 --out bench_out
    python benchmarks/bench_secvec_delta.py --trainable-base --tokens 1024 4096 --out bench_out/full
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (DTYPES, layer_arg_parser, layer_sweep, md_table, run_meta,  # noqa: E402
                     time_layer_variants, timed, write_outputs)

from dist_secvec.kernels.dispatch import (apply_secvec_delta, apply_secvec_weight_delta,  # noqa: E402
                                          resolve_backend)


def make_variants(K, N, r, alpha, dtype, device, backend, inplace, lora_dropout, trainable=False):
    W = (torch.randn(N, K, dtype=dtype, device=device) / K**0.5).requires_grad_(trainable)
    lora_A = nn.Linear(K, r, bias=False).to(device, dtype).requires_grad_(False)
    lora_B = nn.Linear(r, N, bias=False).to(device, dtype).requires_grad_(False)
    nn.init.normal_(lora_B.weight, std=0.02)  # peft starts B at zero; a trained vector is not
    # peft uses Identity for lora_dropout = 0; a positive one also saves an M x K mask per layer.
    dropout, s = (nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()), alpha / r
    A, B = lora_A.weight, lora_B.weight
    fns = {
        "base": lambda x: F.linear(x, W),
        "peft": lambda x: F.linear(x, W) + lora_B(lora_A(dropout(x))) * s,
        "secvec": lambda x: apply_secvec_delta(x, F.linear(x, W), A, B, s, backend=backend, inplace=inplace),
    }
    if trainable:
        fns["weight_delta"] = lambda x: apply_secvec_weight_delta(x, W, None, A, B, s)
    return fns, {W.data_ptr(), A.data_ptr(), B.data_ptr()}, W


def step(fn, x, dy, cuda, W):
    t = timed(lambda: fn(x).backward(dy), cuda)
    x.grad = W.grad = None
    return t


def bench_one(model, layer, K, N, M, args, device):
    dtype, cuda = DTYPES[args.dtype], device.type == "cuda"
    fns, params, W = make_variants(K, N, args.rank, args.alpha, dtype, device, args.backend, not args.no_inplace,
                                   args.lora_dropout, args.trainable_base)
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    row = {"model": model, "layer": layer, "K": K, "N": N, "tokens": M, "rank": args.rank,
           "floor_pct": 100.0 * args.rank * (K + N) / (K * N)}
    row.update(time_layer_variants(fns, lambda f, x, dy: step(f, x, dy, cuda, W), x, dy, params, args, device))
    for name in list(fns)[1:]:
        row[f"{name}_overhead_pct"] = 100.0 * (row[f"{name}_ms"] / row["base_ms"] - 1)
    return row


def markdown(rows, variants):
    mib = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    names = "/".join(variants)
    return md_table(
        ["model", "layer", "K->N", "tokens", "base ms", *(f"{v} ms (+%)" for v in variants[1:]), "FLOP floor %",
         f"saved MiB {names}", f"peak MiB {names}"],
        [[r["model"], r["layer"], f"{r['K']}->{r['N']}", str(r["tokens"]), f"{r['base_ms']:.1f}",
          *(f"{r[f'{v}_ms']:.1f} ({r[f'{v}_overhead_pct']:+.1f})" for v in variants[1:]), f"{r['floor_pct']:.2f}",
          "/".join(mib(r[f"{v}_saved_mib"]) for v in variants), "/".join(mib(r[f"{v}_peak_mib"]) for v in variants)]
         for r in rows])


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = layer_arg_parser(__doc__.split("\n\n")[0], cuda)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="peft variant's lora_dropout")
    p.add_argument("--trainable-base", action="store_true",
                   help="full fine-tuning: W trainable in every variant, plus the weight_delta variant")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    variants = ["base", "peft", "secvec"] + (["weight_delta"] if args.trainable_base else [])
    rows = layer_sweep(args, lambda *shape: bench_one(*shape, args, device),
                       lambda r: f"base {r['base_ms']:.1f} ms, " + ", ".join(
                           f"{v} {r[f'{v}_overhead_pct']:+.1f}%" for v in variants[1:]) + f", floor {r['floor_pct']:.2f}%")
    meta = run_meta(args, device, resolve_backend, lora_dropout=args.lora_dropout, rank=args.rank, alpha=args.alpha,
                    trainable_base=args.trainable_base)
    write_outputs(args.out, "bench_secvec_delta", {"meta": meta, "rows": rows},
                  f"{json.dumps(meta)}\n\n{markdown(rows, variants)}")


if __name__ == "__main__":
    main()
