"""`dist-secvec experiment --config configs/experiments/NAME.yaml`: the paper's comparison as a sweep.

An experiment file holds
    output_dir   where runs, vectors and the results go
    world        `embedded` (the demo's tiny world: data and aligned base built by dist_secvec.demo.run)
                 or absent (a real model: `base.model.path` and the `data` section below)
    world_sizes  embedded only: WorldSizes fields (n_align_benign, n_eval, ...); n_harmful_sv and
                 n_harmful_ft are pools (the demo's size, or the sweep's largest value if larger);
                 a run's harmful samples are the first n rows of its pool
    base         a run config (the same keys as any `--config` file), shared by every stage
    stages       per-stage run-config overrides: {train_sv: {...}, finetune: {...}} (the embedded world's
                 aligned base uses the demo's settings; world_sizes and base.demo.quick shrink it)
    data         real model only: benign_train (list), harmful_ft_pool, harmful_sv_pool, kl_benign
                 (list), heldout_benign (list); the first n rows of a pool are a run's harmful samples
    sweep        n_harmful_ft: [0, 100, ...], vector: [off, on], n_harmful_sv: [10, 50, 100], seeds: [0, 1],
                 and named variants of a stage: finetune: {recipe: {}, 3x_lr: {optim: {lr: 3.0e-3}}, ...}
                 and train_sv: {default: {}, rank16: {security_vector: {rank: 16}}} (each a run-config
                 override merged over stages.<stage>; every run is crossed with every variant)
    launcher     optional: a command that starts stage 2 on several ranks, e.g.
                 "launch/deepspeed.sh --gpus 8 --"; each run's stage 2 is then
                 `<launcher> finetune --config runs/<id>/finetune.yaml` in its own processes (log in
                 runs/<id>/finetune.log), and the trained model is loaded here for evaluation

Each run: stage 1 (only with the vector on; one vector per (n_harmful_sv, seed), shared by every
run that needs it), stage 2 on the benign task + n_harmful_ft harmful samples, then evaluation with
the vector off: harmful rate (+ 95% Wilson interval) and utility accuracy. The sweep seed is the
training seed of stages 1 and 2; the embedded world and its aligned base come from `base.seed`.

A run's id is a hash of its resolved config; runs/<id>/result.json exists only once the run has
finished, so rerunning the experiment skips finished runs and redoes unfinished ones. Outputs:
results.csv (one row per run), results.md (mean and spread over seeds), results.png.

Without `launcher`, stages run in this process through run_train_sv / run_finetune (one process).
With it, stage 2 of every run goes through the launcher (DeepSpeed ZeRO, many GPUs or nodes);
stage 1 (~100 samples) and evaluation stay in this process. Submitting each run as its own
cluster job is not implemented here: run the experiment inside one allocation (launch/slurm.sbatch).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import random
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dist_secvec.config import deep_merge
from dist_secvec.errors import ConfigError

log = logging.getLogger(__name__)

RESULT = "result.json"
CSV_COLUMNS = ["n_harmful_ft", "vector", "n_harmful_sv", "train_sv", "finetune", "seed", "harmful_rate",
               "harmful_ci_low", "harmful_ci_high", "affirmative_rate", "utility", "general_loss", "n_eval", "vector_weak", "probe_drop",
               "run_id"]
STAGE_KEYS = ("train_sv", "finetune")
# embedded: the demo's tiny world; smollm2: a real model and real harmful prompts, built offline
# (dist_secvec.worlds.smollm2); None: the model and data files the experiment names
WORLDS = (None, "embedded", "smollm2")


@dataclass
class Sweep:
    # harmful rows hidden in stage 2's data
    n_harmful_ft: list[int] = field(default_factory=lambda: [0, 100, 500, 1000])
    vector: list[Any] = field(default_factory=lambda: [False, True])  # off | on: stage 2 without / with the vector
    n_harmful_sv: list[int] = field(default_factory=lambda: [100])  # harmful rows each vector is trained on
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds of stages 1 and 2
    # named run-config overrides of a stage, crossed with every run ({} = the stage as configured)
    finetune: dict = field(default_factory=lambda: {"": {}})
    train_sv: dict = field(default_factory=lambda: {"": {}})  # the same for stage 1 (runs with the vector)


@dataclass
class Stages:
    train_sv: dict = field(default_factory=dict)  # run-config overrides of stage 1, over `base`
    finetune: dict = field(default_factory=dict)  # run-config overrides of stage 2, over `base`


@dataclass
class ExperimentData:
    """A real model's data files (world: embedded builds its own); a pool's first n rows are a run's."""

    benign_train: list[str] = field(default_factory=list)  # the benign task's training rows
    harmful_ft_pool: list[str] = field(default_factory=list)  # harmful rows hidden in stage 2's data
    harmful_sv_pool: list[str] = field(default_factory=list)  # harmful rows the vectors are trained on
    kl_benign: list[str] = field(default_factory=list)  # stage 1's benign rows (KL term)
    heldout_benign: list[str] = field(default_factory=list)  # stage 1's held-out benign rows (shift report)


