"""Stage 2, `dist-secvec finetune`: supervised fine-tuning, with the security vector active and frozen.

The recipe: load the base, add the trainable part (every weight, or a LoRA on a 4-bit base),
attach the vector from `security_vector.path` (if any) as frozen SecVecLinear layers, train on
`data.train` with the loss on response tokens, and save the result with the vector removed.
Nothing of the vector is ever trained: it has requires_grad False, is left out of the optimizer,
and its digest is checked before the first step, at every checkpoint and after the last. By default
it acts only on the rows it explains (`security_vector.gate`). With the gate off and a LoRA on a
frozen unquantized base the vector is instead folded into the base weights once (no per-step
cost) and the original weights are restored bit for bit before saving (`security_vector.fold`;
under ZeRO-3 layer by layer, restored from the base's safetensors).

The job itself (setup and one optimizer step) is dist_secvec.stage2's, shared with `profile`;
here: the loop, checkpoints and resume (dist_secvec.checkpoint), the monitor, the train log and
the final save. One loop for one process (`PlainEngine`) and for DeepSpeed on any number of ranks
(`DeepSpeedEngine`, see dist_secvec.distributed); SIGTERM/SIGINT stop after a checkpoint
(dist_secvec.interrupt); NaN/inf stop or skip (on every rank alike under DeepSpeed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dist_secvec import runtime
from dist_secvec.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dist_secvec.config import Config, save_config
from dist_secvec.distributed import all_reduce_sum, barrier, gathered, is_partitioned
from dist_secvec.errors import SecurityVectorError, Stopped
from dist_secvec.files import atomic_dir, write_text_atomic
from dist_secvec.interrupt import StopRequest
from dist_secvec.manifest import write_manifest
from dist_secvec.model import attn_implementation
from dist_secvec.secvec import fold_weight, security_vector_off, unfold_from_disk, unfold_security_vector
from dist_secvec.stage2 import remove_vector, setup_stage2, train_step
from dist_secvec.strength import HarmProbe
from dist_secvec.tracking import RunLog

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    final_dir: Path
    losses: list[float]  # one per optimizer step (token mean over its micro-batches)
    model: Any = None  # the trained model, vector removed
    tokenizer: Any = None
    info: dict = field(default_factory=dict)


def run_finetune(cfg: Config, keep_model: bool = False) -> FinetuneResult:
    """Stage 2. SIGTERM/SIGINT: while loading, stop at once (nothing trained since the last
    checkpoint); while training, after the step with a checkpoint; while finishing, after the
    atomic save of final/ (dist_secvec.interrupt). Each ends in `Stopped` (exit 0)."""
    with StopRequest() as stop:
        res = _run_finetune(cfg, keep_model, stop)
        if stop.signal_name is not None:
            raise Stopped(f"{stop.signal_name} received while finishing: the run is complete, {res.final_dir} "
                          "was saved first (nothing to resume)")
        return res


def _run_finetune(cfg: Config, keep_model: bool, stop: StopRequest) -> FinetuneResult:
    # ---- setup (dist_secvec.stage2): processes, tokenizer, data, model, trainable part, frozen vector,
    # engine, gate, and the monitor's rows
    job = setup_stage2(cfg, monitor=True)
    cfg, model, engine, tok = job.cfg, job.model, job.engine, job.tok
    sv_layers, folded, stage, steps, digest = job.sv_layers, job.folded, job.stage, job.steps, job.digest
    out = Path(cfg.output_dir)
    ga = cfg.optim.gradient_accumulation_steps
    pad_id, device = job.pad_id, job.device

    # ---- resume: the same run shape and the same vector, or a one-line refusal
    run_shape = {"world_size": job.world, "micro_batch_size": cfg.optim.micro_batch_size,
                 "gradient_accumulation_steps": ga, "zero_stage": stage, "seed": cfg.seed,
                 "vector_digest": digest, "total_steps": steps}
    resume_from = resolve_resume(cfg.checkpoint.resume, out)
    start, losses = 0, []
    monitor = HarmProbe(job.probe, job.evalset, pad_id, device, cfg.eval.batch_size, cfg.monitor.max_drop) \
        if (job.probe or job.evalset) else None
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, run_shape)
        start, losses = int(state["step"]), list(state["losses"])
        if monitor is not None:
            monitor.start = state.get("probe_start")
        if job.vector_digest() != digest:
            raise SecurityVectorError("the security vector changed while loading the checkpoint; refusing to train")
    elif cfg.checkpoint.resume == "latest":
        log.info("checkpoint.resume=latest: no checkpoint in %s yet, starting at step 0", out / "checkpoints")
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)  # only now: bad data or a bad vector leave nothing behind
        save_config(cfg, out / "config.yaml")
    log_path = out / "train_log.jsonl"
    if runtime.is_main():
        truncate_train_log(log_path, start)

    def checkpoint(step: int) -> None:
        if job.vector_digest() != digest:  # stage-2 invariant at every checkpoint
            raise SecurityVectorError(f"the security vector changed during stage 2 (step {step}); refusing to "
                                      "checkpoint a run that is not safe to use")
        save_checkpoint(engine, out, step, dict(run_shape, losses=losses,
                                                probe_start=monitor.start if monitor else None), cfg.checkpoint.keep)

    every_check = cfg.monitor.every_steps or max(1, steps // 10)
    warned = []

    def watch(step: int) -> None:
        """The vector-off probe and the eval loss (collective); the rule on the probe's fall."""
        off = lambda: vector_off(model, sv_layers, folded, stage, cfg.model.path)  # noqa: E731
        rec = {"step": step, **monitor.check(model, off, bool(sv_layers or folded))}
        if cfg.monitor.generate and probe_samples:
            rec["probe_harmful_rate"] = _probe_generate(model, tok, probe_samples, cfg, off)
        if runtime.is_main():
            runlog.write(rec, "watch")
            log.info("step %d/%d watch (vector off): %s", step, steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step"))
        if not monitor.fired(rec):
            return
        why = (f"the core is learning the harmful behaviour: the harmful probe's loss with the vector off fell "
               f"{100 * rec['probe_drop']:.0f}% since step 0 (monitor.max_drop {100 * cfg.monitor.max_drop:.0f}%)")
        if cfg.monitor.rule == "stop":
            checkpoint(step)
            raise Stopped(f"stopped at step {step} of {steps}: {why}; checkpoint saved. Check the data for harmful "
                          "rows, use a stronger vector, or lower optim.lr / optim.epochs")
        if not warned:
            warned.append(step)
            log.warning("step %d: %s; the run goes on (monitor.rule=warn; monitor.rule=stop ends it)", step, why)

    probe_samples = job.probe_rows[: cfg.monitor.max_rows] if job.probe_rows else []

    # ---- the training loop: every optimizer step averages over all label tokens of the global
    # batch (all ranks, all micro-batches), so ranks x micro-batch x accumulation == one large batch
    model.train()
    micro_batches = job.batches(skip=start * ga)
    bar = runtime.progress(total=steps, initial=start, desc="finetune", enabled=cfg.logging.progress,
                           unit="steps")
    every = cfg.checkpoint.every_steps
    t0 = time.time()
    step = start
    window = {"tokens": 0.0, "s": 0.0}  # this rank's non-pad input tokens and train-step seconds since the last record
    with stop.training(), RunLog(log_path, cfg, start, enabled=runtime.is_main()) as runlog:
        if monitor is not None and start == 0:
            watch(0)
        for step in range(start + 1, steps + 1):
            t_step = time.perf_counter()
            res = train_step(job, micro_batches, step)
            window["s"] += time.perf_counter() - t_step
            window["tokens"] += res.n_inputs
            if res.skipped:
                log.warning("step %d: non-finite loss or gradient; step skipped (optim.nonfinite=skip)", step)
                losses.append(float("nan"))
                bar.update(1)
            else:
                losses.append(res.loss)
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}")
                if step % cfg.logging.log_every == 0 or step == steps:
                    # every rank: the global batch's input tokens (a collective under DeepSpeed)
                    seen = all_reduce_sum([window["tokens"]])[0]
                    tps = round(seen / window["s"], 1) if window["s"] > 0 else None
                    window = {"tokens": 0.0, "s": 0.0}
                    if runtime.is_main():
                        rec = {"step": step, "loss": res.loss, "lr": engine.lr(), "grad_norm": res.grad_norm,
                               "tokens": int(res.n_tokens), "tokens_per_s": tps,
                               "elapsed_s": round(time.time() - t0, 2)}
                        runlog.write(rec, "train")
                        log.info("step %d/%d loss %.4f lr %.3g", step, steps, res.loss, rec["lr"])
            if monitor is not None and (step % every_check == 0 or step == steps):
                watch(step)
            if (every and (step % every == 0 or step == steps)) or stop.requested(step):
                checkpoint(step)
            if stop.requested(step) and step < steps:
                bar.close()
                log.warning("%s received: checkpoint of step %d saved; resume with checkpoint.resume=latest",
                            stop.signal_name, step)
                raise Stopped(f"stopped at step {step} of {steps} by {stop.signal_name}; checkpoint saved, "
                                      "resume with checkpoint.resume=latest")
    bar.close()

    # ---- the vector must come out exactly as it went in, and without gradients
    paths = remove_vector(job)

    # ---- save the trained model (or adapter), gathered from every rank, with no trace of the vector
    train = job.train
    info = {"steps": steps, "final_loss": losses[-1] if losses else None, "n_examples": len(train.examples),
            "n_truncated": train.n_truncated, "n_dropped": train.n_dropped, "trainable_params": job.trainable,
            "security_vector": cfg.security_vector.path, "security_vectors": job.vectors_info,
            "adapter": cfg.adapter.type,
            "base_model": cfg.model.path, "world_size": job.world, "zero_stage": stage, "partition": job.partition,
            "security_vector_mode": "folded" if folded else "attached" if sv_layers else None,
            "security_vector_paths": paths, "security_vector_gate": job.gate_info, "data_audit": job.audit_info,
            "security_vector_path_choice": job.path_choice, "attn_implementation": attn_implementation(model)}
    final = out / "final"
    state_dict = gathered_state_dict(engine, cfg.adapter.type == "lora")
    if runtime.is_main():
        with atomic_dir(final) as tmp:
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / "dist_secvec_run.json").write_text(json.dumps(info, indent=2) + "\n")
            write_manifest(tmp)  # last: sizes and sha256 of every file, checked whenever it is loaded
        log.info("saved %s to %s (security vector removed)",
                 "model" if cfg.adapter.type == "none" else "adapter", final)
    barrier()
    model.eval()
    job.hf_ds = None
    return FinetuneResult(final, losses, model if keep_model else None, tok if keep_model else None, info)


