"""Step time of the stage-2 job against transformers' Trainer on the same full fine-tuning job, on CPU.

Both train the same random Llama (built here, nothing downloaded: `--hidden` x `--layers`, head_dim
64, a word-level vocabulary of `--words` words; ~13M parameters by default) on the same rows
(`--seq-len` tokens each: a short prompt, the loss on the response), float32, full fine-tuning,
no security vector, AdamW with the same lr, schedule, warm-up, clipping and seed:

ours    the job as `dist-secvec finetune` builds it (stage2.setup_stage2 from the config keys) and
        its step, stage2.train_step (collate, forward, backward, clip + non-finite check, update).
theirs  transformers.Trainer with matching TrainingArguments and its defaults otherwise (its
        default optimizer included, no eval, no saving, report_to none, progress bar off), fed
        the same micro-batches in the same order: a sequential DataLoader over the batches ours
        draws, collated by transformers' DataCollatorForSeq2Seq (checked equal to ours).

Trainer.train() runs in a thread that a callback pauses at the end of every `--per-round` steps,
so the two jobs interleave: `--warmup` untimed steps each, then `--rounds` rounds in which each
job runs `--per-round` steps in turn, the order swapped every round. A step of theirs is the time
from the end of its previous step to its on_step_end (data, forward, backward, clip, update,
schedule, its logging check); of ours, the train_step call. The ratio is the median over rounds of
(ours' time in the round) / (theirs'). The per-step losses must agree to `--tolerance` (relative).

    OMP_NUM_THREADS=2 python benchmarks/bench_trainer.py --threads 2 --rounds 20 --per-round 2 --out bench_out/trainer
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import md_table, write_outputs  # noqa: E402
from bench_model_ladder import build_model  # noqa: E402

from dist_secvec.data import IGNORE_INDEX  # noqa: E402
from dist_secvec.profile.measure import spread  # noqa: E402


def build_ours(args, work: Path, steps: int):
    """stage 2's job as finetune builds it, from config keys."""
    from dist_secvec.config import load_config
    from dist_secvec.stage2 import setup_stage2

    cfg = load_config(None, [f"model.path={work / 'model'}", f"data.train={work / 'train.jsonl'}",
                             f"output_dir={work / 'ours'}", "model.dtype=float32", "adapter.type=none",
                             "security_vector.path=null", "logging.progress=false", f"seed={args.seed}",
                             f"data.max_length={args.seq_len}", f"optim.micro_batch_size={args.micro_batch}",
                             f"optim.lr={args.lr}", f"optim.schedule={args.schedule}",
                             f"optim.warmup_steps={args.lr_warmup}", f"optim.max_steps={steps}",
                             f"optim.max_grad_norm={args.max_grad_norm}"])
    job = setup_stage2(cfg)
    job.model.train()  # as finetune's loop does
    return job


