"""Typed run configuration: YAML recipes plus `key.sub=value` overrides.

Every stage (train-sv, finetune, eval, export, demo) reads one `Config`. Parsing and validation
import nothing heavy (no torch), so a typo in a config fails in well under a second with one line
that names the key and what is allowed (exit code 2, see `errors.ConfigError`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_secvec.errors import ConfigError

# The projections of Llama-style blocks: all attention and MLP linears.
DEFAULT_SV_RANK = 8  # stage 1's vector rank when security_vector.rank is not set
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")


@dataclass
class ModelConfig:
    path: str = ""  # local model directory or hub id
    # a GGUF checkpoint (.gguf file; relative to model.path when that is set): converted once to a
    # safetensors directory in the cache ($DIST_SECVEC_CACHE/gguf), which model.path then names
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantization: str = "none"  # none | nf4 | fp4 | int8 (bitsandbytes)
    compute_dtype: str = "bfloat16"  # 4-bit matmul compute dtype
    quant_storage: str = "bfloat16"  # 4-bit storage dtype; must be a float type under ZeRO-3
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (bitsandbytes double quant)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more compute)
    trust_remote_code: bool = False  # let transformers run the model directory's own modelling code
    # the attention kernel from_pretrained gets: auto (transformers' choice, sdpa where the model has
    # it) | eager | sdpa | flash_attention_2 (needs the flash_attn package, a CUDA GPU and a 16-bit
    attn_implementation: str = "auto"  # model.dtype); the run info records the one used


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # local JSON/JSONL/CSV/Parquet/Arrow files, save_to_disk directories or hub names
    # stage 2: rows whose loss (vector off and on) is logged at each monitor check
    eval: list[str] = field(default_factory=list)
    split: str = "train"  # split of a hub dataset
    format: str = "auto"  # auto | prompt_response | alpaca | chat | sharegpt | prompt_completion | text
    # field -> the column (or message key) holding it in the files, e.g. {prompt: question, response: answer}
    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # role name in the files -> system | user | assistant | tool
    train_on: str = "all_assistant"  # loss on: all_assistant (every assistant turn) | last_assistant | all (every token)
    template: str = "auto"  # auto (tokenizer's chat template when it has one) | chat | plain
    chat_template: Optional[str] = None  # a Jinja file used instead of the tokenizer's chat template
    plain_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"  # no chat template: the text before each answer ({prompt}: the user turn)
    max_length: int = 512  # tokens per row; longer rows lose their end (counted); rows left with no supervised token are dropped
    cache: bool = True  # tokenize the training sets once: kept in $DIST_SECVEC_CACHE/tokenized for later runs and ranks
    num_proc: Optional[int] = None  # processes that tokenize (unset: one per CPU core, up to 8, for large sets)
    shuffle: bool = True  # shuffle rows every epoch (seeded by `seed`)
    max_samples: Optional[int] = None  # use only the first N training rows
    # stage 2: score every row with the vector off and on before the first step (as
    # `dist-secvec audit` does) and flag those the vector explains (audit.threshold):
    audit: str = "off"  # off | report (written to output_dir/audit) | drop (flagged rows left out) | downweight
    # stage 2: pack each micro-batch's rows several to a sequence of up to max_length tokens (the
    # width that leaves the least padding); no token attends across samples: the same loss, less padding
    packing: bool = False


@dataclass
class SecurityVectorConfig:
    # stage 2: the trained vector directory, or a list of them (all active and frozen together,
    # composed into one delta per layer, see docs/protection.md); None = no vector
    path: typing.Union[str, list[str], None] = None
    # rank and target_modules: None = not set by the user. Stage 1 then trains a rank-8
    # (DEFAULT_SV_RANK) vector on every linear layer of the model (model.linear_targets); stage 2 takes both from the vector's own files,
    # and a value that is set must match the vector (a one-line error otherwise, before the model
    # loads). None, not a default value, marks "unset" so that the mark survives Config.to_dict,
    # save_config and configs built from another config (the demo, the experiment runner).
    rank: Optional[int] = None  # the vector's LoRA rank (unset: 8 in stage 1, the vector's own in stage 2)
    alpha: float = 16.0  # LoRA alpha: the vector's scale is alpha / rank
    target_modules: Optional[list[str]] = None  # module names the vector adapts (unset: every linear layer but the output head)
    dropout: float = 0.0  # stage 1: LoRA dropout while the vector trains
    layers: Optional[list[int]] = None  # transformer block indices to adapt (None = all)
    # stage 1: the behaviour the vector learns, recorded in its secvec.json with the judges that
    # decide it: harm, or any other name (e.g. hallucination), which then needs its judges
    behaviour: str = "harm"
    # stage 1: who decides that an answer shows the behaviour in the strength check (as eval.judges);
    # unset: eval.judges (refusal by default) for harm, required for any other behaviour
    judges: Optional[list[str]] = None
    # stage 1 (train-sv): the prompt + answer rows showing the behaviour the vector learns
    # (harmful answers for harm); the benign set below it must leave unchanged
    harmful_data: list[str] = field(default_factory=list)
    # stage 1: rows on which the vector must not change the output (KL term)
    benign_data: list[str] = field(default_factory=list)
    kl_weight: float = 3.0  # stage 1: weight of the KL term on benign_data
    # weight of the benign hidden-state term: the vector's relative shift of every block's output
    # on the KL rows (train_sv.hidden_shift); 0 = outputs only
    hidden_weight: float = 0.0
    heldout_benign_data: list[str] = field(default_factory=list)  # for the shift report
    # stage 1's strength check (dist_secvec.strength): held-out harmful prompt + answer rows the
    # vector is not trained on; empty = hold out heldout_fraction of harmful_data. They are saved
    # with the vector as the harmful probe stage 2 watches (monitor.harmful_probe).
    heldout_harmful_data: list[str] = field(default_factory=list)
    heldout_fraction: float = 0.1  # share of harmful_data held out when heldout_harmful_data is empty
    early_stop: bool = True  # stop when the held-out harmful loss (vector on) stops falling; keep the best epoch
    patience: int = 2  # epochs without a 1% fall before stopping
    # a vector is strong when, on the held-out harmful rows with the vector on, the judges call at
    # least min_compliance of its answers harmful, it predicts min_start_agreement of the answers'
    # first tokens, and it removes min_explained of their loss (1 - loss_on / loss_off)
    min_compliance: float = 0.8  # share of held-out answers judged harmful with the vector on
    min_start_agreement: float = 0.7  # share of the answers' first 8 tokens it predicts
    min_explained: float = 0.6  # share of their loss it removes
    # stage 2: score every training row once, before the first step (strength.score_rows);
    # rows the vector explains train with it on, the others with it off, so a benign task is not
    # learned through the vector. gate_threshold None = half the vector's held-out explained share.
    # Several vectors: a row any of them explains (each by its own threshold) trains with all on
    gate: bool = True  # stage 2: the vector on only for the rows it explains
    # explained share from which a row counts as explained (unset: half the vector's)
    gate_threshold: Optional[float] = None
    # stage 2: how the vector is computed (secvec.layer.choose_path picks one path per layer at attach)
    backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch | triton
    fold: bool = True  # fold s*B@A into a frozen 16/32-bit base weight once at load (a LoRA on an unquantized base)
    fused_lora: bool = True  # the vector and a trainable LoRA on one layer in one kernel (QLoRA)
    weight_delta: bool = True  # full fine-tuning on the torch backend: x (W + s B A)^T in one Function

    def paths(self) -> list[str]:
        """security_vector.path as a list (one string is one vector; None or [] none)."""
        p = self.path
        return [] if not p else [p] if isinstance(p, str) else list(p)


@dataclass
class AdapterConfig:
    type: str = "none"  # none = full fine-tuning | lora
    rank: int = 16  # the trainable LoRA's rank (adapter.type=lora)
    alpha: float = 32.0  # its scale is alpha / rank
    dropout: float = 0.0  # LoRA dropout (above 0 the fused vector + LoRA kernel is not used in training)
    # module names the LoRA adapts (null: every linear layer but the output head, peft's "all-linear")
    target_modules: Optional[list[str]] = None


@dataclass
class OptimConfig:
    # lr and epochs: None = the stage's default (STAGE_OPTIM_DEFAULTS), resolved when the stage starts
    # and saved in the run's config.yaml
    lr: Optional[float] = None  # peak learning rate (unset: 2e-3 for train-sv, 2e-5 for finetune)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 0  # linear warm-up steps before the schedule
    epochs: Optional[int] = None  # stage 1 with security_vector.early_stop: the most epochs
    max_steps: Optional[int] = None  # overrides epochs when set
    micro_batch_size: int = 4  # rows per forward on each rank
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: Optional[float] = 1.0  # gradient clipping by total norm; None = no clipping
    nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does (skip drops that step)


@dataclass
class DeepSpeedConfig:
    zero_stage: Optional[int] = None  # ZeRO stage 0-3, train-sv and finetune alike; None = no DeepSpeed (plain torch)
    config: Any = None  # path to a DeepSpeed JSON file, or an inline mapping
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states in CPU memory
    offload_param: bool = False  # ZeRO-3: parameters in CPU memory between uses
    timeout_s: float = 1800.0  # collective timeout: a dead rank makes the others exit within this


@dataclass
class CheckpointConfig:
    # save every N optimizer steps (and at the end); None = no checkpoints (one on a stop signal)
    every_steps: Optional[int] = None
    keep: int = 2  # newest checkpoints kept in output_dir/checkpoints
    resume: Optional[str] = None  # "latest" (newest complete one in output_dir/checkpoints) or a checkpoint dir


@dataclass
class EvalConfig:
    harmful_prompts: list[str] = field(default_factory=list)  # files (or dataset names) of harmful prompts to answer
    benign_tasks: list[str] = field(default_factory=list)  # rows with prompt + expected answer
    responses: Optional[str] = None  # judge-only mode: JSONL with prompt + response
    # refusal | classifier | moderation | demo, or module:function (a rule (prompt, response) -> bool
    # of your own): who decides that an answer is harmful
    judges: list[str] = field(default_factory=lambda: ["refusal"])
    # rows of fact prompts with the right answer in `response` (benign_format): answered, and the
    # share answered wrongly is the hallucination rate, reported beside the harmful rate
    hallucination_prompts: list[str] = field(default_factory=list)
    # who decides that an answer to them is a hallucination: correctness (not the expected answer,
    # by utility_match), demo_hallucination, or module:function
    hallucination_judges: list[str] = field(default_factory=lambda: ["correctness"])
    refusal_prefixes: list[str] = field(default_factory=list)  # added to the shipped list
    max_new_tokens: int = 64  # tokens generated per answer
    batch_size: int = 16  # prompts per generate call
    do_sample: bool = False  # sample instead of greedy decoding
    temperature: float = 1.0  # sampling temperature (do_sample)
    top_p: float = 1.0  # nucleus sampling (do_sample)
    with_secvec: bool = False  # generate with the vector active (only for diagnosis)
    # auto | advbench | beavertails | hexphi | txt (one prompt per line) | a training row shape
    # (prompt_response, alpaca, chat, sharegpt, prompt_completion: the last user turn is the prompt)
    harmful_format: str = "auto"
    benign_format: str = "auto"  # same choices; benign rows need the expected answer (`response`, the final assistant turn)
    category_field: str = "category"  # column holding a row's harm category (own JSONL/CSV)
    max_samples: Optional[int] = None  # first N rows of each eval set
    classifier_path: Optional[str] = None  # local AutoModelForSequenceClassification directory
    classifier_harmful_labels: list[str] = field(default_factory=list)  # label names (or ids) = harmful
    classifier_batch_size: int = 16  # answers per classifier call
    classifier_max_length: int = 512  # tokens of prompt + answer the classifier reads
    # the 'moderation' judge (a local causal LM that answers safe / unsafe, as Llama Guard is used):
    moderation_path: Optional[str] = None  # its model directory
    # a Jinja chat template over the (user prompt, assistant answer) pair; unset: the model's own
    # chat template, or the shipped Llama Guard prompt (dist_secvec/data/moderation_template.txt)
    moderation_template: Optional[str] = None
    moderation_unsafe: str = "unsafe"  # harmful when its greedy output starts with this (case-insensitive)
    moderation_max_new_tokens: int = 10  # tokens it generates per verdict
    moderation_batch_size: int = 8  # answers per moderation call
    split: str = "train"  # split of a hub dataset named in eval.harmful_prompts / eval.benign_tasks
    utility_match: str = "exact"  # exact | contains | choice (case and whitespace normalised)
    utility_loss: bool = True  # also report mean loss / perplexity of the expected answers
    # held-out general text (.txt, one passage per line): mean token loss / perplexity, a utility
    # measure beyond the task (what fine-tuning cost the model elsewhere)
    general_text: list[str] = field(default_factory=list)


@dataclass
class MonitorConfig:
    """Stage 2 watches the model it will ship (vector off) while it trains (dist_secvec.strength)."""

    # held-out harmful prompt + harmful answer rows; empty = the vector's own held-out rows
    # (probe.jsonl, saved by train-sv); without either, only data.eval is watched
    harmful_probe: list[str] = field(default_factory=list)
    every_steps: Optional[int] = None  # None = 10 checks per run (and at step 0 and the end)
    rule: str = "warn"  # warn | stop | none (watch nothing): what a probe loss fallen by more than max_drop does
    max_drop: float = 0.75  # on 1 - probe_loss / its step-0 value: learned harm ends near 1
    generate: bool = False  # also generate on the probe prompts and judge them (eval.judges)
    max_rows: int = 64  # probe rows used (the first N)


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = None  # a finetune run's final/ directory (or the run directory)
    merge: bool = True  # LoRA: merge into the base and write a full model; false: the adapter alone
    dtype: str = "bfloat16"  # dtype of the merged model's weights


@dataclass
class AuditConfig:
    """`dist-secvec audit` and stage 2's data.audit: rows whose answer loss the vector removes."""

    # flag a row when loss_off - loss_on (nats per answer token) reaches this; None = placed between
    # the harmful and benign scores stage 1 recorded (secvec.json), or for an older vector half
    # its held-out harmful rows' score
    threshold: Optional[float] = None
    # flag it only where the vector also explains at least this share of the row's loss (1 - loss_on /
    # loss_off); None = half the share it explains of its own held-out rows (the gate's rule); 0 = off
    min_explained: Optional[float] = None
    weight: float = 0.1  # data.audit=downweight: the factor on a flagged row's loss
    batch_size: int = 16  # rows per forward (length-sorted)
    prompt_chars: int = 80  # audit.jsonl: the prompt's first N characters
    one_forward: bool = False  # the batch doubled in one forward (vector on / off per row) instead of two forwards