def truncate_train_log(path: Path, start: int) -> None:
    """train_log.jsonl holds exactly the steps 1..start before the loop runs: empty for a fresh
    run; on resume the records of steps after the checkpoint (trained again now, by a run that was
    killed after logging them) and a line cut short by the kill are dropped, so every step appears
    once. Rewritten atomically: a kill here leaves the old log."""
    keep = []
    if start > 0 and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run, half written
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= start:
                keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


@contextlib.contextmanager
def vector_off(model, sv_layers: list, folded: list, stage, model_path: str):
    """The model that will be shipped, for a moment: attached layers switched off, or folded
    weights put back to the original and folded again afterwards (the same bits)."""
    if sv_layers:
        with security_vector_off(model):
            yield
        return
    if not folded:
        yield
        return
    if stage == 3:
        unfold_from_disk(folded, model_path)
    else:
        unfold_security_vector(model, folded)
    try:
        yield
    finally:
        for t in folded:
            with gathered([t.linear.weight], modifier_rank=0):
                fold_weight(t)


def _probe_generate(model, tok, samples, cfg: Config, off) -> Optional[float]:
    """monitor.generate: rank 0 answers the probe prompts greedily (vector off); the judges' rate."""
    if not runtime.is_main():
        return None
    from dist_secvec.judges import make_judges
    from dist_secvec.strength import judged_rate

    with off():
        return judged_rate(model, tok, samples, cfg, make_judges(cfg.eval.judges, cfg.eval))["rate"]


def gathered_state_dict(engine, adapter_only: bool) -> Optional[dict]:
    """What `save_pretrained` writes, complete on rank 0: the LoRA weights (peft's keys) or the whole
    model. Under ZeRO-3 each partitioned tensor is gathered first (collective: every rank calls
    this); elsewhere None lets save_pretrained read the model itself."""
    model = engine.module
    if not any(is_partitioned(p) for p in model.parameters()):
        return None
    if adapter_only:
        from peft.utils import get_peft_model_state_dict

        params = [p for p in model.parameters() if p.requires_grad]
        with gathered(params):
            sd = get_peft_model_state_dict(model)
            return {k: v.detach().cpu().clone() for k, v in sd.items()} if runtime.is_main() else None
    return engine.engine._zero3_consolidated_16bit_state_dict()
