"""Stage 2's job, built in one place for `dist-secvec finetune` and `dist-secvec profile`.

`setup_stage2` builds the job as finetune runs it: the config's refusals, the process group, the
data, the frozen vector (folded into the base weights or attached as SecVecLinear layers, its
forward path chosen once from `path_options`), the trainable part, optimizer, schedule, engine
(`PlainEngine` or `DeepSpeedEngine`) and the per-row gate. `train_step` runs one optimizer step of
it; `remove_vector` takes the vector out again, bit for bit. finetune adds checkpoints, the
monitor and logging around them; profile times them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch

from dist_secvec import packing, runtime
from dist_secvec.config import Config, resolve_stage_defaults
from dist_secvec.data import TokenizedSet, load_samples, tokenize_samples
from dist_secvec.distributed import (DeepSpeedEngine, PlainEngine, all_reduce_sum, ds_config, gathered,
                                     init_distributed, label_tokens, loss_weight, micro_loss, numel, partition_report,
                                     partitioned_loading, rank_batches, uses_deepspeed, zero_stage)
from dist_secvec.errors import ConfigError, SecurityVectorError, UserError
from dist_secvec.model import add_trainable_adapter, attn_implementation, load_model, load_tokenizer
from dist_secvec.secvec import (PROBE_FILE, PathOptions, attach_security_vector, check_fingerprint, describe_paths,
                                detach_security_vector, fold_partitioned, fold_security_vector, load_security_vector,
                                layers_off, only_vector, path_calls, row_gate, security_vector_off, unfold_from_disk,
                                unfold_security_vector, vector_digest, vector_parts, vectors_record)
from dist_secvec.strength import describe, explained_share, score_rows, score_rows_each
from dist_secvec.training import build_optimizer, pick_device, to_device, total_steps

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """NaN/inf loss or gradients: the run stops, the last checkpoint stays as it was."""


def nonfinite_message(step: int) -> str:
    return (f"loss or gradients are not finite at step {step}; lower optim.lr or check the data, then resume from "
            "the last checkpoint (checkpoint.resume=latest), or set optim.nonfinite=skip")


# ---------------------------------------------------------------------------------------------
# what the config decides


def gates(cfg: Config, sv) -> bool:
    """Whether stage 2 gates the vector per row: security_vector.gate, and a threshold to gate by
    (for several vectors, one for each)."""
    placed = all("explained" in (p.meta.get("strength") or {}) for p in vector_parts(sv))
    return cfg.security_vector.gate and (cfg.security_vector.gate_threshold is not None or placed)


def fold_choice(cfg: Config, sv=None) -> tuple[bool, str]:
    """Fold the vector into the base weights only when they are frozen and unquantized (a LoRA on a
    16/32-bit base) and it acts on every row; full fine-tuning changes W every step and a quantized
    W cannot hold it."""
    if not cfg.security_vector.fold:
        return False, "security_vector.fold=false"
    if sv is not None and gates(cfg, sv):
        return False, "security_vector.gate switches the vector per row"
    if sv is not None and cfg.data.audit != "off":
        return False, "data.audit scores every row with the vector off and on"
    if cfg.adapter.type != "lora":
        return False, "full fine-tuning trains the base weights"
    if cfg.model.quantization != "none":
        return False, f"{cfg.model.quantization} base weights"
    return True, "LoRA on a frozen unquantized base"


def path_options(cfg: Config, sv) -> PathOptions:
    """What the attached vector's layers may take (secvec.layer.choose_path picks per layer)."""
    v = cfg.security_vector
    # the per-row gate does not narrow the choice: micro-batches whose rows all have the vector on
    # take the chosen path, all off skip the vector, only mixed ones gate (Stage2.batches, train_step)
    return PathOptions(backend=v.backend, fused_lora=v.fused_lora, weight_delta=v.weight_delta,
                       rows_per_call=cfg.optim.micro_batch_size * cfg.data.max_length)


def check_vector_config(cfg: Config, sv) -> None:
    """Stage 2 takes the vector's rank and target modules from its own files; a value the user set
    in security_vector.rank / security_vector.target_modules (None = not set, see config.py) states
    which vector they expect, and a vector of another shape is refused in one line naming the key,
    both values and the fix (called before the model loads: CLI preflight and setup_stage2). Several
    vectors: each is checked."""
    for part in vector_parts(sv):
        _check_one_vector_config(cfg, part)