@dataclass
class Experiment:
    """An experiment file (dist-secvec experiment --config), parsed by the run configs' own rules."""

    output_dir: str = ""  # required: where runs, vectors and the results go
    # embedded (the demo's tiny world) | smollm2 (SmolLM2-135M-Instruct and Do-Not-Answer, built
    # offline) | null (your own model and data: base.model.path, data)
    world: Optional[str] = None
    world_sizes: dict = field(default_factory=dict)  # embedded: WorldSizes fields (n_align_benign, n_eval, ...)
    base: dict = field(default_factory=dict)  # a run config shared by every stage (the keys of any --config file)
    stages: Stages = field(default_factory=Stages)
    data: ExperimentData = field(default_factory=ExperimentData)
    sweep: Sweep = field(default_factory=Sweep)
    name: str = ""  # for the results' titles (default: the file's name)
    launcher: Optional[str] = None  # a command that starts stage 2 on several ranks ("launch/deepspeed.sh --gpus 8 --")
    source: Optional[str] = None  # the file this came from (set by load_experiment)

    @property
    def launch_command(self) -> list[str]:
        return shlex.split(self.launcher) if self.launcher else []

    def stage(self, name: str) -> dict:
        """stages.<name> as a mapping ({} when not set)."""
        return getattr(self.stages, name)

    def data_files(self) -> dict:
        """The data section's set keys, as the mapping run ids hash."""
        return {k: v for k, v in dataclasses.asdict(self.data).items() if v}


@dataclass(frozen=True)
class RunSpec:
    n_harmful_ft: int
    vector: bool
    n_harmful_sv: Optional[int]  # None when the vector is off
    seed: int
    finetune: str = ""  # the sweep's stage-2 variant ("" = none named)
    train_sv: str = ""  # the sweep's stage-1 variant ("" when the vector is off)

    @property
    def setting(self) -> str:
        return _setting({"vector": "on" if self.vector else "off", "n_harmful_sv": self.n_harmful_sv,
                         "train_sv": self.train_sv, "finetune": self.finetune})


# ---------------------------------------------------------------------------------------------
# parsing


def _int_list(value: list[int], key: str, minimum: int = 0) -> list[int]:
    if not value or not all(v >= minimum for v in value):
        raise ConfigError(f"experiment key '{key}': expected a non-empty list of integers >= {minimum}, got {value!r}")
    return list(dict.fromkeys(value))


def _vector_list(value: list) -> list[bool]:
    out = []
    for v in value:
        if v in (True, "on", "true"):
            out.append(True)
        elif v in (False, "off", "false"):
            out.append(False)
        else:
            raise ConfigError(f"experiment key 'sweep.vector': expected a list of off/on, got {v!r}")
    if not out:
        raise ConfigError("experiment key 'sweep.vector': expected a list of off/on, got an empty list")
    return list(dict.fromkeys(out))