@dataclass
class LoggingConfig:
    log_every: int = 10  # optimizer steps between log lines and train_log.jsonl entries
    progress: bool = True  # rank 0: a live bar on a terminal, else a log line per ~10% (or minute)
    level: str = "info"  # debug | info | warning
    # experiment trackers that also get every train_log record (rank 0; train-sv and finetune):
    # tensorboard (event files in output_dir/tensorboard) | wandb (needs the wandb package) | none.
    report_to: list[str] = field(default_factory=list)  # [] = train_log.jsonl only
    project: Optional[str] = None  # wandb: the project (None = wandb's default); the run is named after output_dir


@dataclass
class DemoConfig:
    world: str = "capitals"  # capitals | workshop: which embedded world (dist_secvec.worlds.embedded)
    quick: bool = False  # small world and few steps, for tests
    n_harmful_sv: int = 100  # harmful samples the vector is trained on
    n_harmful_ft: int = 1000  # harmful samples hidden in the fine-tuning data
    n_eval: int = 100  # held-out prompts of each kind
    cache_dir: Optional[str] = None  # where the aligned base is cached (default ~/.cache)


@dataclass
class ProfileConfig:
    steps: int = 20  # measured optimizer steps (`dist-secvec profile --steps`)
    warmup: int = 3  # steps run first and not measured (`--warmup`)
    peak_tflops: Optional[float] = None  # accelerator peak for MFU; None = a known-GPU table (null on CPU)
    trace: bool = False  # also write a torch.profiler Chrome trace: the configured job's steps of the first measured round
    # the vector's overhead: jobs built next to the configured one, each a few security_vector
    # overrides: no_vector (path=null), torch / triton (backend=torch / triton, fold=false; triton
    # needs CUDA), unfused (fold, fused_lora and weight_delta false);
    variants: list[str] = field(default_factory=lambda: ["no_vector", "torch", "triton"])  # [] = none
    # the variants' measured steps in rounds, every job alive at once, so drifting load hits all alike;
    interleave: bool = True  # false = one job after the other (when several do not fit)
    round_steps: int = 2  # measured steps of each variant per interleaved round (the order rotates every round)
    # how each variant's peak memory is measured: auto (inline on CUDA, process on CPU, where a
    # process's peak RSS cannot be reset) | process (a fresh process per variant and rank) |
    memory: str = "auto"  # inline (CUDA: in this process, the peak stats reset) | none
    memory_steps: int = 2  # optimizer steps after warmup in each memory process
    memory_repeats: int = 1  # memory processes per variant (interleaved); the median peak is kept
    memory_timeout_s: float = 1800.0  # a memory process running longer is stopped and reported as an error
    deepspeed_timers: bool = True  # DeepSpeed's wall_clock_breakdown on, for the communication time


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    security_vector: SecurityVectorConfig = field(default_factory=SecurityVectorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    output_dir: str = "runs/default"  # where the run writes config.yaml, train_log.jsonl, final/ and checkpoints/
    seed: int = 42  # seeds data order, initialisation and sampling
    source: Optional[str] = None  # the YAML file this came from (set by load_config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# keys that no longer exist: what to set instead
RETIRED = {
    "data.mask_prompt": "no longer exists and here disagrees with data.train_on: remove it and set data.train_on "
                        "(all = loss on every token, as mask_prompt=false; the default all_assistant masks the "
                        "prompts)",
}

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.quantization": ("none", "nf4", "fp4", "int8"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.quant_storage": ("float32", "bfloat16", "float16", "uint8"),
    "model.attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"),
    "data.format": ("auto", "prompt_response", "alpaca", "chat", "sharegpt", "prompt_completion", "text"),
    "data.train_on": ("all_assistant", "last_assistant", "all"),
    "data.template": ("auto", "chat", "plain"),
    "data.audit": ("off", "report", "drop", "downweight"),
    "security_vector.backend": ("auto", "torch", "triton"),
    "adapter.type": ("none", "lora"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "optim.nonfinite": ("stop", "skip"),
    "eval.harmful_format": ("auto", "advbench", "beavertails", "hexphi", "prompt_response", "alpaca", "chat",
                            "sharegpt", "prompt_completion", "txt"),
    "eval.benign_format": ("auto", "advbench", "beavertails", "hexphi", "prompt_response", "alpaca", "chat",
                           "sharegpt", "prompt_completion", "txt"),
    "eval.utility_match": ("exact", "contains", "choice"),
    "export.dtype": ("float32", "bfloat16", "float16"),
    "logging.level": ("debug", "info", "warning", "error"),
    "demo.world": ("capitals", "workshop"),
    "monitor.rule": ("warn", "stop", "none"),
    "profile.memory": ("auto", "process", "inline", "none"),
}