def _check_one_vector_config(cfg: Config, sv) -> None:
    want, path = cfg.security_vector, sv.path
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


def check_kernel_ranks(cfg: Config, sv, device: torch.device) -> None:
    """The Triton kernels take ranks up to MAX_RANK: an attached vector above it (several: their
    ranks summed on a layer) or a LoRA fused with it is refused before the model loads, where
    Triton would compute them (CUDA, security_vector.backend auto or triton)."""
    from dist_secvec.kernels.dispatch import resolve_backend
    from dist_secvec.kernels.host import MAX_RANK

    if fold_choice(cfg, sv)[0] or resolve_backend(cfg.security_vector.backend, device) != "triton":
        return
    several = len(vector_parts(sv)) > 1
    if sv.rank > MAX_RANK:
        what = f"the vectors' ranks sum to {sv.rank} on a layer" if several else f"the vector has rank {sv.rank}"
        raise ConfigError(f"config key 'security_vector.path': {what}, above the {MAX_RANK} the Triton kernel "
                          "takes; set security_vector.backend=torch, or use " + ("fewer or smaller vectors"
                                                                                if several else "a smaller vector"))
    if cfg.adapter.type == "lora" and cfg.security_vector.fused_lora and cfg.adapter.rank > MAX_RANK:
        raise ConfigError(f"config key 'adapter.rank': {cfg.adapter.rank} is above the {MAX_RANK} the fused vector "
                          "+ LoRA kernel takes; set security_vector.fused_lora=false or a smaller adapter.rank")


def check_stage2(cfg: Config, ds: Optional[dict], monitor: bool) -> None:
    """The combinations stage 2 refuses before any process group starts; `monitor`: also those of
    the monitor, which only finetune runs."""
    stage = zero_stage(ds) if ds else None
    if stage == 3 and cfg.model.quantization == "int8":
        raise ConfigError("config keys 'model.quantization=int8' and ZeRO stage 3: 8-bit bases train wrong under "
                          "ZeRO-3; use model.quantization=nf4 or ZeRO stage 2")
    fp16 = bool(ds and ds.get("fp16", {}).get("enabled"))
    if ds and cfg.optim.nonfinite == "skip" and stage == 0 and (fp16 or ds.get("bf16", {}).get("enabled")):
        raise ConfigError(f"config key 'optim.nonfinite': skip cannot drop a step cleanly under ZeRO stage 0 with "
                          f"{cfg.model.dtype} weights (DeepSpeed's 16-bit optimizer wrapper); use a ZeRO stage of "
                          "1-3, or stop (the default) and resume from the last checkpoint")
    if not monitor:
        return
    if cfg.monitor.generate and cfg.monitor.rule != "none" and stage == 3:
        raise ConfigError("config key 'monitor.generate': generating during a ZeRO-3 run is not supported (every "
                          "rank would have to generate in step); set monitor.generate=false (the probe loss is "
                          "still watched) or use ZeRO stage 0-2")
    if cfg.monitor.generate and cfg.monitor.rule != "none" and cfg.model.quantization in ("nf4", "fp4") \
            and not torch.cuda.is_available():
        raise ConfigError("config key 'monitor.generate': generating from a 4-bit base during training needs a GPU "
                          "(on a CPU bitsandbytes repacks the weights for inference); set monitor.generate=false")


# ---------------------------------------------------------------------------------------------
# the job