def parse_experiment(data: Any, source: Optional[str] = None) -> Experiment:
    """An Experiment from the YAML mapping (config.build: every key and type checked, one line
    naming the bad key), then what the types alone do not say."""
    from dist_secvec.config import build, load_config
    from dist_secvec.demo.world import WorldSizes

    if not isinstance(data, dict):
        where = f"experiment file '{source}'" if source else "experiment"
        raise ConfigError(f"{where}: the top level must be a mapping (output_dir, base, sweep, ...)")
    sweep_given = set((data.get("sweep") or {}) if isinstance(data.get("sweep"), dict) else ())
    exp = build(Experiment, {k: v for k, v in data.items() if k != "source"}, "", "experiment")
    exp.source = source
    exp.name = exp.name or Path(source or "experiment").stem
    if not exp.output_dir:
        raise ConfigError("experiment key 'output_dir': required; a directory for runs and results")
    bad = next((p for p in (Path(exp.output_dir), *Path(exp.output_dir).parents) if p.exists() and not p.is_dir()),
               None)
    if bad is not None:
        raise ConfigError(f"experiment key 'output_dir': '{bad}' is a file, not a directory; choose another output_dir")
    if exp.world not in WORLDS:
        raise ConfigError(f"experiment key 'world': '{exp.world}' is not supported; use 'embedded', 'smollm2' "
                          "or leave it out")
    # every run-config section must parse as a run config (unknown keys are named there)
    for label, d in [("base", exp.base)] + [(f"stages.{k}", exp.stage(k)) for k in STAGE_KEYS]:
        try:
            load_config(None, None, base=copy.deepcopy(d or {}))
        except ConfigError as e:
            raise ConfigError(f"experiment section '{label}': {e}") from None
    fields = {f.name for f in dataclasses.fields(WorldSizes)} - {"n_harmful_sv", "n_harmful_ft"}
    for k, v in exp.world_sizes.items():
        if k not in fields:
            raise ConfigError(f"experiment key 'world_sizes.{k}': unknown; expected one of {', '.join(sorted(fields))}")
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"experiment key 'world_sizes.{k}': expected a positive integer, got {v!r}")
    if exp.world_sizes and exp.world != "embedded":
        raise ConfigError("experiment key 'world_sizes': only for world: embedded")
    sw = exp.sweep
    sw.n_harmful_ft = _int_list(sw.n_harmful_ft, "sweep.n_harmful_ft")
    sw.vector = _vector_list(sw.vector)
    sw.n_harmful_sv = _int_list(sw.n_harmful_sv, "sweep.n_harmful_sv", minimum=1)
    sw.seeds = _int_list(sw.seeds, "sweep.seeds")
    for stage in STAGE_KEYS:
        if stage in sweep_given:
            setattr(sw, stage, _variants(getattr(sw, stage), stage, exp.stage(stage)))
    if exp.launcher is not None and not exp.launch_command:
        raise ConfigError("experiment key 'launcher': expected a command such as \"launch/deepspeed.sh --gpus 8 --\"")
    if exp.world == "smollm2":
        given = [k for k in exp.data_files()] + (["base.model.path"] if (exp.base.get("model") or {}).get("path") else [])
        if given:
            raise ConfigError(f"experiment key '{given[0] if given[0].startswith('base.') else 'data.' + given[0]}': "
                              "world: smollm2 builds its own model and data; leave it out")
    if exp.world is None:
        if not (exp.base.get("model") or {}).get("path"):
            raise ConfigError("experiment key 'base.model.path': required without world: embedded")
        for k in ("benign_train", "harmful_ft_pool"):
            if not getattr(exp.data, k):
                raise ConfigError(f"experiment key 'data.{k}': required without world: embedded")
        if True in sw.vector and not exp.data.harmful_sv_pool:
            raise ConfigError("experiment key 'data.harmful_sv_pool': required when the sweep has vector: on")
        if not (exp.base.get("eval") or {}).get("harmful_prompts"):
            raise ConfigError("experiment key 'base.eval.harmful_prompts': required without world: embedded")
    return exp


def _variants(value: Any, stage: str, stage_base: dict) -> dict:
    """sweep.<stage>: {name: run-config overrides}; each must parse as a run config."""
    from dist_secvec.config import load_config

    key = f"sweep.{stage}"
    if not value:
        raise ConfigError(f"experiment key '{key}': expected a mapping of variant names to run-config overrides, "
                          f"e.g. {{recipe: {{}}, 3x_lr: {{optim: {{lr: 3.0e-3}}}}}}")
    out = {}
    for name, over in value.items():
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigError(f"experiment key '{key}': variant name {name!r} must be letters, digits, _ - .")
        over = {} if over is None else over
        if not isinstance(over, dict):
            raise ConfigError(f"experiment key '{key}.{name}': expected a mapping, got {type(over).__name__}")
        try:
            load_config(None, None, base=deep_merge(stage_base, over))
        except ConfigError as e:
            raise ConfigError(f"experiment key '{key}.{name}': {e}") from None
        out[name] = over
    return out


def load_experiment(path: str, overrides: Optional[list[str]] = None) -> Experiment:
    from dist_secvec.config import _parse_override, _set_nested, read_yaml

    if not path:
        raise ConfigError("--config: required; pass an experiment file (configs/experiments/*.yaml)")
    data = read_yaml(path, "experiment file")
    if isinstance(data, dict):
        for text in overrides or []:
            keys, value = _parse_override(text)
            _set_nested(data, keys, value)
    return parse_experiment(data, str(path))


def plan_runs(exp: Experiment) -> list[RunSpec]:
    runs = []
    for seed in exp.sweep.seeds:
        for ft in exp.sweep.finetune:
            for n_ft in exp.sweep.n_harmful_ft:
                for vec in exp.sweep.vector:
                    for sv in (exp.sweep.train_sv if vec else [""]):
                        for n_sv in (exp.sweep.n_harmful_sv if vec else [None]):
                            runs.append(RunSpec(n_ft, vec, n_sv, seed, ft, sv))
    return runs


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# running


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


