"""Two security vectors against one on the same layers, on CPU: what the second one costs.

Two vectors on one layer are composed into one delta (secvec.compose: A stacked, B concatenated,
rank r1 + r2, one kernel call). Two parts:

layers  forward + backward of one Llama linear layer (x requires grad, W frozen) per layer shape
        (--models, the shapes of benchmarks/_timing.py) and tokens per step (--tokens):
          base      y = x W^T
          one       y = x W^T + s (x A1^T) B1^T                          rank r1
          two       the two vectors composed, one delta of rank r1 + r2  (what stage 2 runs)
          separate  two deltas one after the other                       (what composing avoids)
step    a stage-2 training step (setup_stage2 + train_step: full fine-tuning, the gate off, the
        paths the trainer picks) of a random 512-hidden, 4-layer Llama with no vector, one vector
        on every projection and two vectors on the same projections, the jobs' steps interleaved
        (written under --out/work, reused by a second run).

The goal: the second vector's added time, the median over rounds of two / one - 1 (each round
times every variant once, so load drift cancels), within 1.5x its added FLOP share: per
layer 4 r2 (K + N) over the one-vector step's 4 K N + 4 r1 (K + N) (forward and input gradient);
for the step, the hand count of profile.flops_per_token with two vectors over that with one.

    python benchmarks/bench_two_vectors.py --threads 1 --out bench_out/two_vectors
    python benchmarks/bench_two_vectors.py --parts step --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import DTYPES, LAYERS, interleaved, md_table, timed, write_outputs  # noqa: E402

from dist_secvec.kernels.dispatch import apply_secvec_delta  # noqa: E402
from dist_secvec.secvec import SecurityVector, compose_vectors  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def in_memory_vector(name: str, K: int, N: int, r: int, seed: int) -> SecurityVector:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) * 0.02
    return SecurityVector(path=name, rank=r, alpha=2.0 * r, target_modules=["layer"], weights={"layer": (A, B)})


def bench_layer(model: str, layer: str, K: int, N: int, M: int, args) -> dict:
    dtype = DTYPES[args.dtype]
    W = torch.randn(N, K, dtype=dtype) / K**0.5
    v1, v2 = in_memory_vector("one", K, N, args.rank, 1), in_memory_vector("two", K, N, args.rank2, 2)
    both = compose_vectors([v1, v2])
    (A1, B1), (A2, B2), (A, B) = (tuple(t.to(dtype) for t in v.weights["layer"]) for v in (v1, v2, both))
    s1, s2, s = v1.scale, v2.scale, both.scale
    fns = {
        "base": lambda x: F.linear(x, W),
        "one": lambda x: apply_secvec_delta(x, F.linear(x, W), A1, B1, s1, "torch", inplace=True),
        "two": lambda x: apply_secvec_delta(x, F.linear(x, W), A, B, s, "torch", inplace=True),
        "separate": lambda x: apply_secvec_delta(
            x, apply_secvec_delta(x, F.linear(x, W), A1, B1, s1, "torch", inplace=True), A2, B2, s2, "torch",
            inplace=True),
    }
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, dtype=dtype)

    def step(fn) -> float:
        t = timed(lambda: fn(x).backward(dy), False)
        x.grad = None
        return t

    times = interleaved({k: (lambda f=f: step(f)) for k, f in fns.items()}, args.warmup, args.repeats)
    flops_one = 4 * K * N + 4 * args.rank * (K + N)
    row = {"model": model, "layer": layer, "K": K, "N": N, "tokens": M,
           "added_flop_pct": 100.0 * 4 * args.rank2 * (K + N) / flops_one}
    return with_goal(row, times)


def with_goal(row: dict, times: dict[str, list[float]]) -> dict:
    """Median and min ms per variant; the added time of two (and separate) over one as the median of
    the per-round ratios (`_pct`: rounds are adjacent in time, so load drift cancels) and by the
    min (`_min_pct`); whether the per-round one is within 1.5x the added FLOP share."""
    for stat, f in (("", statistics.median), ("min_", min)):
        row.update({f"{k}_{stat}ms": 1e3 * f(v) for k, v in times.items()})
    for k in ("two", "separate"):
        if k in times:
            row[f"{k}_added_pct"] = 100.0 * (statistics.median(a / b for a, b in zip(times[k], times["one"])) - 1)
            row[f"{k}_added_min_pct"] = 100.0 * (min(times[k]) / min(times["one"]) - 1)
    row["goal_pct"] = 1.5 * row["added_flop_pct"]
    row["within"] = row["two_added_pct"] <= row["goal_pct"]
    return row


def bench_step(args, work: Path) -> dict:
    """Stage-2 steps of the reference model with no, one and two vectors, interleaved."""
    from bench_model_ladder import build_model, write_vector

    from dist_secvec.config import load_config
    from dist_secvec.profile.flops import flops_per_token
    from dist_secvec.stage2 import setup_stage2, train_step

    mb = max(args.step_tokens // args.seq_len, 1)
    if not (work / "sv2" / "secvec.json").exists():
        build_model(work, 512, 4, args.seq_len, mb * (args.steps + args.warmup + 2), 0, head_dim=64,
                    intermediate=1344)
        write_vector(work / "model", work / "sv1", args.rank, 1, targets=ALL)
        write_vector(work / "model", work / "sv2", args.rank2, 2, targets=ALL)
    paths = {"none": "null", "one": str(work / "sv1"), "two": f"[{work / 'sv1'},{work / 'sv2'}]"}
    jobs = {}
    for name, path in paths.items():
        cfg = load_config(None, [f"model.path={work / 'model'}", f"data.train={work / 'train.jsonl'}",
                                 f"output_dir={work / name}", f"security_vector.path={path}", "logging.progress=false",
                                 f"optim.micro_batch_size={mb}", f"data.max_length={args.seq_len}", "optim.lr=1e-5",
                                 "security_vector.gate=false", "seed=0"])
        job = setup_stage2(cfg)
        jobs[name] = (job, job.batches(), [0])

    def one_step(name: str) -> float:
        job, it, n = jobs[name]
        n[0] += 1
        return timed(lambda: train_step(job, it, n[0]), False)

    times = interleaved({k: (lambda k=k: one_step(k)) for k in jobs}, args.warmup, args.steps)
    flops = {k: flops_per_token(j.model, args.seq_len, j.sv_layers, j.folded)[0] for k, (j, _, _) in jobs.items()}
    row = {"tokens": mb * args.seq_len, "paths": {k: j.path_choice for k, (j, _, _) in jobs.items()},
           "one_flop_pct": 100.0 * (flops["one"] / flops["none"] - 1),
           "added_flop_pct": 100.0 * (flops["two"] / flops["one"] - 1)}
    return with_goal(row, times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=["layers", "step"], default=["layers", "step"])
    p.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["ref512"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1024], help="layers: tokens per step")
    p.add_argument("--rank", type=int, default=8, help="the first vector's rank")
    p.add_argument("--rank2", type=int, default=8, help="the second vector's rank")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="step: timed steps per job")
    p.add_argument("--step-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_out/two_vectors"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data: dict = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
                           "rank": args.rank, "rank2": args.rank2, "repeats": args.repeats, "warmup": args.warmup,
                           "argv": sys.argv[1:]}}
    md = []
    pct = lambda v: f"{v:+.1f}%"  # noqa: E731
    if "layers" in args.parts:
        data["layers"] = []
        for model in args.models:
            for layer, K, N in LAYERS[model]:
                for M in args.tokens:
                    data["layers"].append(r := bench_layer(model, layer, K, N, M, args))
                    print(f"{model} {layer} {K}->{N} M={M}: two/one {pct(r['two_added_pct'])} "
                          f"(goal {pct(r['goal_pct'])}), separate/one {pct(r['separate_added_pct'])}", flush=True)
        md.append(md_table(["model", "layer", "K->N", "tokens", "base ms", "one ms", "two ms", "separate ms",
                            "two vs one per round (min)", "separate vs one per round (min)", "added FLOP",
                            "goal (1.5x)", "within"],
                           [[r["model"], r["layer"], f"{r['K']}->{r['N']}", str(r["tokens"]), f"{r['base_ms']:.2f}",
                             f"{r['one_ms']:.2f}", f"{r['two_ms']:.2f}", f"{r['separate_ms']:.2f}",
                             f"{pct(r['two_added_pct'])} ({pct(r['two_added_min_pct'])})",
                             f"{pct(r['separate_added_pct'])} ({pct(r['separate_added_min_pct'])})",
                             f"{r['added_flop_pct']:.2f}%", f"{r['goal_pct']:.2f}%", "yes" if r["within"] else "no"]
                            for r in data["layers"]]))
    if "step" in args.parts:
        r = data["step"] = bench_step(args, args.out / "work")
        md.append(md_table(["tokens", "none ms", "one ms", "two ms", "one vs none (FLOP)", "two vs one per round (min)",
                            "added FLOP", "goal (1.5x)", "within", "paths (one; two)"],
                           [[str(r["tokens"]), f"{r['none_ms']:.1f}", f"{r['one_ms']:.1f}", f"{r['two_ms']:.1f}",
                             f"{pct(100 * (r['one_ms'] / r['none_ms'] - 1))} ({r['one_flop_pct']:.2f}%)",
                             f"{pct(r['two_added_pct'])} ({pct(r['two_added_min_pct'])})",
                             f"{r['added_flop_pct']:.2f}%", f"{r['goal_pct']:.2f}%",
                             "yes" if r["within"] else "no", f"{r['paths']['one']}; {r['paths']['two']}"]]))
    write_outputs(args.out, "two_vectors", data, "\n\n".join(md))


if __name__ == "__main__":
    main()