@dataclass
class Stage2:
    cfg: Config  # stage defaults filled in
    model: Any  # engine.module
    engine: Any  # PlainEngine or DeepSpeedEngine
    tok: Any
    train: TokenizedSet
    sv: Any  # the SecurityVector (several: their composed VectorSet, secvec.compose), or None
    sv_layers: list  # attached SecVecLinear layers
    folded: list  # FoldedLayer per base weight holding the vector
    params: list  # the trainable parameters (the optimizer's)
    optimizer: Any
    scheduler: Any
    steps: int  # optimizer steps of the whole run
    digest: Optional[str]  # the vector's digest after attach/fold
    trainable: int
    total: int
    partition: list  # partition_report per rank
    gate: Optional[dict] = None  # {id(example): 1.0 vector on | 0.0 off}; None = every row on
    gate_info: Optional[dict] = None
    row_weight: Optional[dict] = None  # data.audit=downweight: {id(example): weight of its loss}; None = all 1
    audit_info: Optional[dict] = None  # data.audit: what was flagged and done (run info)
    ds: Optional[dict] = None  # the DeepSpeed config; None = one plain process
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    hf_ds: Any = None  # HfDeepSpeedConfig, alive while a ZeRO-3 16-bit model is in use
    # the monitor's rows (setup_stage2(monitor=True))
    probe_rows: list = field(default_factory=list)
    probe: Optional[list] = None
    evalset: Optional[list] = None

    @property
    def stage(self) -> Optional[int]:
        return zero_stage(self.ds) if self.ds else None

    @property
    def use_ds(self) -> bool:
        return self.ds is not None

    @property
    def fp16(self) -> bool:
        """fp16 under DeepSpeed: its dynamic loss scaling skips overflow steps itself."""
        return bool(self.ds and self.ds.get("fp16", {}).get("enabled"))

    @property
    def mode(self) -> str:
        return "folded" if self.folded else "attached" if self.sv_layers else "off"

    @property
    def path_choice(self) -> Optional[str]:
        """How the vector is computed: per attached layer its path (describe_paths), or "folded"."""
        return describe_paths(self.sv_layers) if self.sv_layers else ("folded" if self.folded else None)

    @property
    def vectors_info(self) -> Optional[list]:
        """Every vector in use, for the run info: path, weights' sha256, base fingerprint, behaviour and
        judges, strength, and the modules it was active on (secvec.vectors_record)."""
        return vectors_record(self.sv) if self.sv is not None else None

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    @property
    def sv_params(self) -> list:
        return [p for layer in self.sv_layers for p in (layer.secvec_A, layer.secvec_B)]

    def row_key(self, e: dict) -> tuple:
        """What rows must share to be computed alike: the gate's vector on/off and data.audit's weight."""
        return (self.gate[id(e)] if self.gate is not None else 0.0,
                self.row_weight.get(id(e), 1.0) if self.row_weight else 1.0)

    def batches(self, skip: int = 0) -> Iterator[list]:
        """This rank's micro-batches in finetune's order (the same seed gives the same batches). With
        the gate or row weights, each optimizer step's rows are grouped by row_key across its
        micro-batches and ranks, so most micro-batches have the vector all on or all off."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        alike = self.gate is not None or bool(self.row_weight)
        return rank_batches(self.train.examples, self.cfg.optim.micro_batch_size, self.rank, self.world, gen,
                            self.cfg.data.shuffle, skip=skip, key=self.row_key if alike else None,
                            per_step=self.cfg.optim.gradient_accumulation_steps)

    def build_batch(self, examples: list) -> tuple[dict, list]:
        """A micro-batch's model inputs and the samples in each row (dist_secvec.packing): with
        data.packing, a row holds only samples alike for the gate and data.audit's weight."""
        return packing.build_batch(examples, self.pad_id, self.cfg.data.packing, self.cfg.data.max_length,
                                   self.row_key, packing.is_flash(attn_implementation(self.model)))

    def vector_digest(self) -> Optional[str]:
        """The vector's digest now (collective under ZeRO-3: it gathers the vector)."""
        layers, params = self.sv_layers or self.folded, self.sv_params
        if not layers:
            return None
        with gathered(params):
            return vector_digest(layers)

    def check_frozen(self) -> None:
        """The vector's parameters are never trainable, never in an optimizer, never get a gradient."""
        sv_params = self.sv_params
        ids = {id(p) for p in sv_params}
        if any(p.requires_grad for p in sv_params) or ids & self.engine.optimizer_param_ids():
            raise RuntimeError("security vector parameters are trainable or in the optimizer")  # a bug
        if any(p.grad is not None for p in sv_params):
            raise RuntimeError("a gradient was allocated for the security vector")