class _Embedded:
    """The demo's world: data per seed of `base.seed`, the cached aligned base, the world's judge."""

    def __init__(self, exp: Experiment, out: Path):
        from dist_secvec.config import load_config
        from dist_secvec.demo.run import aligned_base, demo_defaults
        from dist_secvec.demo.world import WorldSizes, build_world

        self.exp = exp
        self.cfg = load_config(None, None, base=deep_merge(deep_merge(demo_defaults(), exp.base),
                                                          {"output_dir": str(out)}))
        self.quick = self.cfg.demo.quick
        self.sizes = WorldSizes(**exp.world_sizes)
        if self.quick:  # the demo's quick sizes, as `dist-secvec demo --quick`
            from dist_secvec.demo.run import QUICK

            for k, v in QUICK["sizes"].items():
                if k not in exp.world_sizes:
                    setattr(self.sizes, k, min(v, getattr(self.sizes, k)))
        # pools at least the demo's size, so the aligned base's cache key (which holds the sizes)
        # matches `dist-secvec demo`'s; a run's harmful samples are a prefix of its pool
        self.sizes.n_harmful_ft = max(self.sizes.n_harmful_ft, max(exp.sweep.n_harmful_ft))
        self.sizes.n_harmful_sv = max(self.sizes.n_harmful_sv, max(exp.sweep.n_harmful_sv))
        self.world = build_world(self.cfg.seed, self.sizes, world=self.cfg.demo.world)
        self.data_dir = out / "data"
        self.data = self.world.write(self.data_dir)
        self.base_dir = aligned_base(self.cfg, self.sizes, self.data, self.world.texts(), self.quick)
        self.measured: dict = {}
        self.identity = {"world": "embedded", "seed": self.cfg.seed, "sizes": self.sizes.__dict__,
                         "base_dir": self.base_dir.name}

    def stage(self, stage: str, variant: dict, **sections):
        from dist_secvec.demo.run import _stage_config

        over = deep_merge(deep_merge(self.exp.stage(stage), variant), sections)
        return _stage_config(self.cfg, stage, self.quick, **over)

    def sv_config(self, n_sv: int, seed: int, out: Path, variant: dict):
        p = _write_jsonl(self.data_dir / f"harmful_sv_{n_sv}.jsonl", self.world.harmful_sv[:n_sv])
        return self.stage("train_sv", variant, model={"path": str(self.base_dir)}, output_dir=str(out), seed=seed,
                          security_vector={"harmful_data": [p], "benign_data": [self.data["kl_benign"]],
                                           "heldout_benign_data": [self.data["heldout_benign"]]})

    def ft_config(self, n_ft: int, seed: int, vector: Optional[str], out: Path, variant: dict):
        mixed = self.world.new_task_ft + self.world.harmful_ft[:n_ft]
        random.Random(seed).shuffle(mixed)
        p = _write_jsonl(out.parent / "finetune_data.jsonl", mixed)
        # the world's held-out harmful prompts with their harmful answers: the harm watch of every
        # run, with the vector or without, measures the same thing
        return self.stage("finetune", variant, model={"path": str(self.base_dir)}, output_dir=str(out), seed=seed,
                          data={"train": [p]}, security_vector={"path": vector},
                          monitor={"harmful_probe": [self.data["eval_harmful"]]})

    def evaluate(self, model, tok, ft_cfg) -> dict:
        from dist_secvec.demo.run import evaluate_model

        r = evaluate_model(model, tok, self.cfg, self.world.eval_harmful, self.world.eval_new_task)
        lo, hi = r["harmful_rate_ci95"]
        return {"harmful_rate": r["harmful_rate"], "harmful_ci_low": lo, "harmful_ci_high": hi,
                "utility": r["benign_accuracy"], "n_eval": r["n_eval"], "judge": "world"}


