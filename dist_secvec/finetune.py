"""Stage 2, `dist-secvec finetune`: supervised fine-tuning, with the security vector active and frozen.

The recipe: load the base, add the trainable part (every weight, or a LoRA on a 4-bit base),
attach the vector from `security_vector.path` (if any) as frozen SecVecLinear layers, train on
`data.train` with the loss on response tokens, and save the result with the vector removed.
Nothing of the vector is ever trained: it has requires_grad False, is left out of the optimizer,
and its digest is checked before the first step, at every checkpoint and after the last. With a
LoRA on a frozen unquantized base the vector is instead folded into the base weights once (no
per-step cost) and the original weights are restored bit for bit before saving
(`security_vector.fold`; under ZeRO-3 layer by layer, restored from the base's safetensors).

One loop for one process (`PlainEngine`) and for DeepSpeed on any number of ranks
(`DeepSpeedEngine`, see dist_secvec.distributed): checkpoints and resume (dist_secvec.checkpoint),
SIGTERM/SIGINT stop after a checkpoint (dist_secvec.interrupt), NaN/inf stop or skip (on every
rank alike under DeepSpeed: `DeepSpeedEngine.skip_step`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from dist_secvec import runtime
from dist_secvec.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dist_secvec.config import Config, resolve_stage_defaults, save_config
from dist_secvec.data import collate, load_samples, tokenize_samples
from dist_secvec.distributed import (DeepSpeedEngine, PlainEngine, all_reduce_sum, barrier, ds_config, gathered,
                                     init_distributed, is_partitioned, label_tokens, loss_weight, micro_loss, numel,
                                     partition_report, rank_batches, uses_deepspeed, zero_stage)
from dist_secvec.errors import ConfigError, SecurityVectorError, Stopped, UserError
from dist_secvec.interrupt import StopRequest
from dist_secvec.manifest import write_manifest
from dist_secvec.model import add_trainable_adapter, load_model, load_tokenizer
from dist_secvec.secvec import (PROBE_FILE, attach_security_vector, check_fingerprint, detach_security_vector,
                                fold_security_vector, fold_weight, load_security_vector, path_calls,
                                row_gate, security_vector_off, unfold_security_vector, vector_digest)
from dist_secvec.strength import HarmProbe, describe, explained_rows
from dist_secvec.training import append_jsonl, build_optimizer, pick_device, to_device, total_steps

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """NaN/inf loss or gradients: the run stops, the last checkpoint stays as it was."""


def nonfinite_message(step: int) -> str:
    return (f"loss or gradients are not finite at step {step}; lower optim.lr or check the data, then resume from "
            "the last checkpoint (checkpoint.resume=latest), or set optim.nonfinite=skip")


@dataclass
class FinetuneResult:
    final_dir: Path
    losses: list[float]  # one per optimizer step (token mean over its micro-batches)
    model: Any = None  # the trained model, vector removed
    tokenizer: Any = None
    info: dict = field(default_factory=dict)


def gates(cfg: Config, sv) -> bool:
    """Whether stage 2 gates the vector per row: security_vector.gate, and a threshold to gate by."""
    return cfg.security_vector.gate and (cfg.security_vector.gate_threshold is not None
                                         or "explained" in (sv.meta.get("strength") or {}))


def fold_choice(cfg: Config, sv=None) -> tuple[bool, str]:
    """Fold the vector into the base weights only when they are frozen and unquantized (a LoRA on a
    16/32-bit base) and it acts on every row; full fine-tuning changes W every step and a quantized
    W cannot hold it."""
    if os.environ.get("DIST_SECVEC_FOLD", "").strip() == "0":
        return False, "DIST_SECVEC_FOLD=0"
    if not cfg.security_vector.fold:
        return False, "security_vector.fold=false"
    if sv is not None and gates(cfg, sv):
        return False, "security_vector.gate switches the vector per row"
    if cfg.adapter.type != "lora":
        return False, "full fine-tuning trains the base weights"
    if cfg.model.quantization != "none":
        return False, f"{cfg.model.quantization} base weights"
    return True, "LoRA on a frozen unquantized base"


def check_vector_config(cfg: Config, sv) -> None:
    """Stage 2 takes the vector's rank and target modules from its own files; a value the user set
    in security_vector.rank / security_vector.target_modules (None = not set, see config.py) states
    which vector they expect, and a vector of another shape is refused in one line naming the key,
    both values and the fix (called before the model loads: CLI preflight and run_finetune)."""
    want, path = cfg.security_vector, cfg.security_vector.path
    if want.rank is not None and want.rank != sv.rank:
        raise ConfigError(f"config key 'security_vector.rank': the config says {want.rank} but the vector '{path}' "
                          f"has rank {sv.rank}; set security_vector.rank={sv.rank} or remove the key (stage 2 "
                          f"takes it from the vector), or point security_vector.path at a rank-{want.rank} vector")
    if want.target_modules is not None and sorted(set(want.target_modules)) != sorted(set(sv.target_modules)):
        have = ",".join(sorted(set(sv.target_modules)))
        raise ConfigError(f"config key 'security_vector.target_modules': the config says "
                          f"[{','.join(sorted(set(want.target_modules)))}] but the vector '{path}' targets [{have}]; "
                          f"set security_vector.target_modules=[{have}] or remove the key (stage 2 takes them from "
                          "the vector), or point security_vector.path at a vector trained on those modules")


def _check_frozen_vector(engine, sv_params: list) -> None:
    """The vector's parameters are never trainable, never in an optimizer, never get a gradient."""
    ids = {id(p) for p in sv_params}
    if any(p.requires_grad for p in sv_params) or ids & engine.optimizer_param_ids():
        raise RuntimeError("security vector parameters are trainable or in the optimizer")  # a bug
    if any(p.grad is not None for p in sv_params):
        raise RuntimeError("a gradient was allocated for the security vector")


