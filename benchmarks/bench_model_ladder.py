"""How step time and memory of the stage-2 job grow with model size, tokens per step and ranks.

    python benchmarks/bench_model_ladder.py --out bench_out/ladder                     # CPU, small ladder
    python benchmarks/bench_model_ladder.py --sizes 64x2 128x4 256x4 --tokens 256 1024 --ranks 1 2 \\
        --out bench_out/ladder                                                          # + ZeRO-3 on 2 ranks

For each model size (`HIDDENxLAYERS`: a Llama config with head_dim 32 and an intermediate size of
2.75 x hidden, random weights written as safetensors into a temporary directory; nothing is
downloaded) it writes a word-level tokenizer, a synthetic prompt/response set whose rows all fill
`--seq-len` tokens, and a random frozen security vector (rank `--sv-rank` on q_proj and v_proj),
then runs `dist-secvec profile` on the stage-2 job for every tokens-per-step value (per rank:
micro-batch = tokens / seq-len) and every rank count:

- 1 rank: `python -m dist_secvec profile` in a fresh process (plain torch, or ZeRO-`--zero-stage`
  on one rank with `--zero-one-rank`);
- N > 1 ranks: `launch/deepspeed.sh --gpus N [--cpu] -- profile ...` with ZeRO-`--zero-stage`
  (stage3_param_persistence_threshold `--persistence-threshold`, 0 by default so that even these
  tiny parameters are partitioned).

Each run is a separate process (clean peak-RSS / CUDA peak). On CPU every process runs with
OMP_NUM_THREADS=`--threads` (1 by default, as the launcher's CPU ranks do), so 1- and N-rank
points compare ranks, not thread counts. Results: `ladder.json` (one row per
run, with the run's profile.json figures), `ladder.md`, `ladder_step_time.png` and
`ladder_memory.png` (step time / peak memory and parameter bytes per rank vs parameter count).
The overhead variants of `dist-secvec profile` (vector off / torch / Triton, `profile.variants`)
are skipped unless `--variants` names them (they triple the time of each run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: '{text}' is not HIDDENxLAYERS (e.g. 128x4)")
    if h % 32:
        raise SystemExit(f"--sizes: hidden {h} is not a multiple of 32 (head_dim 32)")
    return h, n


def build_model(root: Path, hidden: int, layers: int, seq_len: int, n_rows: int, seed: int, head_dim: int = 32,
                intermediate: int | None = None, n_words: int = 1000) -> dict:
    """Tokenizer + random Llama (safetensors) + synthetic data under root (intermediate size
    2.75 x hidden unless given; a word-level vocabulary of n_words words + specials)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_secvec.worlds.embedded import build_tokenizer

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer([" ".join(words)], model_dir)
    torch.manual_seed(seed)
    inter = intermediate or int(2.75 * hidden) // 8 * 8
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // head_dim, num_key_value_heads=hidden // head_dim,
                      max_position_embeddings=max(seq_len, 128), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    # rows longer than seq_len: every row is cut to seq_len tokens (prompt short, response long)
    data = root / "train.jsonl"
    with data.open("w") as f:
        for _ in range(n_rows):
            f.write(json.dumps({"prompt": " ".join(rng.choices(words, k=8)),
                                "response": " ".join(rng.choices(words, k=seq_len + 16))}) + "\n")
    return {"model_dir": model_dir, "data": data, "n_params": n_params}


def write_vector(model_dir: Path, out: Path, rank: int, seed: int, targets=("q_proj", "v_proj")) -> Path:
    """A random security vector in the stage-1 format (peft adapter + secvec.json), nonzero A and B,
    on the `targets` projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_secvec.secvec import base_fingerprint, record_file_hashes

    torch.manual_seed(seed)
    targets = list(targets)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, target_modules=targets,
                                         bias="none"))
    modules = []
    with torch.no_grad():
        for name, m in pm.base_model.model.named_modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.normal_(0, 0.02)
                modules.append(name)
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out), safe_serialization=True)
    meta = {"base_fingerprint": base_fingerprint(pm, str(model_dir), sorted(modules)), "rank": rank,
            "alpha": 2.0 * rank, "target_modules": targets, "n_samples": 0}
    (out / "secvec.json").write_text(json.dumps(meta, indent=2) + "\n")
    record_file_hashes(out)
    return out


def run_profile(job: dict, out: Path, ranks: int, args) -> tuple[dict, float, str]:
    """One `dist-secvec profile` run in its own process(es); returns profile.json, seconds, command."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    zero = ranks > 1 or args.zero_one_rank
    if zero:
        zcfg = {"stage": args.zero_stage}
        if args.zero_stage == 3:
            zcfg["stage3_param_persistence_threshold"] = args.persistence_threshold
        job = {**job, "deepspeed": {"config": {"zero_optimization": zcfg}}}
    cfg_file = out / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(job))
    from dist_secvec.distributed import free_port

    prof_args = ["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", str(args.steps),
                 "--warmup", str(args.warmup), f"profile.variants=[{','.join(args.variants)}]"]
    env = dict(os.environ)
    if args.threads:  # every CPU rank (and the 1-rank process) gets the same thread count
        env["OMP_NUM_THREADS"] = str(args.threads)
    # DeepSpeed's JIT-built ops (the CPU shm comm op): one cache shared with the test suite
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dist-secvec-torch-ext"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if zero:
        env.setdefault("DEEPSPEED", str(Path(sys.executable).with_name("deepspeed")))
        cmd = [str(ROOT / "launch" / "deepspeed.sh"), "--gpus", str(ranks), "--master-port", str(free_port())]
        cmd += (["--cpu"] if args.cpu else []) + ["--"] + prof_args
    else:
        cmd = [sys.executable, "-m", "dist_secvec"] + prof_args
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    secs = time.time() - t0
    (out / "stdout.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}; see {out / 'stdout.log'}:\n{r.stderr[-2000:]}")
    return json.loads((out / "profile.json").read_text()), secs, " ".join(cmd)


