"""Stage 1, `dist-secvec train-sv`: train the security vector on a small set showing one behaviour.

The behaviour (security_vector.behaviour) is harm by default: rows of harmful answers, judged by
refusal. Any other behaviour (e.g. hallucination: rows of wrong answers) trains the same way; its
name and the judges that decide it (security_vector.judges) are recorded in secvec.json, and the
logs and record keys name its rows by `rows_word` ("harmful" for harm) instead of assuming harm.

The base is frozen; only the vector (a peft LoRA) is trained, on
    loss = CE(the behaviour's response tokens | vector on)
         + kl_weight * KL(p_base || p_vector) over the tokens of benign samples
The KL term keeps the vector's effect confined to the behaviour: without it the
vector also distorts benign prompts, the core learns to compensate during stage 2, and that
learning vanishes when the vector is switched off.
After training, the shift on held-out benign samples is reported (mean KL, top-1 agreement).

The vector's strength is measured on held-out rows of the behaviour
(security_vector.heldout_harmful_data, or a heldout_fraction split of security_vector.harmful_data;
dist_secvec.strength) after every epoch: training stops when their loss with the vector on stops
falling (security_vector.early_stop, the best epoch is kept), and the final vector is judged strong
or weak. The held-out rows are saved with the vector (probe.jsonl): stage 2 watches their loss
with the vector off.

In one process by default (under a launcher, rank 0 alone). With deepspeed.zero_stage or
deepspeed.config the train-sv command trains on every rank with stage 2's pieces
(dist_secvec.distributed): the DeepSpeed engine, each rank a slice of the behaviour's and the
benign rows, every loss term a token mean over the global batch, and ZeRO-3 partitioning the base
while it loads, so a base too large for one GPU trains its vector over several. Every rank runs
the measurements (under ZeRO-3 each forward is collective), rank 0's held-out loss decides the
early stop, and rank 0 alone logs and writes, the vector gathered whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_secvec import runtime
from dist_secvec.config import DEFAULT_SV_RANK, Config, resolve_stage_defaults, save_config
from dist_secvec.data import (IGNORE_INDEX, batches, collate, endless_batches, load_samples, refuse_text_rows,
                              tokenize_samples)
from dist_secvec.distributed import (DeepSpeedEngine, all_reduce_sum, barrier, ds_config, from_rank0, gathered,
                                     init_distributed, loss_weight, numel, partition_report, partitioned_loading,
                                     rank_batches, uses_deepspeed, zero_stage)
from dist_secvec.errors import ConfigError
from dist_secvec.files import atomic_dir, write_text_atomic
from dist_secvec.judges import make_judges
from dist_secvec.model import attn_implementation, linear_targets, load_model, load_tokenizer, lora_config
from dist_secvec.secvec import (PEFT_PREFIX, PROBE_FILE, base_fingerprint, record_file_hashes, rows_word,
                                save_security_vector)
from dist_secvec.strength import answer_stats, judged_rate, strength_table, weak_reasons, write_probe
from dist_secvec.tracking import RunLog
from dist_secvec.training import build_optimizer, masked_kl, pick_device, to_device, total_steps

log = logging.getLogger(__name__)


@dataclass
class TrainSVResult:
    vector_dir: Path
    losses: list[float]
    shift: dict = field(default_factory=dict)  # per row set (rows_word of the behaviour, benign): loss on/off, KL
    strength: dict = field(default_factory=dict)  # on the held-out rows of the behaviour (dist_secvec.strength)

    @property
    def weak(self) -> bool:
        return bool(self.strength.get("weak_reasons"))


@torch.no_grad()
def vector_shift(model, examples, pad_id, device, batch_size=16) -> dict:
    """How much the vector moves outputs: mean KL and top-1 agreement at the labelled positions,
    plus the mean loss with the vector on and off (for the behaviour's rows: on << off)."""
    kl_sum = agree = n_tok = 0.0
    loss_on = loss_off = 0.0
    n_batches = 0
    for batch in batches(examples, batch_size, shuffle=False):
        b = to_device(collate(batch, pad_id), device)
        on = model(**b)
        with model.disable_adapter():
            off = model(**b)
        mask = b["labels"][:, 1:] != -100  # positions that predict a response token
        lo, lf = on.logits[:, :-1], off.logits[:, :-1]
        kl_sum += masked_kl(lf, lo, mask).item() * mask.sum().item()
        agree += ((lo.argmax(-1) == lf.argmax(-1)) & mask).sum().item()
        n_tok += mask.sum().item()
        loss_on += on.loss.item()
        loss_off += off.loss.item()
        n_batches += 1
    return {"kl": kl_sum / max(n_tok, 1), "top1_agreement": agree / max(n_tok, 1),
            "loss_vector_on": loss_on / max(n_batches, 1), "loss_vector_off": loss_off / max(n_batches, 1),
            "n": len(examples)}


def run_train_sv(cfg: Config, use_deepspeed: bool = False) -> TrainSVResult:
    """use_deepspeed: train on every rank under DeepSpeed when deepspeed.zero_stage or deepspeed.config
    asks (the train-sv command). False: one process, as the demo and the experiment runner run stage
    1 on rank 0 alone inside their own jobs (their deepspeed keys are for stage 2)."""
    # ---- setup: tokenizer, the behaviour's + benign data, frozen base with a trainable vector
    from peft import get_peft_model

    # the vector's shape: what the user set, else rank 8 on every linear layer (resolved on the loaded
    # model below; config.yaml records both)
    cfg = dataclasses.replace(resolve_stage_defaults(cfg, "train-sv"), security_vector=dataclasses.replace(
        cfg.security_vector,
        rank=cfg.security_vector.rank if cfg.security_vector.rank is not None else DEFAULT_SV_RANK))
    sv_cfg = cfg.security_vector
    word = rows_word(sv_cfg.behaviour)  # how logs and record keys name the behaviour's rows
    # DeepSpeed only when asked for; what it cannot do is refused before any process group or load
    use_ds = use_deepspeed and uses_deepspeed(cfg, several_ranks=False)
    ds = ds_config(cfg, runtime.world_size()) if use_ds else None
    if ds is not None:
        from dist_secvec.stage2 import check_stage2

        check_stage2(cfg, ds, monitor=False)
        check_train_sv_zero(cfg, ds)
    stage = zero_stage(ds) if ds else None
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    main = runtime.is_main()  # the one process, or rank 0: logs, progress and every file
    out = Path(cfg.output_dir)
    # every file is read (and a bad row reported) before the tokenizer and the model load
    # the same row shapes and data.columns / data.roles as stage 2; the behaviour's rows are also answered
    harmful_rows = refuse_text_rows(load_samples(sv_cfg.harmful_data, cfg.data), "security_vector.harmful_data")
    benign_rows = load_samples(sv_cfg.benign_data, cfg.data) if sv_cfg.kl_weight > 0 else None
    heldout_rows = load_samples(sv_cfg.heldout_benign_data, cfg.data) if sv_cfg.heldout_benign_data else None
    harmful_rows, probe_rows, probe_source = split_heldout(harmful_rows, cfg)
    judge_names = behaviour_judges(cfg)
    judges = make_judges(judge_names, cfg.eval)  # an unknown judge fails before the model loads
    if use_ds:
        init_distributed(cfg)
    rank, world = (runtime.rank(), runtime.world_size()) if use_ds else (0, 1)
    tok = load_tokenizer(cfg.model)
    harmful = tokenize_samples(tok, harmful_rows, cfg.data, cache=True)
    log.info(harmful.report(f"{word} data"))
    probe = tokenize_samples(tok, probe_rows, cfg.data)
    log.info(probe.report(f"held-out {word} data ({probe_source})"))
    benign = None
    if benign_rows is not None:
        benign = tokenize_samples(tok, benign_rows, cfg.data, cache=True)
        log.info(benign.report("benign data (KL term)"))
    heldout = tokenize_samples(tok, heldout_rows, cfg.data) if heldout_rows is not None else None

    hf_ds = partitioned_loading(ds, cfg.model.quantization)  # noqa: F841 (alive while the model is in use)
    base = load_model(cfg.model, device, for_training=True)
    cfg = dataclasses.replace(cfg, security_vector=dataclasses.replace(sv_cfg, target_modules=linear_targets(
        base, sv_cfg.target_modules, "security_vector.target_modules", cfg.model.path, vector=True)))
    sv_cfg = cfg.security_vector
    torch.manual_seed(cfg.seed)  # the vector's initial A alike under every ZeRO stage (partitioned loading draws)
    model = get_peft_model(base, lora_config(rank=sv_cfg.rank, alpha=sv_cfg.alpha, dropout=sv_cfg.dropout,
                                             target_modules=sv_cfg.target_modules, layers=sv_cfg.layers))
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("security vector for %s (judged by %s): %d parameters (rank %d) on %s", sv_cfg.behaviour,
             ", ".join(judge_names), sum(numel(p) for p in params), sv_cfg.rank, ", ".join(sv_cfg.target_modules))

    steps = total_steps(len(harmful.examples), cfg.optim, world)
    optimizer, scheduler = build_optimizer(params, cfg.optim, steps)
    mb, pad_id = cfg.optim.micro_batch_size, tok.pad_token_id
    gen = torch.Generator().manual_seed(cfg.seed)
    engine, partition = None, None
    if use_ds:
        engine = DeepSpeedEngine(model, params, optimizer, scheduler, ds)
        partition = partition_report({"security_vector": params,
                                      "base": [p for p in model.parameters() if not p.requires_grad]})
        log.info("DeepSpeed ZeRO-%d on %d rank(s); rank 0 holds %s", stage, world,
                 ", ".join(f"{k} {v['held']}/{v['total']}" for k, v in partition[0].items()))
        # each rank its slice of one seeded stream (distributed.rank_batches), behaviour and benign alike
        harm_batches = rank_batches(harmful.examples, mb, rank, world, gen)
        benign_batches = rank_batches(benign.examples, mb, rank, world, gen) if benign else itertools.repeat(None)
    else:
        harm_batches = endless_batches(harmful.examples, mb, gen)
        benign_batches = endless_batches(benign.examples, mb, gen) if benign else itertools.repeat(None)
    log_path = out / "train_sv_log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)  # only now: bad data or a bad vector leave nothing behind
        save_config(cfg, out / "config.yaml")
        log_path.write_text("")
    runlog = RunLog(log_path, cfg, enabled=main)  # train_sv_log.jsonl and the trackers

    # ---- the training loop: the behaviour's CE + weighted KL on benign tokens; after each epoch
    # the held-out rows' loss with the vector on decides whether to go on (early_stop)
    model.train()
    losses: list[float] = []
    per_epoch = total_steps(len(harmful.examples), dataclasses.replace(cfg.optim, max_steps=None, epochs=1), world)
    best = {"loss": float("inf"), "epoch": 0, "state": None}
    stale, stopped_by = 0, "max_steps" if cfg.optim.max_steps is not None else "epoch cap"
    bar = runtime.progress(total=steps, desc="train-sv", enabled=cfg.logging.progress, unit="steps")
    t0 = time.time()
    window = {"tokens": 0, "s": 0.0}  # non-pad input tokens (behaviour + benign) and step seconds since the last record
    for step in range(1, steps + 1):
        t_step = time.perf_counter()
        if engine is None:
            acc, tokens = plain_step(model, params, optimizer, scheduler, harm_batches, benign_batches, cfg, word,
                                     pad_id, device)
        else:
            acc, tokens = deepspeed_step(engine, model, harm_batches, benign_batches, cfg, word, pad_id, device,
                                         world)
        window["s"] += time.perf_counter() - t_step
        window["tokens"] += tokens
        losses.append(acc["loss"])
        bar.update(1)
        bar.set_postfix(ce=f"{acc[f'{word}_ce']:.3f}", kl=f"{acc['benign_kl']:.4f}")
        if step % cfg.logging.log_every == 0 or step == steps:
            seen = all_reduce_sum([float(window["tokens"])])[0] if engine is not None else window["tokens"]
            tps = round(seen / window["s"], 1) if window["s"] > 0 else None
            window = {"tokens": 0, "s": 0.0}
            runlog.write({"step": step, **acc, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps,
                          "elapsed_s": round(time.time() - t0, 2)}, "train")
            log.info("step %d/%d %s CE %.4f benign KL %.5f", step, steps, word, acc[f"{word}_ce"], acc["benign_kl"])
        if step % per_epoch == 0 or step == steps:
            epoch = -(-step // per_epoch)
            # every rank measures every row (ZeRO-3 gathers each layer in step); rank 0's loss decides
            held = answer_stats(model, probe.examples, pad_id, device)
            held["loss"] = from_rank0([held["loss"]])[0] if engine is not None else held["loss"]
            runlog.write({"epoch": epoch, "step": step, f"heldout_{word}_loss": held["loss"],
                          "heldout_start_agreement": held["start_agreement"]}, "heldout")
            log.info("epoch %d: held-out %s loss (vector on) %.4f, first-token agreement %.0f%%",
                     epoch, word, held["loss"], 100 * held["start_agreement"])
            if held["loss"] < best["loss"] * (1 - 0.01):
                best.update(loss=held["loss"], epoch=epoch, state=vector_state(params))
                stale = 0
            else:
                stale += 1
                if held["loss"] < best["loss"]:  # a small gain is still the best vector so far
                    best.update(loss=held["loss"], epoch=epoch, state=vector_state(params))
            if sv_cfg.early_stop and stale >= sv_cfg.patience and step < steps:
                stopped_by = (f"held-out {word} loss stopped falling ({sv_cfg.patience} epochs without a 1% fall; "
                              f"security_vector.early_stop)")
                log.info("epoch %d: %s; keeping epoch %d", epoch, stopped_by, best["epoch"])
                break
    bar.close()
    runlog.close()
    if best["state"] is not None:
        with torch.no_grad(), gathered(params, modifier_rank=0):  # ZeRO-3: rank 0's copy partitioned again
            for p, saved in zip(params, best["state"]):
                p.copy_(saved)

    # ---- how far the vector moves held-out benign outputs, and how well it explains the behaviour's
    # (every rank runs every forward and generation alike: under ZeRO-3 each is collective)
    model.eval()
    check = heldout or benign
    shift = {word: vector_shift(model, harmful.examples, pad_id, device)}
    if check is not None:
        shift["benign"] = vector_shift(model, check.examples, pad_id, device)
        shift["benign"]["set"] = "heldout" if heldout else "kl-train (no held-out set configured)"
        log.info("vector shift on benign samples: mean KL %.5f, top-1 agreement %.2f%%",
                 shift["benign"]["kl"], 100 * shift["benign"]["top1_agreement"])
    log.info("%s loss with vector %.4f, without %.4f", word,
             shift[word]["loss_vector_on"], shift[word]["loss_vector_off"])
    strength = measure_strength(model, tok, probe, probe_rows, pad_id, device, cfg, judges)
    strength.update(heldout=probe_source, best_epoch=best["epoch"], epochs_run=-(-step // per_epoch),
                    stopped_by=stopped_by)
    log.info("security vector strength on held-out %s rows:\n%s", word, strength_table(strength, sv_cfg.behaviour))
    for reason in (strength["weak_reasons"] if main else []):
        log.warning("weak security vector: %s", reason)
    # the score distributions `dist-secvec audit` places its default threshold between
    from dist_secvec.audit import reference_record

    audit_ref = reference_record(model, {
        "harmful_heldout": probe.examples if probe_rows is not harmful_rows else [],
        "harmful_train": harmful.examples, "benign_heldout": heldout.examples if heldout else [],
        "benign_kl": benign.examples if benign else []}, pad_id, device, cfg.audit.batch_size, model.disable_adapter)
    if "threshold" in audit_ref:
        log.info("audit threshold for this vector: score %.3g (%s)", audit_ref["threshold"], audit_ref["rule"])

    # ---- save in peft's adapter format + metadata (fingerprint of the base it was trained on)
    modules = sorted({n[len(PEFT_PREFIX):] for n, m in model.named_modules()
                      if n.startswith(PEFT_PREFIX) and hasattr(m, "lora_A") and hasattr(m, "base_layer")})
    meta = {
        "format": "dist-secvec security vector v1",
        "base_model": cfg.model.path,
        "base_fingerprint": base_fingerprint(model, cfg.model.path, modules),
        "quantization": cfg.model.quantization,
        "dtype": cfg.model.dtype, "attn_implementation": attn_implementation(model),  # how it was trained
        "behaviour": {"name": sv_cfg.behaviour, "judges": judge_names},
        f"n_{word}_samples": len(harmful.examples),
        "n_benign_samples": len(benign.examples) if benign else 0,
        "rank": sv_cfg.rank, "alpha": sv_cfg.alpha, "target_modules": sv_cfg.target_modules, "layers": sv_cfg.layers,
        "kl_weight": sv_cfg.kl_weight, "steps": len(losses), "final_loss": losses[-1], "shift": shift,
        "strength": strength, "audit": audit_ref,
    }
    if use_ds:  # how it was trained: ranks, ZeRO stage, what each rank held
        meta.update(world_size=world, zero_stage=stage, partition=partition)
    vector_dir = out / "secvec"
    with gathered(params):  # ZeRO-3: the whole vector on every rank, for rank 0 to write
        if main:
            with atomic_dir(vector_dir) as tmp:
                save_security_vector(model, tmp, meta)
                write_probe(tmp / PROBE_FILE, probe_rows)
                record_file_hashes(tmp)
    if main:
        write_text_atomic(out / "shift.json", json.dumps(shift, indent=2) + "\n")
    if use_ds:  # the other ranks end once the vector is written (plain: this process alone trains,
        barrier()  # and a launcher's other ranks wait elsewhere, e.g. in the demo)
    log.info("security vector saved to %s", vector_dir)
    if strength["weak_reasons"] and main:
        log.warning("the security vector in %s is WEAK: stage 2 with it will not block what it did not learn "
                    "(%s)", vector_dir, strength["weak_reasons"][0])
    return TrainSVResult(vector_dir, losses, shift, strength)


def vector_state(params: list) -> list[torch.Tensor]:
    """A copy of the vector's weights, whole (gathered under ZeRO-3: collective)."""
    with gathered(params):
        return [p.detach().clone() for p in params]


def plain_step(model, params, optimizer, scheduler, harm_batches, benign_batches, cfg: Config, word: str,
               pad_id: int, device) -> tuple[dict, int]:
    """One optimizer step in one process: gradient_accumulation_steps micro-batches, each the
    mean of its losses. Returns the step's losses and its non-pad input tokens."""
    sv_cfg, ga = cfg.security_vector, cfg.optim.gradient_accumulation_steps
    acc = {"loss": 0.0, f"{word}_ce": 0.0, "benign_kl": 0.0, "benign_hidden": 0.0}
    tokens = 0
    for _ in range(ga):
        h = to_device(collate(next(harm_batches), pad_id), device)
        tokens += int(h["attention_mask"].sum())
        ce = model(**h).loss
        loss = ce
        kl = hid = torch.zeros((), device=device)
        b = next(benign_batches)
        if b is not None:
            b = to_device(collate(b, pad_id), device)
            tokens += int(b["attention_mask"].sum())
            hidden = sv_cfg.hidden_weight > 0
            on = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=hidden)
            with torch.no_grad(), model.disable_adapter():
                off = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            output_hidden_states=hidden)
            kl = masked_kl(off.logits, on.logits, b["attention_mask"])
            loss = loss + sv_cfg.kl_weight * kl
            if hidden:
                hid = hidden_shift(on.hidden_states, off.hidden_states, b["attention_mask"])
                loss = loss + sv_cfg.hidden_weight * hid
        (loss / ga).backward()
        acc["loss"] += loss.item() / ga
        acc[f"{word}_ce"] += ce.item() / ga
        acc["benign_kl"] += kl.item() / ga
        acc["benign_hidden"] += hid.item() / ga
    if cfg.optim.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return acc, tokens


def deepspeed_step(engine, model, harm_batches, benign_batches, cfg: Config, word: str, pad_id: int, device,
                   world: int) -> tuple[dict, float]:
    """One optimizer step under DeepSpeed (collective): each rank its slice of the global batch.
    A micro-batch's rows of the behaviour and its benign rows go through the engine in one forward
    (one forward, one backward, as ZeRO's hooks count them), the benign rows' vector-off pass
    before it without gradients. Each term is weighted by its tokens over the whole global batch
    (distributed.loss_weight): ranks x micro-batch x accumulation == one batch of the one-process
    loop. DeepSpeed clips and steps. Returns the step's losses (all ranks) and this rank's tokens."""
    sv_cfg, ga = cfg.security_vector, cfg.optim.gradient_accumulation_steps
    hidden = sv_cfg.hidden_weight > 0
    group = []
    for _ in range(ga):
        h, b = next(harm_batches), next(benign_batches)
        batch = to_device(collate(h + (b or []), pad_id), device)
        batch["labels"][len(h):] = IGNORE_INDEX  # the CE is the behaviour's rows' alone
        group.append((batch, len(h)))
    n_ce = [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch, _ in group]
    n_kl = [int(batch["attention_mask"][nh:].sum()) for batch, nh in group]
    tot_ce, tot_kl = (max(t, 1.0) for t in all_reduce_sum([float(sum(n_ce)), float(sum(n_kl))]))
    local = [0.0, 0.0, 0.0]  # CE, KL, hidden term: this rank's share of the global batch's means
    tokens = 0
    for i, ((batch, nh), c, k) in enumerate(zip(group, n_ce, n_kl)):
        ids, att = batch["input_ids"], batch["attention_mask"]
        tokens += int(att.sum())
        benign = ids.shape[0] > nh
        if benign:
            with torch.no_grad(), model.disable_adapter():
                off = model(input_ids=ids[nh:], attention_mask=att[nh:], output_hidden_states=hidden)
        res = engine(input_ids=ids, attention_mask=att, labels=batch["labels"], output_hidden_states=hidden and benign)
        ce = res.loss if c else res.logits.sum() * 0  # no label token (rows cut to their prompt): 0, forward run
        loss = ce * loss_weight(c, world, tot_ce)
        kl = hid = torch.zeros((), device=ce.device)
        if benign:
            kl = masked_kl(off.logits, res.logits[nh:], att[nh:])
            loss = loss + sv_cfg.kl_weight * kl * loss_weight(k, world, tot_kl)
            if hidden:
                hid = hidden_shift(tuple(x[nh:] for x in res.hidden_states), off.hidden_states, att[nh:])
                loss = loss + sv_cfg.hidden_weight * hid * loss_weight(k, world, tot_kl)
        engine.backward(loss)
        engine.step(boundary=i == ga - 1)
        local[0] += float(ce.detach()) * c / tot_ce
        local[1] += float(kl.detach()) * k / tot_kl
        local[2] += float(hid.detach()) * k / tot_kl
    ce_mean, kl_mean, hid_mean = all_reduce_sum(local)
    acc = {"loss": ce_mean + sv_cfg.kl_weight * kl_mean + sv_cfg.hidden_weight * hid_mean, f"{word}_ce": ce_mean,
           "benign_kl": kl_mean, "benign_hidden": hid_mean}
    return acc, tokens


def check_train_sv_zero(cfg: Config, ds: dict) -> None:
    """What stage 1 cannot do under DeepSpeed, refused before any process group or load (stage 2's
    own refusals, dist_secvec.stage2.check_stage2, apply too)."""
    if zero_stage(ds) == 3 and cfg.model.quantization in ("nf4", "fp4") and not torch.cuda.is_available():
        raise ConfigError(f"config key 'model.quantization': after training, stage 1 measures and generates with "
                          f"the {cfg.model.quantization} base in inference mode, for which bitsandbytes repacks 4-bit "
                          "weights on a CPU, which a ZeRO-3 partition cannot hold; train the vector on GPUs, with ZeRO "
                          "stage 0-2, or with model.quantization=none")


def hidden_shift(on: tuple, off: tuple, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers and benign tokens of |h_on - h_off|^2 / |h_off|^2: how far the vector moves
    the residual stream on benign inputs. The KL term only pins the outputs on the KL prompts;
    features the vector moves there can still move on benign inputs it never saw (a new task's
    names), and stage 2 would then teach the core a task that fails once the vector is off."""
    m = mask.to(on[-1].dtype)
    total = 0.0
    for a, b in zip(on[1:], off[1:]):  # [0] is the embedding output, which the vector cannot move
        rel = (a.float() - b.float()).pow(2).sum(-1) / b.float().pow(2).sum(-1).clamp_min(1e-6)
        total = total + (rel * m).sum() / m.sum().clamp_min(1.0)
    return total / max(len(on) - 1, 1)


def split_heldout(rows: list, cfg: Config) -> tuple[list, list, str]:
    """(training rows, held-out rows, where the held-out rows come from): the configured held-out
    file, else a seeded heldout_fraction of the behaviour's rows; with fewer than 10 rows nothing can be
    spared and the training rows are measured instead (said so in the record)."""
    import random

    sv = cfg.security_vector
    if sv.heldout_harmful_data:
        return rows, refuse_text_rows(load_samples(sv.heldout_harmful_data, cfg.data),
                                      "security_vector.heldout_harmful_data"), "security_vector.heldout_harmful_data"
    n = int(round(len(rows) * sv.heldout_fraction))
    if n < 1 or len(rows) < 10:
        if runtime.is_main():
            log.warning("security_vector.heldout_harmful_data is not set and %d %s rows are too few to hold out "
                        "%g of them: the vector's strength is measured on its training rows", len(rows),
                        rows_word(sv.behaviour), sv.heldout_fraction)
        return rows, rows, "the training rows (too few to hold out)"
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:n])
    return ([r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)],
            f"{n} of {len(rows)} rows of security_vector.harmful_data, held out")


def measure_strength(model, tok, probe, probe_rows, pad_id, device, cfg: Config, judges) -> dict:
    """The vector's strength on the held-out rows of its behaviour (dist_secvec.strength), vector on
    and off, judged by `judges` (made from behaviour_judges)."""
    on = answer_stats(model, probe.examples, pad_id, device)
    gen_on = judged_rate(model, tok, probe_rows, cfg, judges)
    with model.disable_adapter():
        off = answer_stats(model, probe.examples, pad_id, device)
        gen_off = judged_rate(model, tok, probe_rows, cfg, judges)
    for prompt, answer in gen_on["examples"]:
        log.debug("vector on: %r -> %r", prompt, answer)
    s = {"n": len(probe.examples), "judges": behaviour_judges(cfg),
         "loss_vector_on": on["loss"], "loss_vector_off": off["loss"],
         "explained": 1.0 - on["loss"] / off["loss"] if off["loss"] > 0 else 0.0,
         "start_agreement_vector_on": on["start_agreement"], "start_agreement_vector_off": off["start_agreement"],
         "compliance_vector_on": gen_on["rate"], "compliance_vector_off": gen_off["rate"],
         "thresholds": {k: getattr(cfg.security_vector, k)
                        for k in ("min_compliance", "min_start_agreement", "min_explained")}}
    s["weak_reasons"] = weak_reasons(s, cfg.security_vector, cfg.security_vector.behaviour)
    return s


def behaviour_judges(cfg: Config) -> list[str]:
    """The judges that decide whether an answer shows the vector's behaviour: security_vector.judges,
    else eval.judges (config validation refuses a behaviour other than harm without its judges)."""
    sv = cfg.security_vector
    return list(sv.judges) if sv.judges is not None else list(cfg.eval.judges)
