"""Training tokens/s with data.packing off (every row padded to its micro-batch's longest) and on
(each micro-batch's rows packed into sequences of up to max_length tokens, dist_secvec.packing).

A random Llama (no download) trains full fine-tuning steps (forward, backward, AdamW) on rows of
mixed lengths, drawn uniformly between --min-length and --max-length, the loss on the second half
of each row. Both variants get the same micro-batches from the same model state, interleaved
round by round (drift in clock or load hits both alike), and their losses must agree. tokens/s
counts the rows' own tokens, padding not included (as finetune's tokens_per_s).

    python benchmarks/bench_packing.py --hidden 256 --layers 4 --max-length 512 --rounds 6 --out /tmp/bench_packing
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, md_table, write_outputs  # noqa: E402

from dist_secvec.data import IGNORE_INDEX  # noqa: E402
from dist_secvec.packing import build_batch  # noqa: E402


def model(hidden: int, layers: int, vocab: int, attn: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                      num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=4096,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).train()


def rows(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--min-length", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    base = model(args.hidden, args.layers, args.vocab, args.attn, args.seed)
    variants = {"padding": False, "packing": True}
    models = {name: copy.deepcopy(base) for name in variants}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    batches = [rows(args.micro_batch, args.min_length, args.max_length, args.vocab, args.seed + i)
               for i in range(args.warmup + args.rounds)]
    done = {name: 0 for name in variants}
    losses: dict = {name: [] for name in variants}
    shapes: dict = {name: [] for name in variants}

    def step(name: str):
        def run() -> float:
            examples = batches[done[name]]
            done[name] += 1
            batch, _ = build_batch(examples, 0, variants[name], args.max_length)
            t0 = time.perf_counter()
            loss = models[name](**batch).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses[name].append(float(loss.detach()))
            shapes[name].append(tuple(batch["input_ids"].shape))
            return dt
        return run

    times = interleaved({name: step(name) for name in variants}, args.warmup, args.rounds)
    tokens = [sum(len(e["input_ids"]) for e in b) for b in batches[args.warmup:]]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["packing"], losses["padding"]))
    if diff > 1e-3:
        raise SystemExit(f"the losses of packing and padding differ by {diff:.2e} (relative)")
    result, table = {}, []
    for name in variants:
        tps = [n / t for n, t in zip(tokens, times[name])]
        positions = [r * c for r, c in shapes[name][args.warmup:]]
        result[name] = {"tokens_per_s": statistics.median(tps), "step_s": statistics.median(times[name]),
                        "positions_per_step": statistics.mean(positions), "rows_per_step":
                        statistics.mean(r for r, _ in shapes[name][args.warmup:])}
        table.append([name, f"{result[name]['tokens_per_s']:.0f}", f"{result[name]['step_s'] * 1000:.0f}",
                      f"{result[name]['rows_per_step']:.1f}", f"{result[name]['positions_per_step']:.0f}"])
    speedup = result["packing"]["tokens_per_s"] / result["padding"]["tokens_per_s"]
    md = (md_table(["variant", "tokens/s (median)", "step ms", "rows per micro-batch", "positions per step"], table)
          + f"\n\npacking / padding: {speedup:.2f}x tokens/s; {statistics.mean(tokens):.0f} real tokens per "
          f"micro-batch of {args.micro_batch} rows; largest relative loss difference {diff:.1e}")
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "result": result, "speedup": speedup,
            "max_rel_loss_diff": diff}
    if args.out:
        write_outputs(args.out, "bench_packing", data, md)
    else:
        print(md)


if __name__ == "__main__":
    main()