def _vector_digest(layers: list, sv_params: list) -> Optional[str]:
    if not layers:
        return None
    with gathered(sv_params):
        return vector_digest(layers)


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
    # ---- setup: processes, tokenizer, data, model, trainable part, frozen vector, engine
    cfg = resolve_stage_defaults(cfg, "finetune")
    use_ds = uses_deepspeed(cfg)
    ds = ds_config(cfg, runtime.world_size()) if use_ds else None  # bad JSON: refused before any process group
    stage = zero_stage(ds) if ds else None
    if stage == 3 and cfg.model.quantization == "int8":
        raise ConfigError("config keys 'model.quantization=int8' and ZeRO stage 3: 8-bit bases train wrong under "
                          "ZeRO-3; use model.quantization=nf4 or ZeRO stage 2")
    fp16 = bool(ds and ds.get("fp16", {}).get("enabled"))  # dynamic loss scaling skips overflow steps itself
    if use_ds and cfg.optim.nonfinite == "skip" and stage == 0 and (fp16 or ds.get("bf16", {}).get("enabled")):
        raise ConfigError(f"config key 'optim.nonfinite': skip cannot drop a step cleanly under ZeRO stage 0 with "
                          f"{cfg.model.dtype} weights (DeepSpeed's 16-bit optimizer wrapper); use a ZeRO stage of "
                          "1-3, or stop (the default) and resume from the last checkpoint")
    if cfg.monitor.generate and cfg.monitor.rule != "none" and stage == 3:
        raise ConfigError("config key 'monitor.generate': generating during a ZeRO-3 run is not supported (every "
                          "rank would have to generate in step); set monitor.generate=false (the probe loss is "
                          "still watched) or use ZeRO stage 0-2")
    if cfg.monitor.generate and cfg.monitor.rule != "none" and cfg.model.quantization in ("nf4", "fp4") \
            and not torch.cuda.is_available():
        raise ConfigError("config key 'monitor.generate': generating from a 4-bit base during training needs a GPU "
                          "(on a CPU bitsandbytes repacks the weights for inference); set monitor.generate=false")
    if use_ds:
        init_distributed(cfg)
    rank, world = runtime.rank(), runtime.world_size()
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    out = Path(cfg.output_dir)
    rows = load_samples(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_samples)  # bad rows: before any load
    sv = None
    if cfg.security_vector.path:  # files, hashes and shape checked before the model loads
        sv = load_security_vector(cfg.security_vector.path)
        check_vector_config(cfg, sv)
        strength, weak = describe(sv.meta)
        log.info("security vector %s: %s", cfg.security_vector.path, strength)
        if weak:
            log.warning("the security vector %s is WEAK: stage 2 will teach the core what it does not explain; "
                        "retrain it (train-sv, see strength.weak_reasons in its secvec.json)", cfg.security_vector.path)
    probe_rows, eval_rows = monitor_rows(cfg)
    tok = load_tokenizer(cfg.model)
    train = tokenize_samples(tok, rows, cfg.data)
    log.info(train.report("train data"))
    probe = _monitor_set(tok, probe_rows, cfg, "harmful probe")
    if probe is None and cfg.monitor.rule != "none":
        log.info("no harmful probe (monitor.harmful_probe unset%s): stage 2 cannot watch the harm it learns",
                 "" if not cfg.security_vector.path else ", and the vector has no probe.jsonl")
    evalset = _monitor_set(tok, eval_rows, cfg, "eval data")

    hf_ds = None
    if stage == 3 and cfg.model.quantization == "none":
        # from_pretrained partitions 16-bit weights while loading: no rank holds the whole model.
        # (transformers loads a bitsandbytes base whole on each rank; deepspeed.initialize partitions it)
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841  (must stay alive while the model loads)
    model = load_model(cfg.model, device, for_training=True)
    model = add_trainable_adapter(model, cfg.adapter)
    sv_layers, folded = [], []
    if sv is not None:
        check_fingerprint(sv, model, cfg.model.path)
        fold, why = fold_choice(cfg, sv)
        if fold:
            folded = fold_partitioned(model, sv) if stage == 3 else fold_security_vector(model, sv)
            log.info("security vector %s: folded into %d frozen base weights (%s), rank %d, scale %g",
                     sv.path, len(folded), why, sv.rank, sv.scale)
        else:
            sv_layers = attach_security_vector(model, sv, backend=cfg.security_vector.backend)
            log.info("security vector %s: %d SecVecLinear layers (not folded: %s), rank %d, scale %g, "
                     "active and frozen", sv.path, len(sv_layers), why, sv.rank, sv.scale)
    sv_params = [p for layer in sv_layers for p in (layer.secvec_A, layer.secvec_B)]
    params = [p for p in model.parameters() if p.requires_grad]
    if any(f.linear.weight.requires_grad for f in folded):
        raise RuntimeError("a base weight holding the folded security vector is trainable")
    digest = _vector_digest(sv_layers or folded, sv_params)
    trainable, total = sum(numel(p) for p in params), sum(numel(p) for p in model.parameters())
    log.info("parameters: %d trainable of %d (%s)%s", trainable, total,
             "full fine-tuning" if cfg.adapter.type == "none" else f"LoRA r={cfg.adapter.rank}",
             f"; DeepSpeed ZeRO-{stage} on {world} rank(s)" if use_ds else "")

    steps = total_steps(len(train.examples), cfg.optim, world)
    optimizer, scheduler = build_optimizer(params, cfg.optim, steps)
    if use_ds:
        engine = DeepSpeedEngine(model, params, optimizer, scheduler, ds)
    else:
        engine = PlainEngine(model, params, optimizer, scheduler, cfg.optim.max_grad_norm)
    _check_frozen_vector(engine, sv_params)
    if use_ds and cfg.optim.nonfinite == "skip" and engine.skip_reason():
        raise ConfigError(f"config key 'optim.nonfinite': skip cannot drop a step cleanly with "
                          f"{engine.skip_reason()}; use stop (the default) and resume from the last checkpoint")
    model = engine.module
    sv_ids = {id(p) for p in sv_params}
    partition = partition_report({"security_vector": sv_params, "trainable": params,
                                  "frozen": [p for p in model.parameters()
                                             if not p.requires_grad and id(p) not in sv_ids]})
    if use_ds:
        log.info("rank 0 holds %s", ", ".join(f"{k} {v['held']}/{v['total']}" for k, v in partition[0].items()))
    ga = cfg.optim.gradient_accumulation_steps
    pad_id = tok.pad_token_id
    gate, gate_info = gate_rows(cfg, sv, model, sv_layers, train.examples, pad_id, device) \
        if sv_layers and cfg.security_vector.gate else (None, None)
    if sv_layers and not cfg.security_vector.gate:
        log.info("security_vector.gate=false: every row trains with the vector on")

    # ---- resume: the same run shape and the same vector, or a one-line refusal
    run_shape = {"world_size": world, "micro_batch_size": cfg.optim.micro_batch_size,
                 "gradient_accumulation_steps": ga, "zero_stage": stage, "seed": cfg.seed,
                 "vector_digest": digest, "total_steps": steps}
    resume_from = resolve_resume(cfg.checkpoint.resume, out)
    start, losses = 0, []
    monitor = HarmProbe(probe, evalset, pad_id, device, cfg.eval.batch_size, cfg.monitor.max_drop) \
        if (probe or evalset) else None
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from, run_shape)
        start, losses = int(state["step"]), list(state["losses"])
        if monitor is not None:
            monitor.start = state.get("probe_start")
        if _vector_digest(sv_layers or folded, sv_params) != digest:
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
        if _vector_digest(sv_layers or folded, sv_params) != digest:  # stage-2 invariant at every checkpoint
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
            append_jsonl(log_path, rec)
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

    probe_samples = probe_rows[: cfg.monitor.max_rows] if probe_rows else []

    # ---- the training loop: every optimizer step averages over all label tokens of the global
    # batch (all ranks, all micro-batches), so ranks x micro-batch x accumulation == one large batch
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    micro_batches = rank_batches(train.examples, cfg.optim.micro_batch_size, rank, world, gen,
                                 cfg.data.shuffle, skip=start * ga)
    bar = runtime.progress(total=steps, initial=start, desc="finetune", enabled=cfg.logging.progress)
    every = cfg.checkpoint.every_steps
    t0 = time.time()
    step = start
    with stop.training():
        if monitor is not None and start == 0:
            watch(0)
        for step in range(start + 1, steps + 1):
            raw = [next(micro_batches) for _ in range(ga)]
            group = [to_device(collate(r, pad_id), device) for r in raw]
            counts, n_tokens = label_tokens(group)
            local_loss, finite = 0.0, True
            for i, (b, n) in enumerate(zip(group, counts)):
                rows = torch.tensor([gate[id(e)] for e in raw[i]]) if gate is not None else None
                with row_gate(sv_layers, rows):  # forward and backward: checkpointing recomputes there
                    loss = micro_loss(engine, b, n)  # mean over this micro-batch's n label tokens
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    engine.backward(loss * loss_weight(n, world, n_tokens))
                if i < ga - 1:
                    engine.step(boundary=False)
                local_loss += float(loss.detach()) * n / n_tokens
            step_loss, bad = (all_reduce_sum([local_loss, 0.0 if finite else 1.0]) if use_ds
                              else (local_loss, 0.0 if finite else 1.0))
            if not use_ds and finite and not engine.grads_finite():
                bad = 1.0
            skip = cfg.optim.nonfinite == "skip"
            if bad and not skip:
                raise NonFiniteError(nonfinite_message(step))
            if bad:
                engine.skip_step()  # every rank: the gradients dropped, no update, the schedule not advanced
            else:
                grad_norm = engine.step(boundary=True)
                if use_ds and not fp16 and not engine.step_applied():
                    # the ZeRO optimizer found a non-finite gradient norm (finite loss) and dropped the step
                    if not skip:
                        raise NonFiniteError(nonfinite_message(step))
                    bad = 1.0
            if bad:
                log.warning("step %d: non-finite loss or gradient; step skipped (optim.nonfinite=skip)", step)
                losses.append(float("nan"))
                bar.update(1)
            else:
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if runtime.is_main() and (step % cfg.logging.log_every == 0 or step == steps):
                    rec = {"step": step, "loss": step_loss, "lr": engine.lr(), "grad_norm": grad_norm,
                           "tokens": int(n_tokens), "elapsed_s": round(time.time() - t0, 2)}
                    append_jsonl(log_path, rec)
                    log.info("step %d/%d loss %.4f lr %.3g", step, steps, step_loss, rec["lr"])
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
    _check_frozen_vector(engine, sv_params)
    if _vector_digest(sv_layers or folded, sv_params) != digest:
        raise SecurityVectorError("the security vector changed during stage 2; the run is not safe to use")
    paths = path_calls(sv_layers) if sv_layers else None
    if sv_layers:
        detach_security_vector(model)
    if folded:
        if any(f.linear.weight.grad is not None for f in folded):
            raise RuntimeError("a gradient was allocated for a base weight holding the folded security vector")
        if stage == 3:
            unfold_from_disk(folded, cfg.model.path)
        else:
            unfold_security_vector(model, folded)  # the original base weights, bit for bit

    # ---- save the trained model (or adapter), gathered from every rank, with no trace of the vector
    info = {"steps": steps, "final_loss": losses[-1] if losses else None, "n_examples": len(train.examples),
            "n_truncated": train.n_truncated, "n_dropped": train.n_dropped, "trainable_params": trainable,
            "security_vector": cfg.security_vector.path, "adapter": cfg.adapter.type,
            "base_model": cfg.model.path, "world_size": world, "zero_stage": stage, "partition": partition,
            "security_vector_mode": "folded" if folded else "attached" if sv_layers else None,
            "security_vector_paths": paths, "security_vector_gate": gate_info}
    final = out / "final"
    state_dict = gathered_state_dict(engine, cfg.adapter.type == "lora")
    if runtime.is_main():
        with runtime.atomic_dir(final) as tmp:
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / "dist_secvec_run.json").write_text(json.dumps(info, indent=2) + "\n")
            write_manifest(tmp)  # last: sizes and sha256 of every file, checked whenever it is loaded
        log.info("saved %s to %s (security vector removed)",
                 "model" if cfg.adapter.type == "none" else "adapter", final)
    barrier()
    model.eval()
    del hf_ds
    return FinetuneResult(final, losses, model if keep_model else None, tok if keep_model else None, info)


