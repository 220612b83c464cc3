"""The vector's step-time and memory overhead on a CPU reference setup, via `dist-secvec profile`.

    python benchmarks/bench_profile_overhead.py --steps 40 --out bench_out/overhead          # LoRA
    python benchmarks/bench_profile_overhead.py --steps 40 --full --out bench_out/overhead   # + full FT
    python benchmarks/bench_profile_overhead.py --steps 150 --jobs full --out bench_out/full  # full FT only

The reference setup: a 512-hidden, 4-layer Llama (8 heads of 64, intermediate 1344,
random weights, a word-level vocabulary of `--words` words; nothing is downloaded), a rank-16 LoRA
on every projection, a random rank-8 security vector (the embedded demo's rank) on every
projection, 1024 tokens per optimizer step (micro-batch `--tokens / --seq-len` rows that all fill
`--seq-len` tokens). It writes the model, tokenizer, data, vector and the job's YAML under
`--out/work` (reused on a second run), then runs `dist-secvec profile` on the job in a fresh
process with the overhead variants no_vector and torch (profile.variants): the jobs' steps
interleaved in rounds (profile.round_steps), each variant's peak memory in fresh processes of its
own (profile.memory=process, `--memory-repeats` of them, interleaved, the median kept: a fresh
process's peak RSS varies from run to run).

With a LoRA on an unquantized base the configured job folds the vector into the base weights
(zero per-step cost); the `torch` variant (the vector attached, the combined vector+LoRA torch
path) is the one the target is about: step-time ratio - 1 <= 1.5 x the vector's FLOP share.
`--full` adds the same with full fine-tuning (the vector attached in both the configured job and
the torch variant).

Results: `overhead.json` (per job: the profile's `overhead` section with each variant's memory,
FLOP parts, the exact command) and `overhead.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model_ladder import build_model, write_vector  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prepare(work: Path, args) -> tuple[Path, Path, Path]:
    """The model, data and vector under work (kept: a second run reuses them)."""
    model_dir, vec = work / "model", work / "sv"
    data = work / "train.jsonl"
    if not (vec / "secvec.json").exists():
        n_rows = max(args.tokens // args.seq_len, 1) * (args.steps + args.warmup + 4)
        built = build_model(work, args.hidden, args.layers, args.seq_len, n_rows, args.seed, head_dim=args.head_dim,
                            intermediate=args.intermediate, n_words=args.words)
        write_vector(built["model_dir"], vec, args.sv_rank, args.seed, targets=ALL)
    return model_dir, data, vec


def job_yaml(work: Path, name: str, model_dir: Path, data: Path, vec: Path, adapter: dict, args) -> Path:
    import yaml

    job = {"model": {"path": str(model_dir)},
           "data": {"train": [str(data)], "max_length": args.seq_len, "format": "prompt_response"},
           "adapter": adapter, "security_vector": {"path": str(vec)},
           "optim": {"micro_batch_size": max(args.tokens // args.seq_len, 1), "lr": 1e-4},
           "logging": {"progress": False}, "seed": args.seed}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(cfg_file: Path, out: Path, args) -> tuple[dict, float, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    overrides = ["profile.variants=[no_vector,torch]", f"profile.round_steps={args.round_steps}",
                 f"profile.memory={'process' if args.memory else 'none'}", f"profile.memory_steps={args.memory_steps}",
                 f"profile.memory_repeats={args.memory_repeats}"]
    cmd = [sys.executable, "-m", "dist_secvec", "profile", "--config", str(cfg_file), f"output_dir={out}",
           "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
    shown = f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in env else ""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"profile failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads((out / "profile.json").read_text()), secs, f"{shown}python -m dist_secvec {' '.join(cmd[3:])}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=1344)
    ap.add_argument("--words", type=int, default=1000, help="word-level vocabulary size (+ specials)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--sv-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="measured steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--round-steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the profile (default: torch's)")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-variant memory processes")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per variant (median kept)")
    ap.add_argument("--full", action="store_true", help="also full fine-tuning (adapter none): --jobs lora full")
    ap.add_argument("--jobs", nargs="+", choices=["lora", "full"], default=["lora"],
                    help="which jobs: lora (a LoRA on every projection) and/or full (full fine-tuning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out/overhead"))
    args = ap.parse_args(argv)

    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data, vec = prepare(work, args)
    adapters = {"lora": {"type": "lora", "rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "target_modules": ALL},
                "full": {"type": "none"}}
    names = list(dict.fromkeys(args.jobs + (["full"] if args.full else [])))
    jobs = {n: adapters[n] for n in names}
    rows = {}
    for name, adapter in jobs.items():
        cfg = job_yaml(work, name, model_dir, data, vec, adapter, args)
        p, secs, cmd = run(cfg, out / name, args)
        rows[name] = {"command": cmd, "seconds": round(secs, 1), "device": p["device"], "job": p["job"],
                      "tokens_per_step": p["tokens"]["per_step"], "flops_per_token": p["flops"]["per_token"],
                      "flops_parts": p["flops"]["parts"], "overhead": p["overhead"]}
        print(f"{name}: {secs:.0f} s, " + ", ".join(
            f"{v} {r['ratio']:.3f} (target <= {r['target_ratio']:.3f})" for v, r in p["overhead"]["variants"].items()
            if r.get("within_target") is not None), flush=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out / "overhead.json").write_text(json.dumps({"setup": setup, "jobs": rows}, indent=2) + "\n")
    lines = [f"{args.hidden}-hidden {args.layers}-layer Llama, LoRA r={args.lora_rank} / vector r={args.sv_rank} on "
             f"every projection, {args.tokens} tokens/step ({args.tokens // args.seq_len} x {args.seq_len}), "
             f"{args.steps} steps per variant", "",
             "| job | variant | vector | step ms median [p25, p75] | ratio vs no_vector [p25, p75] | FLOP share | "
             "target ratio | within | peak RSS vs no_vector | within 2% |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, fmt="{:.3f}": "n/a" if x is None else fmt.format(x)  # noqa: E731
    for name, row in rows.items():
        for v, r in row["overhead"]["variants"].items():
            if r.get("skipped"):
                lines.append(f"| {name} | {v} | - | skipped: {r['skipped']} | | | | | | |")
                continue
            t, m = r["step_time"], r["memory"] or {}
            lines.append(f"| {name} | {v} | {r['mode']} | {1000 * t['median']:.1f} [{1000 * t['p25']:.1f}, "
                         f"{1000 * t['p75']:.1f}] | {f(r['ratio'])} [{f(r.get('ratio_p25'))}, "
                         f"{f(r.get('ratio_p75'))}] | {f(r['flop_share'], '{:.2%}')} | {f(r['target_ratio'])} | "
                         f"{'-' if r['within_target'] is None else r['within_target']} | "
                         f"{f(m.get('ratio'), '{:.4f}')} | "
                         f"{'-' if m.get('within_2pct') is None else m['within_2pct']} |")
    lines += [""] + [f"{name}: `{row['command']}` ({row['seconds']} s, {row['device']})" for name, row in rows.items()]
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
