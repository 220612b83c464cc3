"""Stage 2, `dist-secvec finetune`: supervised fine-tuning, with the security vector active and frozen.

The recipe: load the base, add the trainable part (every weight, or a LoRA on a 4-bit base),
attach the vector from `security_vector.path` (if any) as frozen SecVecLinear layers, train on
`data.train` with the loss on response tokens, and save the result with the vector removed.
Nothing of the vector is ever trained: it has requires_grad False, is left out of the optimizer,
and its digest is checked before the first step and after the last. With a LoRA on a frozen
unquantized base the vector is instead folded into the base weights once (no per-step cost) and
the original weights are restored bit for bit before saving (`security_vector.fold`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_secvec import runtime
from dist_secvec.config import Config, save_config
from dist_secvec.data import IGNORE_INDEX, collate, endless_batches, load_samples, tokenize_samples
from dist_secvec.errors import SecurityVectorError
from dist_secvec.model import add_trainable_adapter, count_parameters, load_model, load_tokenizer
from dist_secvec.secvec import (attach_security_vector, check_fingerprint, detach_security_vector,
                                fold_security_vector, load_security_vector, unfold_security_vector,
                                vector_digest)
from dist_secvec.training import append_jsonl, build_optimizer, pick_device, to_device, total_steps

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    final_dir: Path
    losses: list[float]  # one per optimizer step (token mean over its micro-batches)
    model: Any = None  # the trained model, vector removed
    tokenizer: Any = None
    info: dict = field(default_factory=dict)


def fold_choice(cfg: Config) -> tuple[bool, str]:
    """Fold the vector into the base weights only when they are frozen and unquantized (a LoRA on a
    16/32-bit base); full fine-tuning changes W every step and a quantized W cannot hold it."""
    if os.environ.get("DIST_SECVEC_FOLD", "").strip() == "0":
        return False, "DIST_SECVEC_FOLD=0"
    if not cfg.security_vector.fold:
        return False, "security_vector.fold=false"
    if cfg.adapter.type != "lora":
        return False, "full fine-tuning trains the base weights"
    if cfg.model.quantization != "none":
        return False, f"{cfg.model.quantization} base weights"
    return True, "LoRA on a frozen unquantized base"


def run_finetune(cfg: Config, keep_model: bool = False) -> FinetuneResult:
    # ---- setup: tokenizer, data, model, trainable part, frozen vector, optimizer
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    out = Path(cfg.output_dir)
    tok = load_tokenizer(cfg.model)
    train = tokenize_samples(tok, load_samples(cfg.data.train, cfg.data.format, cfg.data.split,
                                               cfg.data.max_samples), cfg.data)
    log.info(train.report("train data"))

    model = load_model(cfg.model, device, for_training=True)
    model = add_trainable_adapter(model, cfg.adapter)
    sv_layers, folded = [], []
    if cfg.security_vector.path:
        sv = load_security_vector(cfg.security_vector.path)
        check_fingerprint(sv, model, cfg.model.path)
        fold, why = fold_choice(cfg)
        if fold:
            folded = fold_security_vector(model, sv)
            log.info("security vector %s: folded into %d frozen base weights (%s), rank %d, scale %g",
                     sv.path, len(folded), why, sv.rank, sv.scale)
        else:
            sv_layers = attach_security_vector(model, sv, backend=cfg.security_vector.backend)
            log.info("security vector %s: %d SecVecLinear layers (not folded: %s), rank %d, scale %g, "
                     "active and frozen", sv.path, len(sv_layers), why, sv.rank, sv.scale)
    sv_params = {id(p) for layer in sv_layers for p in (layer.secvec_A, layer.secvec_B)}
    params = [p for p in model.parameters() if p.requires_grad]
    if any(id(p) in sv_params for p in params):  # a bug, not a user error
        raise RuntimeError("security vector parameters are trainable")
    if any(f.linear.weight.requires_grad for f in folded):
        raise RuntimeError("a base weight holding the folded security vector is trainable")
    digest = vector_digest(sv_layers or folded) if (sv_layers or folded) else None
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d (%s)", trainable, total,
             "full fine-tuning" if cfg.adapter.type == "none" else f"LoRA r={cfg.adapter.rank}")

    steps = total_steps(len(train.examples), cfg.optim)
    optimizer, scheduler = build_optimizer(params, cfg.optim, steps)
    ga = cfg.optim.gradient_accumulation_steps
    pad_id = tok.pad_token_id
    gen = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)  # only now: bad data or a bad vector leave nothing behind
    save_config(cfg, out / "config.yaml")
    log_path = out / "train_log.jsonl"
    log_path.write_text("")

    # ---- the training loop: every optimizer step averages over all label tokens of its
    # micro-batches (weights by tokens, so micro_batch x accumulation == one large batch)
    model.train()
    losses: list[float] = []
    micro_batches = endless_batches(train.examples, cfg.optim.micro_batch_size, gen, cfg.data.shuffle)
    bar = runtime.progress(total=steps, desc="finetune", enabled=cfg.logging.progress)
    t0 = time.time()
    for step in range(1, steps + 1):
        group = [to_device(collate(next(micro_batches), pad_id), device) for _ in range(ga)]
        counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group]
        n_tokens = max(sum(counts), 1)
        step_loss = 0.0
        for b, n in zip(group, counts):
            loss = model(**b).loss  # mean over this micro-batch's n label tokens
            (loss * (n / n_tokens)).backward()
            step_loss += loss.item() * n / n_tokens
        if not math.isfinite(step_loss):
            raise RuntimeError(f"loss is {step_loss} at step {step}; lower optim.lr or check the data")
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if step % cfg.logging.log_every == 0 or step == steps:
            rec = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                   "tokens": n_tokens, "elapsed_s": round(time.time() - t0, 2)}
            append_jsonl(log_path, rec)
            log.info("step %d/%d loss %.4f lr %.3g", step, steps, step_loss, rec["lr"])
    bar.close()

    # ---- the vector must come out exactly as it went in, and without gradients
    if sv_layers:
        if any(p.grad is not None for layer in sv_layers for p in (layer.secvec_A, layer.secvec_B)):
            raise RuntimeError("a gradient was allocated for the security vector")
        if vector_digest(sv_layers) != digest:
            raise SecurityVectorError("the security vector changed during stage 2; the run is not safe to use")
        detach_security_vector(model)
    if folded:
        if any(f.linear.weight.grad is not None for f in folded):
            raise RuntimeError("a gradient was allocated for a base weight holding the folded security vector")
        if vector_digest(folded) != digest:
            raise SecurityVectorError("the security vector changed during stage 2; the run is not safe to use")
        unfold_security_vector(model, folded)  # the original base weights, bit for bit

    # ---- save the trained model (or adapter) with no trace of the vector
    info = {"steps": steps, "final_loss": losses[-1] if losses else None, "n_examples": len(train.examples),
            "n_truncated": train.n_truncated, "n_dropped": train.n_dropped, "trainable_params": trainable,
            "security_vector": cfg.security_vector.path, "adapter": cfg.adapter.type,
            "base_model": cfg.model.path}
    final = out / "final"
    with runtime.atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "dist_secvec_run.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("saved %s to %s (security vector removed)",
             "model" if cfg.adapter.type == "none" else "adapter", final)
    model.eval()
    return FinetuneResult(final, losses, model if keep_model else None, tok if keep_model else None, info)