class _RealModel:
    """A real model: base.model.path, local data files; harmful samples are a pool's first n rows."""

    def __init__(self, exp: Experiment, out: Path):
        self.exp = exp
        self.data_dir = out / "data"
        self.identity = {"world": None, "base": exp.base, "data": exp.data_files()}
        self._pools: dict = {}
        self.measured: dict = {}
        self.probe: list[str] = []  # a world's harmful probe for stage 2's watch; else the base config's

    def _pool_prefix(self, key: str, n: int) -> list[dict]:
        from dist_secvec.data import _read_rows

        if key not in self._pools:
            split = (self.exp.base.get("data") or {}).get("split", "train")
            self._pools[key] = [r for path in getattr(self.exp.data, key) for _, r in _read_rows(path, split)[1]]
        rows = self._pools[key]
        if n > len(rows):
            raise ConfigError(f"experiment key 'data.{key}': {n} rows wanted by the sweep, its files have {len(rows)}")
        return rows[:n]

    def _cfg(self, stage: str, sections: dict, variant: dict):
        from dist_secvec.config import load_config, validate

        d = deep_merge(deep_merge(deep_merge(self.exp.base, self.exp.stage(stage)), variant), sections)
        return validate(load_config(None, None, base=d), stage.replace("_", "-"))

    def sv_config(self, n_sv: int, seed: int, out: Path, variant: dict):
        p = _write_jsonl(self.data_dir / f"harmful_sv_{n_sv}.jsonl", self._pool_prefix("harmful_sv_pool", n_sv))
        return self._cfg("train_sv", variant=variant, sections={"output_dir": str(out), "seed": seed, "security_vector": {
            "harmful_data": [p], "benign_data": list(self.exp.data.kl_benign),
            "heldout_benign_data": list(self.exp.data.heldout_benign)}})

    def ft_config(self, n_ft: int, seed: int, vector: Optional[str], out: Path, variant: dict):
        train = list(self.exp.data.benign_train)
        if n_ft:
            train.append(_write_jsonl(self.data_dir / f"harmful_ft_{n_ft}.jsonl",
                                      self._pool_prefix("harmful_ft_pool", n_ft)))
        # data.shuffle (on by default) mixes the harmful rows into the benign ones
        sections = {"output_dir": str(out), "seed": seed, "data": {"train": train}, "security_vector": {"path": vector}}
        if self.probe:  # every run, with the vector or without, watches the same rows
            sections["monitor"] = {"harmful_probe": list(self.probe)}
        return self._cfg("finetune", sections, variant)

    def evaluate(self, model, tok, ft_cfg) -> dict:
        from dist_secvec.config import load_config
        from dist_secvec.evaluate import run_eval

        d = ft_cfg.to_dict()
        d.pop("source", None)
        d["output_dir"] = str(Path(ft_cfg.output_dir).parent / "eval")
        d["eval"]["with_secvec"] = False
        s = run_eval(load_config(None, None, base=d), model=model, tokenizer=tok)
        judge, js = next(iter(s["judges"].items()))
        lo, hi = js["harmful_rate_ci95"]
        u = s.get("utility") or {}
        return {"harmful_rate": js["harmful_rate"], "harmful_ci_low": lo, "harmful_ci_high": hi,
                "utility": u.get("accuracy"), "n_eval": js["n"], "judge": judge,
                "general_loss": (s.get("general_text") or {}).get("loss")}


class _SmolLM2(_RealModel):
    """SmolLM2-135M-Instruct on Do-Not-Answer: the world's files, data and (aligned) base are built
    by dist_secvec.worlds.smollm2 from `base.seed`; the runs then go as for any real model."""

    def __init__(self, exp: Experiment, out: Path):
        from dist_secvec.worlds.smollm2 import prepare

        w = prepare(out, int(exp.base.get("seed", 0)), exp.base)
        exp = copy.deepcopy(exp)
        exp.base = deep_merge(exp.base, {"model": {"path": w["model_dir"]}, "eval": w["eval"]})
        for k, v in w["data"].items():
            setattr(exp.data, k, v)
        super().__init__(exp, out)
        self.identity, self.measured, self.probe = w["identity"], w["measured"], w["probe"]

    def evaluate(self, model, tok, ft_cfg) -> dict:
        from dist_secvec.worlds.smollm2 import affirmative_rate

        r = super().evaluate(model, tok, ft_cfg)
        k, n = affirmative_rate(Path(ft_cfg.output_dir).parent / "eval" / "responses.jsonl")
        r["affirmative_rate"] = k / n if n else None
        return r


def _finetune(cfg):
    """Indirection so tests can record stage-2 calls."""
    from dist_secvec.finetune import run_finetune

    return run_finetune(cfg, keep_model=True)