def setup_stage2(cfg: Config, *, monitor: bool = False, tok=None, train: Optional[TokenizedSet] = None,
                 ds_timers: bool = False) -> Stage2:
    """Stage 2's job from the config, as finetune trains it; every rank calls this.

    monitor: also read the monitor's rows (harmful probe, data.eval) and refuse what it cannot do.
    tok, train: an already loaded tokenizer and tokenized data.train (profile's variants share them).
    ds_timers: DeepSpeed's wall-clock timers on (communication time), their prints kept off stdout.
    Files are read before the model loads: bad data or a bad vector cost seconds."""
    cfg = resolve_stage_defaults(cfg, "finetune")
    use_ds = uses_deepspeed(cfg)
    ds = ds_config(cfg, runtime.world_size()) if use_ds else None  # bad JSON: refused before any process group
    check_stage2(cfg, ds, monitor)
    if cfg.data.packing:  # before the model loads: the configured kernel; after: the one it runs
        packing.check_support(cfg.model.attn_implementation)
    if ds is not None and ds_timers:
        ds["wall_clock_breakdown"] = True
    stage = zero_stage(ds) if ds else None
    if use_ds:
        init_distributed(cfg)
    rank, world = runtime.rank(), runtime.world_size()
    runtime.seed_everything(cfg.seed)
    device = pick_device()
    rows = None
    if train is None:  # bad rows: before any load
        rows = load_samples(cfg.data.train, cfg.data, cfg.data.split, cfg.data.max_samples)
    audit_rows = audit_threshold = None
    sv = None
    if cfg.security_vector.path:  # files, hashes and shape checked before the model loads
        sv = load_security_vector(cfg.security_vector.path)  # a list: the vectors composed (secvec.compose)
        check_vector_config(cfg, sv)
        check_kernel_ranks(cfg, sv, device)
        for part in vector_parts(sv):  # each vector's own strength record
            strength, weak = describe(part.meta)
            log.info("security vector %s (%s): %s", part.path, part.behaviour["name"], strength)
            if weak:
                log.warning("the security vector %s is WEAK: stage 2 will teach the core what it does not explain; "
                            "retrain it (train-sv, see strength.weak_reasons in its secvec.json)", part.path)
        if cfg.data.audit != "off":
            from dist_secvec.audit import resolve_thresholds

            audit_threshold = resolve_thresholds(cfg, sv)  # a vector that places none: refused before the model loads
    probe_rows, eval_rows = monitor_rows(cfg) if monitor else ([], [])
    if tok is None:
        tok = load_tokenizer(cfg.model)
    if train is None and audit_threshold is not None:  # the report names each row's file and line
        from dist_secvec.audit import tokenize_rows

        train, *audit_rows = tokenize_rows(tok, rows, cfg.data)
        log.info(train.report("train data"))
    elif train is None:
        train = tokenize_samples(tok, rows, cfg.data, cache=True)
        log.info(train.report("train data"))
    elif cfg.data.audit != "off":
        log.info("data.audit=%s: the rows passed in are trained as given (not audited here)", cfg.data.audit)
    probe = evalset = None
    if monitor:
        probe = monitor_set(tok, probe_rows, cfg, "harmful probe")
        if probe is None and cfg.monitor.rule != "none":
            log.info("no harmful probe (monitor.harmful_probe unset%s): stage 2 cannot watch the harm it learns",
                     "" if not cfg.security_vector.path else ", and the vector has no probe.jsonl")
        evalset = monitor_set(tok, eval_rows, cfg, "eval data")

    hf_ds = partitioned_loading(ds, cfg.model.quantization)  # ZeRO-3: no rank loads the whole 16-bit model
    model = load_model(cfg.model, device, for_training=True)
    model = add_trainable_adapter(model, cfg.adapter)
    if cfg.data.packing:
        packing.check_support(attn_implementation(model))
    sv_layers, folded = [], []
    if sv is not None:
        check_fingerprint(sv, model, cfg.model.path)  # each vector against this base
        if len(vector_parts(sv)) > 1:
            log.info("security vectors: %d composed into one delta on %d modules (ranks concatenated per module)",
                     len(vector_parts(sv)), len(sv.weights))
        fold, why = fold_choice(cfg, sv)
        if fold:
            folded = fold_partitioned(model, sv) if stage == 3 else fold_security_vector(model, sv)
            log.info("security vector %s: folded into %d frozen base weights (%s), rank %d, scale %g",
                     sv.path, len(folded), why, sv.rank, sv.scale)
        else:
            sv_layers = attach_security_vector(model, sv, path_options(cfg, sv))
            log.info("security vector %s: %d SecVecLinear layers (not folded: %s), rank %d, scale %g, "
                     "active and frozen; paths: %s", sv.path, len(sv_layers), why, sv.rank, sv.scale,
                     describe_paths(sv_layers))
    sv_params = [p for layer in sv_layers for p in (layer.secvec_A, layer.secvec_B)]
    params = [p for p in model.parameters() if p.requires_grad]
    if any(f.linear.weight.requires_grad for f in folded):
        raise RuntimeError("a base weight holding the folded security vector is trainable")
    job = Stage2(cfg=cfg, model=model, engine=None, tok=tok, train=train, sv=sv, sv_layers=sv_layers, folded=folded,
                 params=params, optimizer=None, scheduler=None, steps=0, digest=None, trainable=0, total=0,
                 partition=[], ds=ds, rank=rank, world=world, device=device, hf_ds=hf_ds, probe_rows=probe_rows,
                 probe=probe, evalset=evalset)
    job.digest = job.vector_digest()
    job.trainable, job.total = sum(numel(p) for p in params), sum(numel(p) for p in model.parameters())
    log.info("parameters: %d trainable of %d (%s)%s", job.trainable, job.total,
             "full fine-tuning" if cfg.adapter.type == "none" else f"LoRA r={cfg.adapter.rank}",
             f"; DeepSpeed ZeRO-{stage} on {world} rank(s)" if use_ds else "")

    job.steps = total_steps(len(train.examples), cfg.optim, world)
    job.optimizer, job.scheduler = build_optimizer(params, cfg.optim, job.steps)
    if use_ds:
        quiet = contextlib.redirect_stdout(io.StringIO()) if ds_timers else contextlib.nullcontext()
        with quiet:  # with its timers on ZeRO prints its init times
            job.engine = DeepSpeedEngine(model, params, job.optimizer, job.scheduler, ds)
    else:
        job.engine = PlainEngine(model, params, job.optimizer, job.scheduler, cfg.optim.max_grad_norm)
    job.check_frozen()
    if use_ds and cfg.optim.nonfinite == "skip" and job.engine.skip_reason():
        raise ConfigError(f"config key 'optim.nonfinite': skip cannot drop a step cleanly with "
                          f"{job.engine.skip_reason()}; use stop (the default) and resume from the last checkpoint")
    job.model = model = job.engine.module
    sv_ids = {id(p) for p in sv_params}
    job.partition = partition_report({"security_vector": sv_params, "trainable": params,
                                      "frozen": [p for p in model.parameters()
                                                 if not p.requires_grad and id(p) not in sv_ids]})
    if use_ds:
        log.info("rank 0 holds %s", ", ".join(f"{k} {v['held']}/{v['total']}" for k, v in job.partition[0].items()))
    # one scoring of every row (vectors off, each vector on; the untrained core) for the gate and data.audit
    memo: dict = {}

    def scores() -> tuple[list, list[list]]:
        if "scores" not in memo:
            memo["scores"] = score_each_vector(cfg, sv, model, sv_layers, job.train.examples, tok.pad_token_id,
                                               device)
        return memo["scores"]

    if audit_rows is not None and sv_layers:
        from dist_secvec.audit import stage2_audit

        memo["scores"], flagged, job.audit_info = stage2_audit(cfg, sv, audit_rows[0], audit_rows[1], train.examples,
                                                               scores, audit_threshold)
        apply_audit(job, flagged, memo)
    if sv_layers and cfg.security_vector.gate:
        job.gate, job.gate_info = gate_rows(cfg, sv, model, sv_layers, job.train.examples, tok.pad_token_id, device,
                                            scores)
    elif sv_layers:
        log.info("security_vector.gate=false: every row trains with the vector on")
    return job