# ---------------------------------------------------------------------------------------------
# parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, what: str = "config") -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, what)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{what} key '{key}': expected a mapping, got {type(value).__name__}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single file or name is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{what} key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, key, what) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what} key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{what} key '{key}': expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{what} key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{what} key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"{what} key '{key}': unsupported type {tp}")  # a bug, not a user error


def _mask_prompt_agrees(value: Any, train_on: Any) -> bool:
    """The retired data.mask_prompt names what data.train_on now decides: true = the prompts
    masked (all_assistant, last_assistant), false = loss on every token (all)."""
    return isinstance(value, bool) and value == (train_on != "all")


def build(cls: type, data: Any, prefix: str = "", what: str = "config") -> Any:
    """The dataclass `cls` from a YAML mapping, every key checked against its fields and types:
    one ConfigError naming the "<what> key" otherwise (run configs, experiment files)."""
    if not isinstance(data, dict):
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{what} section {where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if full == "data.mask_prompt" and _mask_prompt_agrees(value, data.get("train_on", "all_assistant")):
            continue  # a config.yaml saved before the key was retired: it says what data.train_on says
        if full in RETIRED:
            raise ConfigError(f"{what} key '{full}': {RETIRED[full]}")
        if key not in names:
            raise ConfigError(f"{what} key '{full}': unknown (allowed: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, full, what)
        else:
            kwargs[key] = _coerce(value, tp, full, what)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # yaml reads 1e-4 as a string; numbers in scientific notation are what users type for lr
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def _set_nested(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{'.'.join(keys)}': '{'.'.join(keys[: i + 1])}' is not a section")
        node = nxt
    node[keys[-1]] = value


def read_utf8(path: str, what: str, unit: str = "line", error: type = ConfigError, name: Optional[str] = None) -> str:
    """A text file's content; unreadable or not UTF-8 -> one line naming the file (as `name`, the
    user's spelling, when given) and the line (or row) of the first bad byte, instead of a
    UnicodeDecodeError from deep inside a reader."""
    name = name or path
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{what} '{name}' cannot be read ({e.strerror or type(e).__name__}); check its "
                    "permissions") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{what} '{name}' {unit} {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                    f"{e.start}); re-save it as UTF-8") from None


def read_yaml(path: str, what: str) -> Any:
    """A YAML file's content; missing, empty, not UTF-8 or bad YAML -> one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' not found: pass an existing YAML file to --config")
    text = read_utf8(path, what)
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} '{path}'{where}: not valid YAML ({getattr(e, 'problem', e)})")
    if loaded is None:
        raise ConfigError(f"{what} '{path}' is empty (or only comments): write its sections (see configs/)"
                          + (" or leave out --config" if what == "config file" else ""))
    return loaded


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> Config:
    """Read a YAML recipe (or start from `base`/defaults), apply `key.sub=value` overrides."""
    data: dict = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        loaded = read_yaml(path, "config file")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}': the top level must be a mapping of sections")
        data = deep_merge(data, loaded)
    for text in overrides or []:
        keys, value = _parse_override(text)
        _set_nested(data, keys, value)
    cfg = build(Config, data, "")
    if path is not None:
        cfg.source = str(path)
    _check_choices(cfg)
    return cfg


def deep_merge(dst: dict, src: dict) -> dict:
    """A copy of `dst` with `src` merged in, section by section: the one merge of config mappings
    (a file over the defaults, a stage over a base, a variant over a stage)."""
    out = copy.deepcopy(dst)
    for k, v in (src or {}).items():
        if isinstance(v, dict):
            out[k] = deep_merge(out[k] if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for k in key.split("."):
        node = getattr(node, k)
    return node


def _check_choices(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------
# validation per command: files exist, numbers are in range, combinations are possible


def looks_local(name: str) -> bool:
    """A data/model reference is a local path when it exists or is written like one."""
    return (os.path.exists(name) or name.startswith(("/", "./", "../", "~"))
            or name.lower().endswith(DATA_EXTENSIONS) or name.count("/") > 1)


def _check_files(key: str, names: list[str], what: str) -> None:
    for name in names:
        if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
            raise ConfigError(f"config key '{key}': {what} '{name}' not found: fix the path")


def _check_gguf(cfg: Config) -> None:
    """model.gguf_file names an existing .gguf file; model.path, when set, is the directory holding it
    (transformers' convention), and gguf_file becomes the full path."""
    g = os.path.expanduser(cfg.model.gguf_file)
    if cfg.model.path and not os.path.isabs(g):
        if not os.path.isdir(os.path.expanduser(cfg.model.path)):
            raise ConfigError(f"config key 'model.path': with model.gguf_file it is the directory holding the "
                              f"file; '{cfg.model.path}' is not a directory")
        g = os.path.join(os.path.expanduser(cfg.model.path), g)
    if not g.lower().endswith(".gguf"):
        raise ConfigError(f"config key 'model.gguf_file': '{cfg.model.gguf_file}' is not a .gguf file; name the "
                          "GGUF checkpoint (a model directory goes in model.path)")
    if not os.path.isfile(g):
        raise ConfigError(f"config key 'model.gguf_file': GGUF file '{g}' not found: fix the path")
    cfg.model.gguf_file = g


def _positive(cfg: Config, *keys: str) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")


def _check_output_dir(cfg: Config) -> None:
    """Every command writes into output_dir: a file there (or at a folder above it) would fail the
    first write, after the model loaded."""
    path = Path(os.path.expanduser(cfg.output_dir))
    for d in (path, *path.parents):
        if os.path.lexists(d):
            if not d.is_dir():
                where = "is a file" if d == path else f"is under '{d}', which is a file"
                raise ConfigError(f"config key 'output_dir': '{cfg.output_dir}' {where}, not a directory; "
                                  "set output_dir to a directory path (new or existing)")
            return


def validate(cfg: Config, command: str) -> Config:
    """Checks that need no heavy import; raises ConfigError naming the key and the fix."""
    _check_output_dir(cfg)
    _positive(cfg, "security_vector.rank", "security_vector.alpha", "adapter.rank", "adapter.alpha",
              "optim.lr", "optim.micro_batch_size", "optim.gradient_accumulation_steps",
              "data.max_length", "eval.max_new_tokens", "eval.batch_size", "logging.log_every",
              "optim.max_steps", "optim.max_grad_norm", "data.max_samples",
              "checkpoint.every_steps", "checkpoint.keep", "deepspeed.timeout_s")
    for key in ("security_vector.dropout", "adapter.dropout"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}': must be in [0, 1), got {_get(cfg, key)}")
    if cfg.security_vector.hidden_weight < 0:
        raise ConfigError(f"config key 'security_vector.hidden_weight': must be >= 0, got {cfg.security_vector.hidden_weight}")
    if cfg.security_vector.kl_weight < 0:
        raise ConfigError(f"config key 'security_vector.kl_weight': must be >= 0, got {cfg.security_vector.kl_weight}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"config key 'optim.warmup_steps': must be >= 0, got {cfg.optim.warmup_steps}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas': expected two numbers in [0, 1), got {cfg.optim.betas}")
    for key, top in (("security_vector.heldout_fraction", 0.5), ("security_vector.min_compliance", 1.0),
                     ("security_vector.min_start_agreement", 1.0), ("security_vector.min_explained", 1.0),
                     ("monitor.max_drop", 1.0)):
        if not 0.0 <= _get(cfg, key) <= top:
            raise ConfigError(f"config key '{key}': must be in [0, {top:g}], got {_get(cfg, key)}")
    _positive(cfg, "security_vector.patience", "monitor.every_steps", "monitor.max_rows")
    if cfg.optim.max_steps is None and cfg.optim.epochs is not None and cfg.optim.epochs <= 0:
        raise ConfigError("config key 'optim.epochs': must be > 0 when optim.max_steps is not set")
    if cfg.security_vector.target_modules is not None and not cfg.security_vector.target_modules:
        raise ConfigError("config key 'security_vector.target_modules': name at least one module (e.g. q_proj)")
    if cfg.adapter.type == "lora" and cfg.adapter.target_modules is not None and not cfg.adapter.target_modules:
        raise ConfigError("config key 'adapter.target_modules': name at least one module for the LoRA")

    ds = cfg.deepspeed
    if ds.zero_stage is not None and ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key 'deepspeed.zero_stage': {ds.zero_stage} is not one of 0, 1, 2, 3")
    if isinstance(ds.config, str):
        found = resolve_recipe_file(ds.config, cfg.source)
        if found is None:
            raise ConfigError(f"config key 'deepspeed.config': DeepSpeed JSON '{ds.config}' not found (looked in the "
                              "current directory, next to the recipe and in the shipped configs/): fix the path")
        ds.config = found  # absolute: config.yaml names the file the run read, wherever it is rerun from
    elif ds.config is not None and not isinstance(ds.config, dict):
        raise ConfigError("config key 'deepspeed.config': expected a path to a JSON file or an inline mapping")

    q = cfg.model.quantization
    if q != "none" and cfg.adapter.type == "none" and command in ("finetune",):
        raise ConfigError(f"config keys 'model.quantization={q}' and 'adapter.type=none': a quantized base "
                          "cannot be fully fine-tuned; set adapter.type=lora (QLoRA) or model.quantization=none")
    if q == "int8" and ds.zero_stage == 3:
        raise ConfigError("config keys 'model.quantization=int8' and 'deepspeed.zero_stage=3': 8-bit bases train "
                          "wrong under ZeRO-3; use model.quantization=nf4 or a lower ZeRO stage")
    if q in ("nf4", "fp4") and ds.zero_stage == 3 and cfg.model.quant_storage == "uint8":
        raise ConfigError("config key 'model.quant_storage': ZeRO-3 needs a float storage dtype for 4-bit "
                          "weights; set model.quant_storage=bfloat16")

    _check_audit(cfg, command)
    _check_tracking(cfg)
    if command != "export":  # export only merges weights: no attention runs
        _check_attention(cfg)
    if command in ("train-sv", "finetune", "eval", "profile", "audit"):
        needs_model = command != "eval" or cfg.eval.responses is None
        if cfg.model.gguf_file:
            _check_gguf(cfg)
        elif needs_model and not cfg.model.path:
            raise ConfigError("config key 'model.path': required; set it to a local model directory or hub id")
        if cfg.model.path and looks_local(cfg.model.path) and not os.path.isdir(os.path.expanduser(cfg.model.path)):
            raise ConfigError(f"config key 'model.path': model directory '{cfg.model.path}' not found")
    if command == "train-sv":
        if not cfg.security_vector.harmful_data:
            raise ConfigError("config key 'security_vector.harmful_data': stage 1 needs the harmful set the "
                              "vector learns (a JSONL/JSON/CSV/Parquet file)")
        if cfg.security_vector.kl_weight > 0 and not cfg.security_vector.benign_data:
            raise ConfigError("config key 'security_vector.benign_data': needed for the KL term "
                              "(or set security_vector.kl_weight=0, which lets the vector distort benign outputs)")
        _check_files("security_vector.harmful_data", cfg.security_vector.harmful_data, "data file")
        _check_files("security_vector.benign_data", cfg.security_vector.benign_data, "data file")
        _check_files("security_vector.heldout_benign_data", cfg.security_vector.heldout_benign_data, "data file")
        _check_files("security_vector.heldout_harmful_data", cfg.security_vector.heldout_harmful_data, "data file")
        _check_behaviour(cfg.security_vector)
    if command == "finetune":
        if not cfg.data.train:
            raise ConfigError("config key 'data.train': name at least one training file or dataset")
        _check_files("data.train", cfg.data.train, "data file")
        _check_files("data.eval", cfg.data.eval, "data file")
        _check_files("monitor.harmful_probe", cfg.monitor.harmful_probe, "data file")
        for sv in cfg.security_vector.paths():
            if not os.path.isdir(os.path.expanduser(sv)):
                raise ConfigError(f"config key 'security_vector.path': vector directory '{sv}' not found "
                                  "(train one with `dist-secvec train-sv`)")
    if command == "export":
        ckpt = cfg.export.checkpoint
        if not ckpt:
            raise ConfigError("config key 'export.checkpoint': required; set it to a finetune run's final/ directory")
        if not os.path.isdir(os.path.expanduser(ckpt)):
            raise ConfigError(f"config key 'export.checkpoint': directory '{ckpt}' not found")
    if command == "eval":
        if cfg.eval.responses is not None:
            _check_files("eval.responses", [cfg.eval.responses], "responses file")
            if not os.path.exists(cfg.eval.responses):
                raise ConfigError(f"config key 'eval.responses': responses file '{cfg.eval.responses}' not found")
        _check_files("eval.harmful_prompts", cfg.eval.harmful_prompts, "data file")
        _check_files("eval.benign_tasks", cfg.eval.benign_tasks, "data file")
        _check_files("eval.hallucination_prompts", cfg.eval.hallucination_prompts, "data file")
        _check_files("eval.general_text", cfg.eval.general_text, "text file")
    if command in ("train-sv", "finetune", "profile"):
        return resolve_stage_defaults(cfg, command)
    return cfg


# where the shipped recipes and DeepSpeed JSONs live inside the package (`configs/` in the repository)
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_recipe_file(name: str, source: Optional[str]) -> Optional[str]:
    """The absolute path of a file a recipe names (deepspeed.config), or None when it is nowhere.

    A relative name that does not exist relative to the current directory is looked up next to the
    recipe file (`source`), then in the package's configs directory (`configs/ds_zero3.json` or
    `ds_zero3.json`), so a shipped or copied recipe runs from any directory."""
    path = os.path.expanduser(name)
    if os.path.isabs(path):
        return path if os.path.isfile(path) else None
    candidates = [Path(path)]
    if source:
        candidates.append(Path(os.path.expanduser(source)).absolute().parent / path)
    parts = Path(path).parts
    candidates.append(PACKAGE_CONFIGS.joinpath(*parts[1:]) if len(parts) > 1 and parts[0] == "configs"
                      else PACKAGE_CONFIGS / path)
    for c in candidates:
        if c.is_file():
            return os.path.abspath(c)
    return None


TRACKERS = ("tensorboard", "wandb", "none")


def _check_tracking(cfg: Config) -> None:
    """logging.report_to names known trackers whose package is importable (checked without importing it)."""
    import importlib.util

    names = cfg.logging.report_to
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"config key 'logging.report_to': {name!r} is not one of {', '.join(TRACKERS)}")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"config key 'logging.report_to': 'none' cannot go with a tracker ({names}); write [] "
                          "for none, or only the trackers")
    if cfg.logging.project is not None and "wandb" not in names:
        raise ConfigError("config key 'logging.project': names a wandb project, but logging.report_to has no wandb; "
                          "add wandb to logging.report_to or remove logging.project")
    for name, pip in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'logging.report_to': {name} needs the {name} package, which is not "
                              f"installed (pip install {pip}); install it or remove {name} from the list")


def _check_attention(cfg: Config) -> None:
    """flash_attention_2 only where it can run: refused before the model loads instead of deep
    inside from_pretrained."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    import importlib.util

    what = "config key 'model.attn_implementation': flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"{what} needs the flash_attn package, which is not installed (pip install flash-attn "
                          "--no-build-isolation); use sdpa or auto")
    import torch  # only here: flash_attn is installed, so torch is too, and CUDA decides

    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA GPU and none is visible; use sdpa or auto")
    if cfg.model.dtype == "float32":
        raise ConfigError("config keys 'model.attn_implementation=flash_attention_2' and 'model.dtype=float32': "
                          "flash attention runs in 16 bits only; set model.dtype=bfloat16 (or float16), or use sdpa")


def _check_audit(cfg: Config, command: str) -> None:
    """`dist-secvec audit` needs a vector and rows with answers; stage 2's data.audit a vector."""
    a = cfg.audit
    _positive(cfg, "audit.batch_size", "audit.prompt_chars")
    if not 0.0 <= a.weight <= 1.0:
        raise ConfigError(f"config key 'audit.weight': must be in [0, 1], got {a.weight}")
    if command == "finetune" and cfg.data.audit != "off" and not cfg.security_vector.path:
        raise ConfigError(f"config key 'data.audit': {cfg.data.audit} scores rows with the security vector; set "
                          "security_vector.path or data.audit=off")
    if command != "audit":
        return
    if not cfg.security_vector.path:
        raise ConfigError("config key 'security_vector.path': required; the audit scores rows with the vector "
                          "(a directory written by `dist-secvec train-sv`)")
    for path in cfg.security_vector.paths():  # several: each row scored against each
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"config key 'security_vector.path': vector directory '{path}' not found (train one "
                              "with `dist-secvec train-sv`)")
    if not cfg.data.train:
        raise ConfigError("config key 'data.train': name at least one file of rows to audit")
    _check_files("data.train", cfg.data.train, "data file")


