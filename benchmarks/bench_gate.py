"""Stage 2's per-row gate: grouped micro-batches against gating every row, per training step.

With `security_vector.gate` some rows train with the vector on, the rest with it off. Each step's
rows are grouped by the gate so that most micro-batches have the vector all on (the layers' chosen
path: the weight delta on CPU, the fused vector + LoRA kernel under a LoRA) or all off (no vector
compute), and only a mixed one gates row by row (stage2.micro_gates). The variants, stage-2
training steps of a random Llama (setup_stage2 + train_step), interleaved round by round:

    none      no vector
    rowwise   every micro-batch gated row by row (the delta path on x scaled per row)
    grouped   what stage 2 does
    on        the vector on every row (security_vector.gate=false), for reference

The same rows are gated on in both gated jobs (`--on`: the share of rows, spread at random).

    OMP_NUM_THREADS=1 python benchmarks/bench_gate.py --threads 1 --steps 12 --out /tmp/bench_gate
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, md_table, timed, write_outputs  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def rowwise_gates():
    """Every micro-batch gated row by row, as stage 2 ran before it grouped the rows."""
    from dist_secvec import stage2
    from dist_secvec.secvec import row_gate

    real = stage2.micro_gates
    stage2.micro_gates = lambda job, firsts: [row_gate(job.sv_layers, torch.tensor([job.gate[id(e)] for e in f]))
                                              for f in firsts]
    try:
        yield
    finally:
        stage2.micro_gates = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
    p.add_argument("--on", type=float, default=0.25, help="share of rows that train with the vector on")
    p.add_argument("--adapter", choices=["none", "lora"], default="none", help="full fine-tuning or a LoRA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("bench_out/gate"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_model_ladder import build_model, write_vector

    from dist_secvec.config import load_config
    from dist_secvec.secvec import path_calls
    from dist_secvec.stage2 import setup_stage2, train_step

    work = args.out / "work"
    rows = args.micro_batch * args.accumulation * (args.steps + args.warmup + 2)
    if not (work / "sv" / "secvec.json").exists():
        build_model(work, args.hidden, args.layers, args.seq_len, rows, 0, head_dim=64,
                    intermediate=int(args.hidden * 2.625))
        write_vector(work / "model", work / "sv", 8, 1, targets=ALL)
    adapter = ["adapter.type=lora", "adapter.rank=16", f"adapter.target_modules=[{','.join(ALL)}]"] \
        if args.adapter == "lora" else []
    jobs = {}
    for name in ("none", "rowwise", "grouped", "on"):
        sv = "null" if name == "none" else str(work / "sv")
        cfg = load_config(None, [f"model.path={work / 'model'}", f"data.train={work / 'train.jsonl'}",
                                 f"output_dir={work / name}", f"security_vector.path={sv}", "logging.progress=false",
                                 f"optim.micro_batch_size={args.micro_batch}", f"data.max_length={args.seq_len}",
                                 f"optim.gradient_accumulation_steps={args.accumulation}", "optim.lr=1e-5",
                                 "security_vector.gate=false", "security_vector.fold=false", "seed=0", *adapter])
        job = setup_stage2(cfg)
        if name in ("rowwise", "grouped"):
            pick = random.Random(0)
            job.gate = {id(e): float(pick.random() < args.on) for e in job.train.examples}
        jobs[name] = (job, job.batches(), [0])

    def one_step(name: str) -> float:
        job, it, n = jobs[name]
        n[0] += 1
        with rowwise_gates() if name == "rowwise" else contextlib.nullcontext():
            return timed(lambda: train_step(job, it, n[0]), False)

    times = interleaved({k: (lambda k=k: one_step(k)) for k in jobs}, args.warmup, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(v, times["none"])) for k, v in times.items()}
    calls = {k: path_calls(j.sv_layers) if j.sv_layers else {} for k, (j, _, _) in jobs.items()}
    data = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
                     "tokens_per_step": args.micro_batch * args.accumulation * args.seq_len},
            "median_s": med, "ratio_vs_none": ratio, "path_calls": calls}
    md = md_table(["variant", "step ms (median)", "vs none (median per round)", "vector forwards per path"],
                  [[k, f"{1000 * med[k]:.1f}", f"{ratio[k]:.3f}",
                    ", ".join(f"{p} {c}" for p, c in calls[k].items() if c) or "-"] for k in jobs])
    write_outputs(args.out, "gate", data, md)


if __name__ == "__main__":
    main()