def apply_audit(job: Stage2, flagged: list, memo: dict) -> None:
    """data.audit=drop: the flagged rows out of the data (and the schedule rebuilt for the rows left);
    downweight: their loss weighted audit.weight; report: nothing changes."""
    cfg, examples = job.cfg, job.train.examples
    if cfg.data.audit == "downweight":
        job.row_weight = {id(e): cfg.audit.weight for e, f in zip(examples, flagged) if f}
    elif cfg.data.audit == "drop" and any(flagged):
        keep = [i for i, f in enumerate(flagged) if not f]
        off, ons = memo["scores"]
        memo["scores"] = ([off[i] for i in keep], [[on[i] for i in keep] for on in ons])  # the gate's, rows kept
        job.train = dataclasses.replace(job.train, examples=[examples[i] for i in keep])
        job.steps = total_steps(len(job.train.examples), cfg.optim, job.world)
        # a fresh schedule over the steps left, on the same optimizer (no step has run yet)
        from transformers import get_scheduler

        job.scheduler = get_scheduler(cfg.optim.schedule, job.optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                      num_training_steps=job.steps)
        job.engine.scheduler = job.scheduler
        if job.use_ds:
            job.engine.engine.lr_scheduler = job.scheduler  # DeepSpeed steps the schedule it holds
        job.audit_info["rows_trained"] = len(keep)
        log.info("data.audit=drop: %d rows left to train on, %d optimizer steps", len(keep), job.steps)