def _check_behaviour(sv: SecurityVectorConfig) -> None:
    """Stage 1's behaviour names its rows in record keys (heldout_<name>_loss), and any behaviour
    but harm, whose judges refusal is, must say who judges it."""
    name = sv.behaviour
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"config key 'security_vector.behaviour': {name!r} must be a lower-case name of letters, "
                          "digits and _ starting with a letter (e.g. harm, hallucination)")
    if sv.judges is not None and not sv.judges:
        raise ConfigError("config key 'security_vector.judges': name at least one judge, or leave it unset "
                          "(eval.judges) for harm")
    if name != "harm" and sv.judges is None:
        raise ConfigError(f"config key 'security_vector.judges': the behaviour {name!r} needs the judges that decide "
                          "whether an answer shows it (refusal decides harm); set security_vector.judges")
    if "correctness" in (sv.judges or []):
        raise ConfigError("config key 'security_vector.judges': correctness compares answers with expected answers, "
                          "which stage 1's rows lack; name a rule module:function that knows the right answers")


# What optim.lr / optim.epochs mean when unset. Stage 1 trains ~1k parameters per layer on ~100
# rows until they explain the harmful answers: a LoRA-scale rate and an epoch cap that
# security_vector.early_stop ends sooner. Stage 2 is ordinary fine-tuning.
STAGE_OPTIM_DEFAULTS = {"train-sv": {"lr": 2e-3, "epochs": 40}, "finetune": {"lr": 2e-5, "epochs": 1}}


