"""Compile the Triton kernels for a GPU without one: registers, spills and shared memory per launch.

`triton.compile` runs the whole CUDA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, the
cubin by the ptxas that ships in the triton wheel) for a `GPUTarget`, with no driver and no device.
So on a CPU-only machine we can still check that every launch configuration the host code picks
(kernels/host.py: rank padding, block sizes, dot precision, warps) compiles for A100 (sm_80) and
H100/H200 (sm_90), and read ptxas' report of that compile
how many registers a thread uses and whether ptxas had to spill tiles to local memory: a spill
turns the on-chip rank-r intermediate into memory traffic, which the fused design exists to avoid.

Used by tests/test_kernel_compile.py and benchmarks/bench_kernel_resources.py. This says nothing
about speed; the benchmarks on a lent GPU do.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import asdict, dataclass

import torch
import triton

from dist_secvec.kernels import host

ARCHS = {"sm_80": 80, "sm_90": 90}  # A100; H100/H200
TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Launch:
    """One launch configuration of a kernel, as the host code would pick it on CUDA."""
    kernel: str  # secvec_delta | secvec_lora_delta
    dtype: str
    M: int
    K: int
    N: int
    ranks: tuple  # (r,) or (r_vector, r_lora)
    constexprs: dict
    num_warps: int
    num_stages: int = 3  # triton's default, what the host code launches with


@dataclass
class Resources:
    arch: str
    registers: int
    spill_bytes: int  # local memory per thread (ptxas' spill stores land there)
    stack_bytes: int
    shared_bytes: int


def launch(kernel: str, dtype: torch.dtype, M: int, K: int, N: int, ranks: tuple,
           has_base: bool = True, precision: str = "highest") -> Launch:
    """The constexprs and warps `lowrank_update` / `two_lowrank_update` pass on a CUDA tensor of
    this shape and dtype (interpreted=False), with torch's float32 matmul precision `precision`."""
    dot_fp32, prec = host.dot_config(dtype, interpreted=False, matmul_precision=precision)
    pads = tuple(host.pad_rank(r) for r in ranks)
    block_m, block_k, block_n, warps = host.blocks(M, K, N, pads, interpreted=False, dot_fp32=dot_fp32)
    names = ("R_PAD",) if kernel == "secvec_delta" else ("RV_PAD", "RL_PAD")
    if len(names) != len(pads):
        raise ValueError(f"{kernel} takes {len(names)} rank(s), got {ranks}")
    const = {"HAS_BASE": has_base, "DOT_FP32": dot_fp32, "PRECISION": prec,
             "BLOCK_M": block_m, "BLOCK_K": block_k, "BLOCK_N": block_n, **dict(zip(names, pads))}
    return Launch(kernel, TL_TYPES[dtype], M, K, N, tuple(ranks), const, warps)


def _jit_function(kernel: str):
    if kernel == "secvec_delta":
        from dist_secvec.kernels.secvec_delta import _lowrank_update_kernel as fn
    elif kernel == "secvec_lora_delta":
        from dist_secvec.kernels.secvec_lora_delta import _two_lowrank_update_kernel as fn
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if host.is_interpreted(fn):
        raise RuntimeError("kernels/aot.py compiles for a GPU: import it without TRITON_INTERPRET=1")
    return fn