def score_each_vector(cfg: Config, sv, model, sv_layers: list, examples: list, pad_id: int,
                      device) -> tuple[list, list[list]]:
    """Every row's answer loss with the vectors off and with each vector alone on: (loss_off,
    [loss_on per vector]); one vector: score_rows, several: score_rows_each (secvec.only_vector)."""
    progress = {"desc": "scoring rows", "enabled": cfg.logging.progress}
    parts = vector_parts(sv)
    if len(parts) == 1:
        off, on = score_rows(model, examples, pad_id, device, cfg.audit.batch_size, lambda: security_vector_off(model),
                             progress=progress)
        return off, [on]
    return score_rows_each(model, examples, pad_id, device, cfg.audit.batch_size, lambda: security_vector_off(model),
                           [functools.partial(only_vector, sv_layers, i) for i in range(len(parts))],
                           progress={**progress, "desc": "scoring rows per vector"})


def gate_rows(cfg: Config, sv, model, sv_layers: list, examples: list, pad_id: int, device,
              scores: Optional[Callable[[], tuple[list, list[list]]]] = None) -> tuple[dict, dict]:
    """security_vector.gate: {id(example): 1.0 (vector on) or 0.0 (off)} from each row's explained
    share, scored once with the untrained core, and what was decided (for the run info).
    `scores`: the rows' (loss_off, [loss_on per vector]), shared with data.audit (score_each_vector).

    Several vectors: each row is scored against each vector alone (secvec.only_vector), by that
    vector's own threshold; a row any of them explains trains with all of them on (the composed
    delta is one per layer; the others, confined by their KL term, barely move it), the rest with
    all off. The run info counts the rows each vector explains."""
    parts = vector_parts(sv)
    thresholds = []
    for part in parts:
        strength = part.meta.get("strength") or {}
        threshold = cfg.security_vector.gate_threshold
        if threshold is None:
            if "explained" not in strength:
                log.warning("security_vector.gate: the vector %s records no held-out strength to place the threshold "
                            "(an older train-sv): every row trains with the vector on; set "
                            "security_vector.gate_threshold (e.g. 0.4) to gate", part.path)
                return None, {"threshold": None, "rows_vector_on": len(examples), "rows_vector_off": 0}
            threshold = 0.5 * strength["explained"]
        thresholds.append(threshold)
    off, ons = scores() if scores is not None else score_each_vector(cfg, sv, model, sv_layers, examples, pad_id,
                                                                     device)
    explains = [[explained_share(f, a) >= t for f, a in zip(off, on)] for on, t in zip(ons, thresholds)]
    gate = {id(e): 1.0 if any(col[j] for col in explains) else 0.0 for j, e in enumerate(examples)}
    n_on = int(sum(gate.values()))
    info = {"threshold": thresholds[0] if len(parts) == 1 else thresholds, "rows_vector_on": n_on,
            "rows_vector_off": len(examples) - n_on}
    if len(parts) == 1:
        log.info("security_vector.gate: %d of %d rows are explained by the vector (share >= %.2f) and train with it "
                 "on; %d train with it off", n_on, len(examples), thresholds[0], len(examples) - n_on)
        return gate, info
    info["per_vector"] = [{"path": p.path, "threshold": t, "rows_explained": sum(col)}
                          for p, t, col in zip(parts, thresholds, explains)]
    log.info("security_vector.gate: %d of %d rows are explained by at least one of the %d vectors (%s) and train "
             "with them on; %d train with them off", n_on, len(examples), len(parts),
             ", ".join(f"{p.path}: {sum(col)} rows, share >= {t:.2f}"
                       for p, t, col in zip(parts, thresholds, explains)),
             len(examples) - n_on)
    return gate, info