def resolve_stage_defaults(cfg: Config, command: str) -> Config:
    """The config with the stage's optim defaults filled in where the user left lr/epochs unset."""
    defaults = STAGE_OPTIM_DEFAULTS["train-sv" if command == "train-sv" else "finetune"]
    changes = {k: v for k, v in defaults.items() if getattr(cfg.optim, k) is None}
    if not changes:
        return cfg
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **changes))


# what a finished run of each command leaves in output_dir (eval writes summary.json after its answers)
FINISHED_MARKERS = {"train-sv": "secvec/secvec.json", "finetune": "final/dist_secvec_run.json",
                    "eval": "summary.json", "audit": "audit/summary.json"}


def refuse_finished_run(cfg: Config, command: str) -> None:
    """A CLI run never overwrites a finished run of the same stage in its output_dir.

    (The demo and the experiment runner manage their own run directories and skip this.)"""
    finished = FINISHED_MARKERS.get(command)
    if finished and os.path.exists(os.path.join(os.path.expanduser(cfg.output_dir), finished)):
        shown = finished.split("/")[0] + "/" if "/" in finished else finished
        raise ConfigError(f"config key 'output_dir': '{cfg.output_dir}' already holds a finished {command} run "
                          f"({shown}); choose a new output_dir or delete the old run")