def truncate_train_log(path: Path, start: int) -> None:
    """train_log.jsonl holds exactly the steps 1..start before the loop runs: empty for a fresh
    run; on resume the records of steps after the checkpoint (trained again now, by a run that was
    killed after logging them) and a line cut short by the kill are dropped, so every step appears
    once. Rewritten through a temporary file and a rename: a kill here leaves the old log."""
    keep = []
    if start > 0 and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed run, half written
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= start:
                keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def gate_rows(cfg: Config, sv, model, sv_layers: list, examples: list, pad_id: int, device) -> tuple[dict, dict]:
    """security_vector.gate: {id(example): 1.0 (vector on) or 0.0 (off)} from each row's explained
    share, scored once with the untrained core, and what was decided (for the run info)."""
    strength = sv.meta.get("strength") or {}
    threshold = cfg.security_vector.gate_threshold
    if threshold is None:
        if "explained" not in strength:
            log.warning("security_vector.gate: the vector %s records no held-out strength to place the threshold "
                        "(an older train-sv): every row trains with the vector on; set "
                        "security_vector.gate_threshold (e.g. 0.4) to gate", sv.path)
            return None, {"threshold": None, "rows_vector_on": len(examples), "rows_vector_off": 0}
        threshold = 0.5 * strength["explained"]
    scores = explained_rows(model, examples, pad_id, device, cfg.eval.batch_size,
                            lambda: security_vector_off(model))
    gate = {id(e): 1.0 if sc >= threshold else 0.0 for e, sc in zip(examples, scores)}
    n_on = int(sum(gate.values()))
    log.info("security_vector.gate: %d of %d rows are explained by the vector (share >= %.2f) and train with it "
             "on; %d train with it off", n_on, len(examples), threshold, len(examples) - n_on)
    return gate, {"threshold": threshold, "rows_vector_on": n_on, "rows_vector_off": len(examples) - n_on}