def monitor_rows(cfg: Config) -> tuple[list, list]:
    """Stage 2's watched rows (read before any model loads): the harmful probe (monitor.harmful_probe,
    else the vectors' own held-out rows: the first monitor.max_rows of each) and data.eval; none
    when monitor.rule=none."""
    if cfg.monitor.rule == "none":
        return [], []
    probe_files = list(cfg.monitor.harmful_probe)
    if probe_files:
        probe = load_samples(probe_files, "auto")[: cfg.monitor.max_rows]
    else:
        sv_probes = [Path(os.path.expanduser(p)) / PROBE_FILE for p in cfg.security_vector.paths()]
        probe = [row for f in sv_probes if f.is_file()
                 for row in load_samples([str(f)], "auto")[: cfg.monitor.max_rows]]
    evalrows = load_samples(cfg.data.eval, cfg.data, cfg.data.split, cfg.data.max_samples) if cfg.data.eval else []
    return probe, evalrows


def monitor_set(tok, rows: list, cfg: Config, name: str) -> Optional[list[dict]]:
    if not rows:
        return None
    ts = tokenize_samples(tok, rows, cfg.data)
    log.info(ts.report(name))
    return ts.examples


# ---------------------------------------------------------------------------------------------
# one optimizer step


@dataclass
class StepResult:
    loss: float  # token mean over the global batch (all ranks, all micro-batches)
    skipped: bool  # non-finite under optim.nonfinite=skip: gradients dropped, no update
    grad_norm: Optional[float]
    n_tokens: float  # label tokens of the global batch
    batches: list  # this rank's collated micro-batches
    counts: list  # label tokens of each of them
    n_inputs: int = 0  # this rank's input tokens, padding not counted


def weighted_micro_loss(engine, batch: dict, n: int, weights: torch.Tensor) -> torch.Tensor:
    """micro_loss with each row's token losses times its weight (data.audit=downweight), still
    divided by all n label tokens: the other rows' gradients are what they would be without it."""
    import torch.nn.functional as F

    from dist_secvec.data import IGNORE_INDEX

    logits = engine(**packing.model_inputs(batch)).logits[:, :-1]  # packed rows: their position ids too
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0), reduction="none") * mask
    return (ce.sum(1) * weights.to(ce.device, ce.dtype)).sum() / max(n, 1)


def _untimed(phase: str) -> ContextManager:
    return contextlib.nullcontext()


def micro_gates(job: Stage2, firsts: list[list]) -> list[ContextManager]:
    """How each micro-batch of a step runs the vector (per-row gate): on where every row has it on
    (the layers' chosen path), off where none has (no vector compute), gated row by row where they
    mix. Decided over all ranks alike (one all-reduce), so that under ZeRO-3 every rank runs the
    same modules in the same order."""
    if job.gate is None:
        return [contextlib.nullcontext() for _ in firsts]
    rows = [torch.tensor([job.gate[id(e)] for e in f]) for f in firsts]
    tally = [float(x) for r in rows for x in (r.sum(), r.numel())]
    if job.use_ds:
        tally = all_reduce_sum(tally)
    out = []
    for r, on, n in zip(rows, tally[0::2], tally[1::2]):
        if on == n:
            out.append(contextlib.nullcontext())
        elif on == 0:
            out.append(layers_off(job.sv_layers))
        else:
            out.append(row_gate(job.sv_layers, r))
    return out