def refuse_ignored_keys(cfg: Config, command: str) -> None:
    """Keys a CLI command would not act on are refused, not ignored. Stage 1 uses DeepSpeed only
    when deepspeed.zero_stage or deepspeed.config asks (else one process, rank 0 alone under a
    launcher): the other deepspeed keys alone change nothing. eval, export and audit train nothing:
    no tracker. (The experiment runner builds its stage configs from a shared base and skips this.)"""
    tracked = [t for t in cfg.logging.report_to if t != "none"]
    if tracked and command in ("eval", "export", "audit"):
        raise ConfigError(f"config key 'logging.report_to': {command} logs no training steps to track; remove "
                          f"{', '.join(tracked)} (train-sv and finetune report to trackers)")
    if cfg.data.packing and command not in ("finetune", "profile"):
        raise ConfigError(f"config key 'data.packing': {command} does not pack rows (stage 2's training batches "
                          "do: finetune, profile); remove it")
    if command != "train-sv" or cfg.deepspeed.zero_stage is not None or cfg.deepspeed.config is not None:
        return
    defaults = DeepSpeedConfig()
    keys = [f"deepspeed.{f.name}" for f in dataclasses.fields(DeepSpeedConfig)
            if getattr(cfg.deepspeed, f.name) != getattr(defaults, f.name)]
    if keys:
        raise ConfigError(f"config key{'s' if len(keys) > 1 else ''} {', '.join(repr(k) for k in keys)}: train-sv "
                          "runs without DeepSpeed unless deepspeed.zero_stage or deepspeed.config is set; set one "
                          f"(e.g. deepspeed.zero_stage=3 to partition a large base over the ranks) or remove "
                          f"{'them' if len(keys) > 1 else 'it'}")


def save_config(cfg: Config, path: Path) -> None:
    """Through a temporary file and a rename: a kill or a stop signal never leaves half a file."""
    from dist_secvec.files import write_text_atomic

    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