class Pacer:
    """Runs Trainer.train() in a thread, `n` steps at a time: its on_step_end blocks until the main
    thread asks for more; records each step's seconds and the loss training_step returned."""

    def __init__(self, threads: int):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.left, self.threads = 0, threads
        self.times: list[float] = []
        self.losses: list[float] = []
        self.error: BaseException | None = None
        self.t0 = 0.0
        self.thread: threading.Thread | None = None

    def callback(self):
        from transformers import TrainerCallback

        pacer = self

        class Paced(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                torch.set_num_threads(pacer.threads)  # this thread's OpenMP pool too
                pacer.go.acquire()
                pacer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                pacer.times.append(time.perf_counter() - pacer.t0)
                pacer.left -= 1
                if pacer.left == 0:
                    pacer.done.release()
                    pacer.go.acquire()
                pacer.t0 = time.perf_counter()

        return Paced()

    def start(self, trainer) -> None:
        def run():
            try:
                trainer.train()
            except BaseException as e:  # handed to the main thread
                self.error = e
            finally:
                self.done.release()

        self.thread = threading.Thread(target=run, name="trainer", daemon=True)
        self.thread.start()

    def steps(self, n: int) -> None:
        """Let the Trainer run n more steps; returns when they are done."""
        self.left = n
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.left = -1  # never reaches 0 again: the Trainer runs to its end
        self.go.release()
        self.thread.join()
        if self.error is not None:
            raise self.error


def build_theirs(args, work: Path, tok, fixed: list[list[dict]], pacer: Pacer):
    """transformers.Trainer over the same model files, fed `fixed` micro-batches in order."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def collate(items: list) -> dict:  # batch_size 1 over micro-batches: items == [one micro-batch's rows]
        return collator([{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]),
                          "labels": e["labels"]} for e in items[0]])

    class FixedBatches(Trainer):
        def get_train_dataloader(self):
            # what Trainer's own does (accelerator.prepare of a DataLoader), over the fixed batches in order
            return self.accelerator.prepare(DataLoader(fixed, batch_size=1, shuffle=False, collate_fn=collate,
                                                       num_workers=0))

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            pacer.losses.append(float(loss))
            return loss

    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32, use_safetensors=True)
    targs = TrainingArguments(output_dir=str(work / "theirs"), per_device_train_batch_size=args.micro_batch,
                              max_steps=len(fixed), learning_rate=args.lr, lr_scheduler_type=args.schedule,
                              warmup_steps=args.lr_warmup, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                              max_grad_norm=args.max_grad_norm, seed=args.seed, eval_strategy="no",
                              save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                              use_cpu=True)
    trainer = FixedBatches(model=model, args=targs, train_dataset=fixed, processing_class=tok,
                           callbacks=[pacer.callback()])
    return trainer, collate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=20000, help="word-level vocabulary (+ specials)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (data.max_length)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--lr-warmup", type=int, default=2, help="the schedule's warm-up steps")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each job before the rounds")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=4, help="steps of each job per round")
    p.add_argument("--loss-steps", type=int, default=None, help="steps whose losses are compared (default all)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference allowed")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--work", type=Path, default=None, help="where the model and rows go (default a temp dir)")
    p.add_argument("--out", type=Path, default=Path("bench_out/trainer"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    steps = args.warmup + args.rounds * args.per_round
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        built = build_model(work, args.hidden, args.layers, args.seq_len, args.micro_batch * steps, args.seed,
                            head_dim=64, n_words=args.words)
        job = build_ours(args, work, steps)
        from dist_secvec.stage2 import train_step

        fixed = list(itertools.islice(job.batches(), steps))  # ours' micro-batches, in its order
        pacer = Pacer(args.threads)
        trainer, collate = build_theirs(args, work, job.tok, fixed, pacer)
        for i, rows in enumerate(fixed):  # the same tensors reach both models
            a, b = job.build_batch(rows)[0], collate([rows])
            if any(not torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels")):
                raise SystemExit(f"micro-batch {i}: transformers' collator and ours disagree")
        micro = job.batches()
        ours_times: list[float] = []
        ours_losses: list[float] = []
        ours_norms: list = []

        def ours_steps(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                res = train_step(job, micro, len(ours_losses) + 1)
                out.append(time.perf_counter() - t0)
                ours_losses.append(res.loss)
                ours_norms.append(res.grad_norm)
            return out

        def theirs_steps(n: int) -> list[float]:
            pacer.steps(n)
            return pacer.times[-n:]

        run = {"ours": ours_steps, "theirs": theirs_steps}
        pacer.start(trainer)
        for name in run:
            run[name](args.warmup)
        rounds = []
        for r in range(args.rounds):
            order = list(run) if r % 2 == 0 else list(run)[::-1]
            rounds.append({name: run[name](args.per_round) for name in order})
            ours_times += rounds[-1]["ours"]
            print(f"round {r + 1}/{args.rounds}: ours {1e3 * statistics.mean(rounds[-1]['ours']):.0f} ms, "
                  f"theirs {1e3 * statistics.mean(rounds[-1]['theirs']):.0f} ms", flush=True)
        pacer.finish()
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        theirs_opt = f"{type(opt).__name__} fused={opt.defaults.get('fused')} foreach={opt.defaults.get('foreach')}"
        ours_opt = (f"{type(job.optimizer).__name__} fused={job.optimizer.defaults.get('fused')} "
                    f"foreach={job.optimizer.defaults.get('foreach')}")

    theirs_times = [t for rd in rounds for t in rd["theirs"]]
    ratios = [sum(rd["ours"]) / sum(rd["theirs"]) for rd in rounds]
    n_loss = min(args.loss_steps or steps, len(ours_losses), len(pacer.losses))
    rel = [abs(a - b) / abs(b) for a, b in zip(ours_losses[:n_loss], pacer.losses[:n_loss])]
    worst = max(range(n_loss), key=lambda i: rel[i])
    agree = rel[worst] <= args.tolerance
    tokens = args.micro_batch * args.seq_len
    res = {"ours": spread(ours_times), "theirs": spread(theirs_times)}  # seconds
    data = {"args": {k: str(v) for k, v in vars(args).items()},
            "meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "params": built["n_params"], "tokens_per_step": tokens,
                     "ours_optimizer": ours_opt, "theirs_optimizer": theirs_opt, "argv": sys.argv[1:]},
            "result": res, "ratio_per_round_median": statistics.median(ratios), "ratios_per_round": ratios,
            "ratio_of_medians": res["ours"]["median"] / res["theirs"]["median"],
            "max_rel_loss_diff": rel[worst], "max_rel_loss_diff_step": worst + 1, "loss_steps": n_loss,
            "losses_agree": agree, "ours_losses": ours_losses, "theirs_losses": pacer.losses,
            "ours_grad_norms": ours_norms, "ours_step_s": ours_times, "theirs_step_s": theirs_times}
    table = [[name, f"{1e3 * r['median']:.1f} [{1e3 * r['p25']:.1f}, {1e3 * r['p75']:.1f}]", f"{1e3 * r['min']:.1f}",
              f"{tokens / r['median']:.0f}", opt]
             for (name, r), opt in zip(res.items(), (ours_opt, theirs_opt))]
    md = (md_table(["job", "step ms median [p25, p75]", "min ms", "tokens/s", "optimizer"], table)
          + f"\n\nours / theirs: {data['ratio_per_round_median']:.3f} (median of {len(ratios)} per-round ratios; "
          f"ratio of medians {data['ratio_of_medians']:.3f}); {built['n_params'] / 1e6:.2f}M parameters, "
          f"{tokens} tokens per step, {data['meta']['threads']} threads; largest relative loss difference over "
          f"the first {n_loss} steps {rel[worst]:.1e} (step {worst + 1}: ours {ours_losses[worst]:.6f}, theirs "
          f"{pacer.losses[worst]:.6f}){'' if agree else f' -- ABOVE the tolerance {args.tolerance:g}'}")
    write_outputs(args.out, "bench_trainer", data, md)
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