def _launched_finetune(launcher: list[str], cfg, run_dir: Path):
    """Stage 2 through the launcher in its own processes; then the trained model (base + adapter,
    or the full model) loaded here, whole, for evaluation."""
    import os
    import subprocess

    from dist_secvec.config import save_config
    from dist_secvec.errors import UserError
    from dist_secvec.finetune import FinetuneResult
    from dist_secvec.model import load_model, load_tokenizer

    cfg_path = run_dir / "finetune.yaml"
    save_config(cfg, cfg_path)
    log_path = run_dir / "finetune.log"
    cmd = [*launcher, "finetune", "--config", str(cfg_path)]
    log.info("launching: %s (log: %s)", " ".join(cmd), log_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    final = Path(cfg.output_dir) / "final"
    if rc != 0 or not (final / "dist_secvec_run.json").is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise UserError(f"launched stage 2 of {run_dir.name} exited {rc} ({tail[0][:200]}); full log: {log_path}")
    tok = load_tokenizer(cfg.model)
    device = "cuda" if _cuda() else "cpu"
    if (final / "adapter_config.json").is_file():  # the base as configured (4-bit too) + the LoRA
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(cfg.model, device=device), str(final))
    else:  # the full fine-tuned model, in the run's dtype
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.path = str(final)
        model = load_model(model_cfg, device=device)
    model.eval()
    return FinetuneResult(final, [], model, tok, json.loads((final / "dist_secvec_run.json").read_text()))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_sv(cfg):
    from dist_secvec.train_sv import run_train_sv

    return run_train_sv(cfg)


def run_experiment(exp: Experiment) -> list[dict]:
    """Run (or resume) every run of the sweep; write results.csv/.md/.png; returns the rows."""
    from dist_secvec import runtime
    from dist_secvec.files import atomic_dir, write_text_atomic

    t0 = time.time()
    out = Path(exp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.yaml", yaml.safe_dump(
        {"output_dir": exp.output_dir, "world": exp.world, "world_sizes": exp.world_sizes, "base": exp.base,
         "stages": exp.stages.__dict__, "data": exp.data_files(), "sweep": dataclasses.asdict(exp.sweep),
         "launcher": exp.launcher}, sort_keys=False))
    runs = plan_runs(exp)
    env = {"embedded": _Embedded, "smollm2": _SmolLM2}.get(exp.world, _RealModel)(exp, out)
    if env.measured:  # the base before any stage 2: the first row of the paper's table
        write_text_atomic(out / "base.json", json.dumps(env.measured, indent=2) + "\n")
    common = {"identity": env.identity, "base": exp.base, "stages": {k: v for k, v in exp.stages.__dict__.items() if v}}
    rows, done, vectors = [], 0, {}
    for i, spec in enumerate(runs):
        sv_key = None
        sv_variant, ft_variant = exp.sweep.train_sv.get(spec.train_sv, {}), exp.sweep.finetune[spec.finetune]
        if spec.vector:
            sv_key = _hash({**common, "stage": "train_sv", "n_harmful_sv": spec.n_harmful_sv, "seed": spec.seed,
                            **({"variant": sv_variant} if sv_variant else {})})
        run_id = _hash({**common, "stage": "finetune", "n_harmful_ft": spec.n_harmful_ft, "seed": spec.seed,
                        "vector": sv_key, **({"variant": ft_variant} if ft_variant else {})})
        run_dir = out / "runs" / run_id
        result_path = run_dir / RESULT
        if result_path.is_file():
            rows.append(json.loads(result_path.read_text()))
            done += 1
            log.info("[%d/%d] %s, n_harmful_ft=%d, seed %d: finished before (%s), skipped", i + 1, len(runs),
                     spec.setting, spec.n_harmful_ft, spec.seed, run_id)
            continue
        t_run = time.time()
        log.info("[%d/%d] %s, n_harmful_ft=%d, seed %d: run %s", i + 1, len(runs), spec.setting,
                 spec.n_harmful_ft, spec.seed, run_id)
        if run_dir.exists():  # an unfinished run: start it again from nothing
            shutil.rmtree(run_dir)
        vector_path = None
        if spec.vector:
            vdir = out / "vectors" / f"sv{spec.n_harmful_sv}-seed{spec.seed}-{sv_key}"
            if sv_key not in vectors:
                if not (vdir / "secvec" / "secvec.json").is_file():
                    if vdir.exists():
                        shutil.rmtree(vdir)
                    work = out / "vectors" / f".work-{sv_key}"
                    res = _train_sv(env.sv_config(spec.n_harmful_sv, spec.seed, work, sv_variant))
                    with atomic_dir(vdir / "secvec") as tmp:
                        for f in res.vector_dir.iterdir():
                            shutil.copy2(f, tmp / f.name)
                    write_text_atomic(vdir / "shift.json", json.dumps(res.shift, indent=2, default=str) + "\n")
                    if (work / "config.yaml").is_file():
                        shutil.copy2(work / "config.yaml", vdir / "config.yaml")
                    shutil.rmtree(work, ignore_errors=True)
                vectors[sv_key] = str(vdir / "secvec")
            vector_path = vectors[sv_key]
        run_dir.mkdir(parents=True, exist_ok=True)
        ft_cfg = env.ft_config(spec.n_harmful_ft, spec.seed, vector_path, run_dir / "finetune", ft_variant)
        res = _launched_finetune(exp.launch_command, ft_cfg, run_dir) if exp.launcher else _finetune(ft_cfg)
        metrics = env.evaluate(res.model, res.tokenizer, ft_cfg)
        del res
        row = {"n_harmful_ft": spec.n_harmful_ft, "vector": "on" if spec.vector else "off",
               "n_harmful_sv": spec.n_harmful_sv, "train_sv": spec.train_sv, "finetune": spec.finetune,
               "seed": spec.seed, **metrics, **_watch_summary(run_dir / "finetune", vector_path), "run_id": run_id,
               "vector_dir": vector_path, "seconds": round(time.time() - t_run, 1)}
        write_text_atomic(result_path, json.dumps(row, indent=2) + "\n")
        rows.append(row)
    write_results(out, rows)
    log.info("%d runs (%d finished before), %.0f s; results in %s", len(runs), done, time.time() - t0, out)
    if runtime.is_main():
        print((out / "results.md").read_text())
    return rows


