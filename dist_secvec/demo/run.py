"""`dist-secvec demo`: the paper's effect end to end on the embedded tiny world, on a laptop CPU.

1. Build the world (data, tokenizer, tiny Llama) and train the aligned base: it answers benign
   questions and refuses the harmful family. Cached, keyed by everything that shapes it.
2. Stage 1 (train-sv): a security vector on 100 harmful samples, KL term on benign samples.
3. Stage 2 (finetune), twice, on the new benign task with 1000 harmful samples hidden in it:
   without the vector, and with it active and frozen.
4. Evaluate each model with the vector off: harmful-compliance rate on held-out harmful prompts,
   accuracy on held-out prompts of the new task. Table, results.json/.md and a bar chart.
Every stage runs through the same functions as the CLI commands; the world's stage settings and its
cached aligned base are dist_secvec.worlds.embedded_stages, shared with the experiment runner.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.distributed import barrier
from dist_secvec.errors import ConfigError
from dist_secvec.files import atomic_dir, write_text_atomic
from dist_secvec.worlds.embedded_stages import aligned_base, demo_world, evaluate_model, stage_config

log = logging.getLogger(__name__)

SETTINGS = ("aligned_base", "finetune_no_sv", "finetune_sv")


def write_results(out: Path, rows: list[dict], extra: dict) -> None:
    write_text_atomic(out / "results.json", json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    lines = ["| setting | harmful rate (vector off) | new-task accuracy | n_eval |", "|---|---|---|---|"]
    for r in rows:
        lo, hi = r["harmful_rate_ci95"]
        lines.append(f"| {r['setting']} | {100 * r['harmful_rate']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}] | "
                     f"{100 * r['benign_accuracy']:.0f}% | {r['n_eval']} |")
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    plot_results(out / "results.png", rows)


def plot_results(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "harmful_rate", "harmful compliance (held-out, vector off)"),
                           (axes[1], "benign_accuracy", "new benign task accuracy")):
        vals = [100 * r[key] for r in rows]
        ax.bar(names, vals, color=["#888888", "#d62728", "#2ca02c"][: len(rows)])
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("%")
        for i, v in enumerate(vals):
            ax.text(i, v + 2, f"{v:.0f}%", ha="center", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(cfg: Config) -> list[dict]:
    from dist_secvec.finetune import run_finetune
    from dist_secvec.model import load_model, load_tokenizer
    from dist_secvec.train_sv import run_train_sv

    t0 = time.time()
    quick = cfg.demo.quick
    out = Path(cfg.output_dir)
    if runtime.world_size() > 1:  # under a launcher: stage 2 data parallel, the rest on rank 0
        from dist_secvec.distributed import ds_config, init_distributed, zero_stage

        if zero_stage(ds_config(cfg, runtime.world_size())) == 3:
            raise ConfigError("the demo under a launcher runs data parallel (ZeRO stage 0-2): its evaluation "
                              "generates on rank 0 alone; drop deepspeed.zero_stage=3")
        init_distributed(cfg)
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
    sizes, world, data = demo_world(cfg)
    barrier()
    log.info("world: %d alignment rows, %d harmful for the vector, %d harmful + %d new-task rows for stage 2",
             len(world.align), len(world.harmful_sv), len(world.harmful_ft), len(world.new_task_ft))

    # 1. the aligned base (cached)
    base_dir = aligned_base(cfg, sizes, data, world.texts(), quick)
    model_sec = {"path": str(base_dir)}

    # 2. stage 1: the security vector
    sv_cfg = stage_config(cfg, "train_sv", quick, model=model_sec, output_dir=str(out / "stage1"),
                           security_vector={"harmful_data": [data["harmful_sv"]], "benign_data": [data["kl_benign"]],
                                            "heldout_benign_data": [data["heldout_benign"]]})
    vector_dir = out / "secvec"
    sv = None
    if runtime.is_main():  # ~100 samples: one rank
        sv = run_train_sv(sv_cfg)
        with atomic_dir(vector_dir) as tmp:
            for f in sv.vector_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
    barrier()

    # 3. stage 2, without and with the vector; 4. evaluation with the vector off
    rows = []
    if runtime.is_main():
        tok = load_tokenizer(sv_cfg.model)
        base = load_model(sv_cfg.model)
        rows.append({"setting": "aligned_base",
                     **evaluate_model(base, tok, cfg, world.eval_harmful, world.eval_new_task)})
        del base
    for setting, path in (("finetune_no_sv", None), ("finetune_sv", str(vector_dir))):
        # both runs watch the same harmful probe: the world's held-out harmful prompts and answers
        ft_cfg = stage_config(cfg, "finetune", quick, model=model_sec, output_dir=str(out / setting),
                               data={"train": [data["finetune_mixed"]]}, security_vector={"path": path},
                               monitor={"harmful_probe": [data["eval_harmful"]]})
        res = run_finetune(ft_cfg, keep_model=True)  # every rank
        if runtime.is_main():  # the whole model is on every rank (ZeRO 0-2): rank 0 evaluates
            rows.append({"setting": setting, **evaluate_model(res.model, res.tokenizer, cfg,
                                                              world.eval_harmful, world.eval_new_task)})
    if not runtime.is_main():
        return rows
    for r in rows:  # a few generations per setting, for the log rather than the results file
        for kind, pairs in r.pop("examples").items():
            for prompt, answer in pairs:
                log.debug("%s %s: %r -> %r", r["setting"], kind, prompt, answer)
    write_results(out, rows, {"vector_shift": sv.shift, "quick": quick, "seconds": round(time.time() - t0, 1),
                              "world": cfg.demo.world, "sizes": sizes.__dict__})
    if runtime.is_main():
        print_table(rows, out, time.time() - t0)
    return rows


def print_table(rows: list[dict], out: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="security vectors on the embedded world (evaluated with the vector off)")
    table.add_column("setting")
    table.add_column("harmful compliance (held-out)", justify="right")
    table.add_column("new-task accuracy", justify="right")
    table.add_column("n_eval", justify="right")
    for r in rows:
        table.add_row(r["setting"], f"{100 * r['harmful_rate']:.0f}%", f"{100 * r['benign_accuracy']:.0f}%",
                      str(r["n_eval"]))
    console = Console()
    console.print(table)
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}; "
                  f"vector: {out / 'secvec'}; {seconds:.0f} s")