def row_of(p: dict, size: tuple[int, int], n_params: int, tokens: int, ranks: int, secs: float, cmd: str) -> dict:
    """One ladder row from a run's profile.json (dist_secvec.profile.report's schema)."""
    st, mem, fl, tok = p["step_time"], p["memory"], p["flops"], p["tokens"]
    per_rank = mem["per_rank"]
    return {"hidden": size[0], "layers": size[1], "n_params": n_params, "tokens_per_step_per_rank": tokens,
            "ranks": ranks, "zero_stage": p["zero_stage"], "step_time_s": st["median"],
            "step_time_p25": st["p25"], "step_time_p75": st["p75"], "step_time_s_per_rank": st["per_rank"],
            "phases_median_s": {k: v["median"] for k, v in p["phases"].items()},
            "comm_time_s": None if p["comm"] is None else p["comm"]["median"], "tokens_per_s": tok["per_s"]["nonpad"],
            "tokens_per_s_per_rank": tok["per_s_per_rank"]["nonpad"], "flops_per_token": fl["per_token"],
            "secvec_flop_share": fl["parts"]["secvec_delta"] / fl["per_token"],
            "peak_memory_kind": mem["peak"]["kind"], "peak_memory_bytes": mem["peak"]["bytes"],
            "param_bytes_per_rank": per_rank["param_bytes"], "param_bytes_whole": mem["param_bytes_whole"],
            "param_memory_ratio": mem["param_memory_ratio"], "grad_bytes_per_rank": per_rank["grad_bytes"],
            "optimizer_state_bytes_per_rank": per_rank["optimizer_state_bytes"],
            "secvec_grad_bytes": p["secvec"]["grad_bytes"], "secvec_optimizer_bytes": p["secvec"]["optimizer_bytes"],
            "overhead": p["overhead"]["variants"], "device": p["device"], "wall_s": round(secs, 1),
            "command": cmd}


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    (out / "ladder.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    mib = 2 ** 20
    lines = [f"# stage-2 profile ladder ({rows[0]['device'] if rows else '-'})", "",
             f"command: `{meta['command']}`", "",
             "| hidden x layers | params | tokens/step/rank | ranks | ZeRO | step ms (median) | tokens/s | "
             "comm ms | peak MiB per rank | params MiB per rank (whole) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        comm = "n/a" if r["comm_time_s"] is None else f"{1000 * r['comm_time_s']:.1f}"
        lines.append(
            f"| {r['hidden']}x{r['layers']} | {r['n_params'] / 1e6:.2f}M | {r['tokens_per_step_per_rank']} | "
            f"{r['ranks']} | {r['zero_stage'] if r['zero_stage'] is not None else '-'} | "
            f"{1000 * r['step_time_s']:.1f} | {r['tokens_per_s']:.0f} | {comm} | "
            f"{', '.join(f'{b / mib:.0f}' for b in r['peak_memory_bytes'])} | "
            f"{', '.join(f'{b / mib:.2f}' for b in r['param_bytes_per_rank'])} ({r['param_bytes_whole'] / mib:.2f}) | "
            f"{r['param_memory_ratio']:.3f} |")
    (out / "ladder.md").write_text("\n".join(lines) + "\n")
    plot(out, rows)


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    xs = sorted({r["n_params"] / 1e6 for r in rows})

    def log_axes(ax):  # ticks at the ladder's sizes; 1-2-5 steps on the y axis
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
            axis.set_minor_formatter(NullFormatter())

    series: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        series.setdefault((r["tokens_per_step_per_rank"], r["ranks"]), []).append(r)
    styles = ["-o", "--s", ":^", "-.d"]
    rank_counts = sorted({r["ranks"] for r in rows})

    def label(tokens, ranks):
        z = next(r["zero_stage"] for r in series[(tokens, ranks)])
        return f"{tokens} tok/step/rank, {ranks} rank(s)" + ("" if z is None else f", ZeRO-{z}")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (tokens, ranks), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["n_params"])
        ax.plot([r["n_params"] / 1e6 for r in rs], [1000 * r["step_time_s"] for r in rs],
                styles[rank_counts.index(ranks) % len(styles)], label=label(tokens, ranks))
    log_axes(ax)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("median step time (ms)")
    ax.set_title("step time vs model size", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "ladder_step_time.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (tokens, ranks), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["n_params"])
        x = [r["n_params"] / 1e6 for r in rs]
        st = styles[rank_counts.index(ranks) % len(styles)]
        axes[0].plot(x, [max(r["peak_memory_bytes"]) / 2 ** 20 for r in rs], st, label=label(tokens, ranks))
    done = set()
    for (tokens, ranks), rs in sorted(series.items()):
        if ranks in done:  # parameter bytes do not depend on tokens per step
            continue
        done.add(ranks)
        rs = sorted(rs, key=lambda r: r["n_params"])
        x = [r["n_params"] / 1e6 for r in rs]
        st = styles[rank_counts.index(ranks) % len(styles)]
        axes[1].plot(x, [max(r["param_bytes_per_rank"]) / 2 ** 20 for r in rs], st,
                     label=f"{ranks} rank(s): parameters held per rank")
        axes[1].plot(x, [(max(r["param_bytes_per_rank"]) + max(r["grad_bytes_per_rank"])
                          + max(r["optimizer_state_bytes_per_rank"])) / 2 ** 20 for r in rs], st, alpha=0.5,
                     label=f"{ranks} rank(s): + grads + optimizer state")
    for ax, title in ((axes[0], f"peak memory per rank ({rows[0]['peak_memory_kind']}, max over ranks)"),
                      (axes[1], "model state per rank (measured tensors)")):
        log_axes(ax)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "ladder_memory.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["64x2", "128x4", "256x4"], help="HIDDENxLAYERS, e.g. 512x4")
    ap.add_argument("--tokens", nargs="+", type=int, default=[256, 1024],
                    help="tokens per optimizer step per rank (micro-batch = tokens / seq-len)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1], help="rank counts; > 1 runs under ZeRO")
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--zero-one-rank", action="store_true", help="run the 1-rank points under ZeRO too")
    ap.add_argument("--persistence-threshold", type=int, default=0,
                    help="ZeRO-3 stage3_param_persistence_threshold (0: partition every parameter)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--adapter", choices=["none", "lora"], default="none", help="full fine-tuning or a LoRA")
    ap.add_argument("--sv-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=[], help="overhead variants: no_vector torch triton")
    ap.add_argument("--cpu", action="store_true", help="CPU ranks even where a GPU is seen (launch --cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of every process (default: 1 on a machine without CUDA, where the "
                         "launcher gives each CPU rank 1 thread; unset on GPU machines)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary models and run directories")
    ap.add_argument("--out", default="bench_out/ladder")
    ap.add_argument("--replot", action="store_true", help="redraw the plots and table from --out/ladder.json")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads((Path(args.out) / "ladder.json").read_text())
        write_outputs(Path(args.out), data["rows"], data["meta"])
        return 0
    for t in args.tokens:
        if t % args.seq_len:
            raise SystemExit(f"--tokens {t} is not a multiple of --seq-len {args.seq_len}")
    sizes = [parse_size(s) for s in args.sizes]
    if args.threads is None:
        import torch

        args.threads = None if torch.cuda.is_available() and not args.cpu else 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ladder-"))
    meta = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "args": vars(args), "tmp": str(tmp)}
    rows = []
    try:
        for size in sizes:
            h, n = size
            mdir = tmp / f"h{h}_l{n}"
            built = build_model(mdir, h, n, args.seq_len, n_rows=max(args.tokens) // args.seq_len * 8 * max(args.ranks),
                                seed=args.seed)
            vec = write_vector(built["model_dir"], mdir / "sv", args.sv_rank, args.seed)
            for tokens in args.tokens:
                for ranks in args.ranks:
                    job = {"model": {"path": str(built["model_dir"])},
                           "data": {"train": [str(built["data"])], "max_length": args.seq_len},
                           "adapter": ({"type": "none"} if args.adapter == "none"
                                       else {"type": "lora", "rank": 16, "alpha": 32.0}),
                           "security_vector": {"path": str(vec)},
                           "optim": {"micro_batch_size": tokens // args.seq_len, "lr": 1e-4},
                           "logging": {"progress": False, "level": "warning"}, "seed": args.seed}
                    run_dir = tmp / "runs" / f"h{h}_l{n}_t{tokens}_r{ranks}"
                    p, secs, cmd = run_profile(job, run_dir, ranks, args)
                    rows.append(row_of(p, size, built["n_params"], tokens, ranks, secs, cmd))
                    r = rows[-1]
                    print(f"{h}x{n} ({built['n_params'] / 1e6:.2f}M) tokens/step/rank {tokens} ranks {ranks}: "
                          f"step {1000 * r['step_time_s']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, peak "
                          f"{max(r['peak_memory_bytes']) / 2 ** 20:.0f} MiB, params/rank "
                          f"{r['param_memory_ratio']:.3f} of whole ({secs:.0f} s)", flush=True)
                    write_outputs(out, rows, meta)  # partial results survive an interrupted ladder
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out / 'ladder.json'}, {out / 'ladder.md'}, {out / 'ladder_step_time.png'}, "
          f"{out / 'ladder_memory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