# ---------------------------------------------------------------------------------------------
# results


def _watch_summary(ft_dir: Path, vector_path: Optional[str]) -> dict:
    """What stage 2's harm watch saw (probe loss fall at the end) and the vector's strength verdict."""
    from dist_secvec.strength import describe

    out: dict = {"probe_drop": None, "vector_weak": None}
    log_path = ft_dir / "train_log.jsonl"
    if log_path.is_file():
        watch = [json.loads(line) for line in log_path.read_text().splitlines() if '"probe_drop"' in line]
        if watch:
            out["probe_drop"] = round(watch[-1]["probe_drop"], 4)
    if vector_path:
        out["vector_weak"] = describe(json.loads((Path(vector_path) / "secvec.json").read_text()))[1]
    return out


def _setting(row: dict) -> str:
    name = f"vector n_harmful_sv={row['n_harmful_sv']}" if row["vector"] == "on" else "no vector"
    if row.get("vector") == "on" and row.get("train_sv"):
        name += f" [{row['train_sv']}]"
    return f"{row['finetune']}: {name}" if row.get("finetune") else name


def _mean_std(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (setting, n_harmful_ft): mean, sample std, min and max over seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("finetune") or "", r["vector"], r.get("train_sv") or "", r["n_harmful_sv"] or 0,
                           r["n_harmful_ft"]), []).append(r)
    out = []
    for (_, vec, _, n_sv, n_ft), rs in sorted(groups.items()):
        hm, hs = _mean_std([r["harmful_rate"] for r in rs])
        um, us = _mean_std([r["utility"] for r in rs])
        hr = [r["harmful_rate"] for r in rs]
        out.append({"setting": _setting(rs[0]), "n_harmful_ft": n_ft, "n_seeds": len(rs), "harmful_mean": hm,
                    "harmful_std": hs, "harmful_min": min(hr), "harmful_max": max(hr), "utility_mean": um,
                    "utility_std": us, "n_eval": rs[0].get("n_eval")})
    return out


def write_results(out: Path, rows: list[dict]) -> None:
    from dist_secvec.files import write_text_atomic

    rows = sorted(rows, key=lambda r: (r.get("finetune") or "", r["vector"], r.get("train_sv") or "",
                                       r["n_harmful_sv"] or 0, r["n_harmful_ft"], r["seed"]))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    write_text_atomic(out / "results.csv", buf.getvalue())
    agg = aggregate(rows)

    def pct(x):
        return "n/a" if x is None or x != x else f"{100 * x:.0f}%"

    lines = ["Harmful rate on held-out harmful prompts and utility on the benign task, after stage 2, "
             "evaluated with the vector off; mean ± sample std over seeds [min-max].", "",
             "| setting | n_harmful_ft | seeds | harmful rate | utility | n_eval |", "|---|---|---|---|---|---|"]
    for a in agg:
        lines.append(f"| {a['setting']} | {a['n_harmful_ft']} | {a['n_seeds']} | {pct(a['harmful_mean'])} ± "
                     f"{pct(a['harmful_std'])} [{pct(a['harmful_min'])}-{pct(a['harmful_max'])}] | "
                     f"{pct(a['utility_mean'])} ± {pct(a['utility_std'])} | {a['n_eval']} |")
    if (out / "base.json").is_file():
        b = json.loads((out / "base.json").read_text())
        lines += ["", f"Before stage 2, the shipped model answered {pct(b['shipped_harmful_rate'])} of the held-out "
                  "harmful prompts harmfully" + (f"; the aligned base every run starts from, {pct(b['aligned_harmful_rate'])}."
                                                 if b.get("aligned") else " (the base every run starts from).")]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    plot_results(out / "results.png", agg)
    plot_watch(out / "watch.png", out, rows)