def train_step(job: Stage2, micro_batches: Iterator[list], step: int,
               phase: Optional[Callable[[str], ContextManager]] = None) -> StepResult:
    """One optimizer step: gradient_accumulation_steps micro-batches, each with its rows' gate,
    weighted by label tokens so that ranks x micro-batch x accumulation == one large batch; the
    non-finite verdict (the same on every rank), then clip + update, or a skipped step, or
    NonFiniteError (optim.nonfinite). Collective under DeepSpeed. `phase(name)` wraps the data,
    forward, backward and optimizer parts (profile times them)."""
    timed = phase or _untimed
    cfg, engine, world = job.cfg, job.engine, job.world
    ga = cfg.optim.gradient_accumulation_steps
    with timed("data"):
        raw = [next(micro_batches) for _ in range(ga)]
        built = [job.build_batch(r) for r in raw]
        group = [to_device(b, job.device) for b, _ in built]
        counts, n_tokens = label_tokens(group)
        firsts = [[row[0] for row in rows] for _, rows in built]  # a packed row's samples share gate and weight
        modes = micro_gates(job, firsts)
    local_loss, finite = 0.0, True
    for i, (b, n) in enumerate(zip(group, counts)):
        weights = [job.row_weight.get(id(e), 1.0) for e in firsts[i]] if job.row_weight else None
        with modes[i]:  # forward and backward: checkpointing recomputes there
            with timed("forward"):
                if weights is None or all(w == 1.0 for w in weights):
                    loss = micro_loss(engine, b, n)  # mean over this micro-batch's n label tokens
                else:
                    loss = weighted_micro_loss(engine, b, n, torch.tensor(weights))
                finite = finite and bool(torch.isfinite(loss.detach()))
            with timed("backward"):
                engine.backward(loss * loss_weight(n, world, n_tokens))
        if i < ga - 1:
            with timed("optimizer"):
                engine.step(boundary=False)
        local_loss += float(loss.detach()) * n / n_tokens
    grad_norm = None
    with timed("optimizer"):
        step_loss, bad = (all_reduce_sum([local_loss, 0.0 if finite else 1.0]) if job.use_ds
                          else (local_loss, 0.0 if finite else 1.0))
        if not job.use_ds and finite:
            # one process: the gradients checked (by clipping's total norm when clipping is on);
            # DeepSpeed clips and checks them itself (step_applied below)
            grads_finite, _ = engine.check_grads()
            if not grads_finite:
                bad = 1.0
        skip = cfg.optim.nonfinite == "skip"
        if bad and not skip:
            raise NonFiniteError(nonfinite_message(step))
        if bad:
            engine.skip_step()  # every rank: the gradients dropped, no update, the schedule not advanced
        else:
            grad_norm = engine.step(boundary=True)
            if job.use_ds and not job.fp16 and not engine.step_applied():
                # the ZeRO optimizer found a non-finite gradient norm (finite loss) and dropped the step
                if not skip:
                    raise NonFiniteError(nonfinite_message(step))
                bad = 1.0
    n_inputs = sum(len(e["input_ids"]) for r in raw for e in r)
    return StepResult(step_loss, bool(bad), grad_norm, n_tokens, group, counts, n_inputs)


# ---------------------------------------------------------------------------------------------
# the end


def remove_vector(job: Stage2) -> Optional[dict]:
    """The vector out of the trained model, exactly as it went in and without gradients: attached
    layers detached, folded weights restored to the original bits. Returns the forwards per path
    of the attached layers (None when none were attached)."""
    job.check_frozen()
    if job.vector_digest() != job.digest:
        raise SecurityVectorError("the security vector changed during stage 2; the run is not safe to use")
    paths = path_calls(job.sv_layers) if job.sv_layers else None
    if job.sv_layers:
        detach_security_vector(job.model)
    if job.folded:
        if any(f.linear.weight.grad is not None for f in job.folded):
            raise RuntimeError("a gradient was allocated for a base weight holding the folded security vector")
        if job.stage == 3:
            unfold_from_disk(job.folded, job.cfg.model.path)
        else:
            unfold_security_vector(job.model, job.folded)  # the original base weights, bit for bit
    return paths
