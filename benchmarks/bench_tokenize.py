"""Tokenization throughput of the training rows: without the cache, in parallel processes, and
from the tokenization cache (what a second run, or another rank, does).

    OMP_NUM_THREADS=1 python benchmarks/bench_tokenize.py --rows 20000 --num-proc 1 2

The rows are synthetic multi-turn chats (two or three user/assistant exchanges, `--turns 1`: one;
a system turn in every other row) tokenized by a byte-level BPE tokenizer trained here on the same text (a
ChatML template, loss on every assistant turn), so nothing comes from a hub. Each variant runs
`data.tokenize_samples` on rows already read by `data.load_samples` (reading is timed apart):

    tokenize (N proc)   cache off, data.num_proc=N: what every run and rank did before the cache
    cache miss          the first run with the cache: tokenize (data.num_proc=1) and save the set
    cache hit           a later run: hash the rows and read the saved set back

The cache lives in a temporary directory (removed afterwards) unless --cache-dir is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the a of to and in is it that for on with as was at by this be from or have an they which one you "
         "were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_rows(n: int, turns: int = 3, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": sentence(rng, 6, 12)}] if i % 2 else []
        for _ in range(rng.randint(min(2, turns), turns)):
            msgs.append({"role": "user", "content": sentence(rng, 8, 30)})
            msgs.append({"role": "assistant", "content": " ".join(sentence(rng, 6, 20) for _ in range(2))})
        rows.append({"messages": msgs})
    return rows


def bpe_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values timed without cache")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--turns", type=int, default=3, help="user/assistant exchanges per row: 2 to N (1: exactly one)")
    ap.add_argument("--cache-dir", help="DIST_SECVEC_CACHE for the run (default: a temporary directory)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    os.environ["DIST_SECVEC_CACHE"] = args.cache_dir or str(tmp / "cache")
    from dist_secvec.config import DataConfig
    from dist_secvec.data import load_samples, tokenize_samples

    try:
        rows = make_rows(args.rows, args.turns)
        path = tmp / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tok = bpe_tokenizer([m["content"] for r in rows[:2000] for m in r["messages"]])
        t0 = time.perf_counter()
        samples = load_samples([str(path)])
        read_s = time.perf_counter() - t0

        results = []

        def timed(name: str, cfg: DataConfig, cache: bool):
            t = time.perf_counter()
            ts = tokenize_samples(tok, samples, cfg, cache=cache)
            s = time.perf_counter() - t
            results.append({"variant": name, "seconds": s, "rows_per_s": len(samples) / s,
                            "examples": len(ts.examples), "tokens": sum(len(e["input_ids"]) for e in ts.examples)})
            return ts

        base = None
        for n in args.num_proc:
            ts = timed(f"tokenize ({n} proc)", DataConfig(max_length=args.max_length, num_proc=n, cache=False), False)
            assert base is None or ts.examples == base.examples, "parallel tokenization changed the rows"
            base = base or ts
        cfg = DataConfig(max_length=args.max_length, num_proc=1)
        miss = timed("cache miss (tokenize + save)", cfg, True)
        hit = timed("cache hit", cfg, True)
        assert miss.cache.startswith("tokenized") and hit.cache.startswith("read from"), (miss.cache, hit.cache)
        assert hit.examples == base.examples, "the cache changed the rows"

        print(f"{len(samples)} rows ({results[0]['tokens']} tokens), read by load_samples in {read_s:.2f} s "
              f"({len(samples) / read_s:.0f} rows/s); cpus available: {len(os.sched_getaffinity(0))}")
        print("| variant | s | rows/s | x vs 1 proc |")
        print("|---|---|---|---|")
        for r in results:
            print(f"| {r['variant']} | {r['seconds']:.2f} | {r['rows_per_s']:.0f} | "
                  f"{r['rows_per_s'] / results[0]['rows_per_s']:.1f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": len(samples), "read_s": read_s, "results": results},
                                                  indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