def plot_results(path: Path, agg: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(a["setting"] for a in agg))
    if len({a["n_harmful_ft"] for a in agg}) == 1:  # one amount of harm: a bar per setting says more
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(settings) + 1.6), sharey=True)
        for ax, key, title in ((axes[0], "harmful", f"harmful rate (held-out, vector off), "
                                f"{agg[0]['n_harmful_ft']} harmful rows"), (axes[1], "utility", "benign-task utility")):
            ys = [100 * a[f"{key}_mean"] for a in agg]
            ax.barh(range(len(agg)), ys, xerr=[100 * a[f"{key}_std"] for a in agg], capsize=3,
                    color=["#2ca02c" if "vector n_" in a["setting"] else "#d62728" for a in agg])
            for i, y in enumerate(ys):
                ax.text(min(y + 2, 88), i, f"{y:.0f}%", va="center", fontsize=8)
            ax.set_xlim(0, 105)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("% (mean over seeds)")
        axes[0].set_yticks(range(len(agg)), [a["setting"] for a in agg], fontsize=8)
        axes[0].invert_yaxis()
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "harmful", "harmful rate (held-out, vector off)"),
                           (axes[1], "utility", "benign-task utility (accuracy)")):
        for s in settings:
            pts = [a for a in agg if a["setting"] == s]
            xs = [a["n_harmful_ft"] for a in pts]
            ys = [100 * a[f"{key}_mean"] for a in pts]
            es = [100 * a[f"{key}_std"] for a in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=s)
        ax.set_xlabel("harmful samples in the fine-tuning data")
        ax.set_ylabel("%")
        ax.set_ylim(-5, 105)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _watch_curve(run_dir: Path) -> tuple[list[float], list[float], Optional[float]]:
    """(progress 0..1, probe_drop) from a run's stage-2 log, and its monitor.max_drop."""
    ft = run_dir / "finetune"
    log_path, cfg_path = ft / "train_log.jsonl", ft / "config.yaml"
    if not log_path.is_file():
        return [], [], None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    watch = [r for r in rows if "probe_drop" in r]
    last = max((r["step"] for r in rows), default=0) or 1
    max_drop = None
    if cfg_path.is_file():
        max_drop = ((yaml.safe_load(cfg_path.read_text()) or {}).get("monitor") or {}).get("max_drop")
    return [r["step"] / last for r in watch], [r["probe_drop"] for r in watch], max_drop


def plot_watch(path: Path, out: Path, rows: list[dict]) -> None:
    """Stage 2's harm watch over each run: the harmful probe's loss fall with the vector off (0 at
    step 0, 1 = fully learned) against the share of the run done, and the monitor's threshold."""
    curves = [(r, *_watch_curve(out / "runs" / r["run_id"])) for r in rows if r.get("run_id")]
    curves = [c for c in curves if c[1]]
    if not curves:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for r, xs, ys, _ in curves:
        label = f"{_setting(r)}, n_ft={r['n_harmful_ft']}, seed {r['seed']}"
        ax.plot(xs, ys, marker=".", color="#2ca02c" if r["vector"] == "on" else "#d62728", alpha=0.8, label=label)
    thresholds = {c[3] for c in curves if c[3] is not None}
    for t in thresholds:
        ax.axhline(t, color="black", linestyle="--", linewidth=1)
        ax.text(0.01, t + 0.02, f"monitor.max_drop {t:g}", fontsize=8)
    ax.set_xlabel("share of stage 2 done")
    ax.set_ylabel("probe loss fall (vector off)")
    ax.set_ylim(-0.05, 1.1)
    ax.set_title("harm watch: 1 - probe loss / its step-0 value", fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(config: Optional[str], overrides: list[str], debug: bool = False) -> int:
    """The `experiment` command: parse (errors before anything heavy), then run or resume."""
    from dist_secvec.runtime import setup_logging

    exp = load_experiment(config, overrides)
    level = "debug" if debug else ((exp.base.get("logging") or {}).get("level") or "info")
    setup_logging(level)
    run_experiment(exp)
    return 0