def compile_launch(ln: Launch, arch: str = "sm_90"):
    """The compiled kernel (triton's CompiledKernel: .asm has ttir, ttgir, llir, ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(ln.kernel)
    sig, const = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ln.constexprs:
            sig[name] = "constexpr"
            const[(i,)] = ln.constexprs[name]
        elif name.isupper() and len(name) <= 5 and name not in ("M", "K", "N", "R", "RV", "RL"):
            sig[name] = "*" + ln.dtype  # a tensor pointer (INP, P, Q, PV, ..., BASE, OUT)
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # sizes and strides
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32), options={"num_warps": ln.num_warps,
                                                                                  "num_stages": ln.num_stages})


def resources(ln: Launch, arch: str = "sm_90") -> Resources:
    """Compile `ln` for `arch` and read ptxas' own report of that compile (`-v`, which triton passes;
    TRITON_DUMP_PTXAS_LOG prints it): registers per thread, spill stores, stack frame."""
    from triton import knobs

    buf = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            compiled = compile_launch(ln, arch)
    log = buf.getvalue()
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not regs:
        raise RuntimeError(f"no ptxas report for {ln.kernel} ({arch}):\n{log}")
    return Resources(arch, int(regs.group(1)), int(spill.group(1)) if spill else 0,
                     int(stack.group(1)) if stack else 0, compiled.metadata.shared)


def report_row(ln: Launch, res: Resources) -> dict:
    return {**asdict(ln), **asdict(res)}


#: max shared memory per block (opt-in) by arch, bytes
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}
#: (K, N) of the adapted projections of Llama-7B (q/k/v/o, gate/up, down); M only picks BLOCK_M
SHAPES_7B = ((4096, 4096), (4096, 11008), (11008, 4096))
#: vector ranks alone, and (vector, LoRA) rank pairs of the combined kernel
RANKS = ((1,), (8,), (16,), (32,), (64,), (128,))
RANK_PAIRS = ((8, 16), (16, 64), (64, 64), (128, 128))


def launches(dtypes=(torch.bfloat16, torch.float16, torch.float32), M: int = 4096, shapes=SHAPES_7B,
             ranks=RANKS, pairs=RANK_PAIRS, bases=(True, False)) -> list[Launch]:
    """Every distinct launch the host code makes for these shapes and ranks, forward and backward
    (backward swaps K and N), with and without a base to add into."""
    seen, out = set(), []
    for dtype, (K, N), has_base in ((d, s, b) for d in dtypes for s in shapes for b in bases):
        for kernel, rs in [("secvec_delta", r) for r in ranks] + [("secvec_lora_delta", p) for p in pairs]:
            for k, n in ((K, N), (N, K)):
                ln = launch(kernel, dtype, M, k, n, rs, has_base=has_base)
                # the rank itself is a runtime argument: one compile per padded rank
                key = (ln.kernel, ln.dtype, tuple(sorted(ln.constexprs.items())), ln.num_warps)
                if key not in seen:
                    seen.add(key)
                    out.append(ln)
    return out


def main(argv=None) -> int:
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m dist_secvec.kernels.aot",
                                 description="Compile every launch the host code picks for Llama-7B shapes "
                                             "for sm_80/sm_90 (no GPU needed) and report registers, spills, shared memory.")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(TL_TYPES.values()))
    ap.add_argument("--bases", choices=["with", "without", "both"], default="both",
                    help="launches that add into a base output (forward, dx), write a fresh one, or both")
    ap.add_argument("--out", type=Path, help="write resources.json and resources.md here")
    args = ap.parse_args(argv)
    dtypes = [d for d, name in TL_TYPES.items() if name in args.dtypes]
    rows = []
    bases = {"with": (True,), "without": (False,), "both": (True, False)}[args.bases]
    for ln in launches(dtypes, bases=bases):
        for arch in args.archs:
            row = report_row(ln, resources(ln, arch))
            row["shared_ok"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
            rows.append(row)
            c = ln.constexprs
            print(f"{ln.kernel:18s} {ln.dtype:5s} r={'/'.join(map(str, ln.ranks)):8s} {arch} "
                  f"blocks {c['BLOCK_M']}x{c['BLOCK_K']}x{c['BLOCK_N']} warps {ln.num_warps} base {int(c['HAS_BASE'])}: "
                  f"{row['registers']} regs, {row['spill_bytes']} B spilled, {row['shared_bytes']} B shared", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "resources.json").write_text(json.dumps(rows, indent=1) + "\n")
        lines = ["| kernel | dtype | ranks | arch | BLOCK_M x K x N | warps | base | registers | spill B | shared B |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["constexprs"]
            lines.append(f"| {r['kernel']} | {r['dtype']} | {'/'.join(map(str, r['ranks']))} | {r['arch']} | "
                         f"{c['BLOCK_M']}x{c['BLOCK_K']}x{c['BLOCK_N']} | {r['num_warps']} | {int(c['HAS_BASE'])} | "
                         f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} |")
        (args.out / "resources.md").write_text("\n".join(lines) + "\n")
    spilled = sum(r["spill_bytes"] > 0 for r in rows)
    print(f"{len(rows)} launches compiled; {spilled} spill registers; "
          f"{sum(not r['shared_ok'] for r in rows)} over the shared-memory limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