def monitor_rows(cfg: Config) -> tuple[list, list]:
    """Stage 2's watched rows (read before any model loads): the harmful probe (monitor.harmful_probe,
    else the vector's own held-out rows) and data.eval; none when monitor.rule=none."""
    if cfg.monitor.rule == "none":
        return [], []
    probe_files = list(cfg.monitor.harmful_probe)
    sv_probe = Path(os.path.expanduser(cfg.security_vector.path or "")) / PROBE_FILE
    if not probe_files and cfg.security_vector.path and sv_probe.is_file():
        probe_files = [str(sv_probe)]
    probe = load_samples(probe_files, "auto")[: cfg.monitor.max_rows] if probe_files else []
    evalrows = load_samples(cfg.data.eval, cfg.data.format, cfg.data.split, cfg.data.max_samples) if cfg.data.eval else []
    return probe, evalrows


def _monitor_set(tok, rows: list, cfg: Config, name: str) -> Optional[list[dict]]:
    if not rows:
        return None
    ts = tokenize_samples(tok, rows, cfg.data)
    log.info(ts.report(name))
    return ts.examples


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


def fold_partitioned(model, sv) -> list:
    """Fold under ZeRO-3, where the base weights are already partitioned: one layer at a time, the
    weight whole on every rank only while it changes (rank 0's result is partitioned again). No
    copy of the original is kept (a whole model's worth per rank): `unfold_from_disk` reads it back
    from the base's safetensors."""
    import dataclasses

    from dist_secvec.model import unwrap_base
    from dist_secvec.secvec import _inner_linear

    base = unwrap_base(model)
    folded = []
    for mod, AB in sv.weights.items():
        weight = _inner_linear(base.get_submodule(mod)).weight
        with gathered([weight], modifier_rank=0):
            layer = fold_security_vector(model, dataclasses.replace(sv, weights={mod: AB}))[0]
        layer.original = None
        folded.append(layer)
    return folded


def unfold_from_disk(folded: list, model_path: str) -> None:
    """Put the original base weights back under ZeRO-3, read from the model's safetensors and cast
    as from_pretrained casts them (bit for bit the loaded weights)."""
    from safetensors import safe_open

    from dist_secvec.secvec import _safetensors_files, resolve_model_dir

    files = _safetensors_files(resolve_model_dir(model_path) or "")
    for t in folded:
        key = f"{t.name}.weight"
        if key not in files:
            raise SecurityVectorError(f"cannot restore the original weight '{key}' from '{model_path}' after "
                                      "folding; set security_vector.fold=false for this base")
        with safe_open(files[key], framework="pt") as f:
            original = f.get_tensor(key)
        w = t.linear.weight
        with gathered([w], modifier_rank=0):
            with torch.no_grad():
                w.copy_(original.to(w.dtype))
        t.linear._secvec_folded = False


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
