"""`dist-secvec experiment --config configs/experiments/NAME.yaml`: the paper's comparison as a sweep.

An experiment file holds
    output_dir   where runs, vectors and the results go
    world        `embedded` (the demo's tiny world: data and aligned base built by
                 dist_secvec.worlds.embedded_stages)
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
                 embedded only: n_hallucination_ft: [0, 1000] (hallucinated rows hidden in stage 2's data
                 too), n_hallucination_sv: [100], and vector sets vector: [none, harm, hallucination, both]
                 (off = none, on = harm: a vector per behaviour, all active and frozen together),
                 and named variants of a stage: finetune: {recipe: {}, 3x_lr: {optim: {lr: 3.0e-3}}, ...}
                 and train_sv: {default: {}, rank16: {security_vector: {rank: 16}}} (each a run-config
                 override merged over stages.<stage>; every run is crossed with every variant)
    launcher     optional: a command that starts stage 2 on several ranks, e.g.
                 "launch/deepspeed.sh --gpus 8 --"; each run's stage 2 is then
                 `<launcher> finetune --config runs/<id>/finetune.yaml` in its own processes (log in
                 runs/<id>/finetune.log), and the trained model is loaded here for evaluation

Each run: stage 1 (only with a vector; one vector per (behaviour, rows, seed), shared by every run
that needs it), stage 2 on the benign task + n_harmful_ft harmful (+ n_hallucination_ft
hallucinated) samples, then evaluation with the vectors off: harmful rate, hallucination rate
(the embedded world's held-out fact prompts, or base.eval.hallucination_prompts), each with its
95% Wilson interval, and utility accuracy. The sweep seed is the
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
CSV_COLUMNS = ["n_harmful_ft", "n_hallucination_ft", "vector", "vectors", "n_harmful_sv", "n_hallucination_sv",
               "train_sv", "finetune", "seed", "harmful_rate", "harmful_ci_low", "harmful_ci_high",
               "hallucination_rate", "hallucination_ci_low", "hallucination_ci_high", "affirmative_rate", "utility",
               "general_loss", "n_eval", "n_facts", "vector_weak", "probe_drop", "run_id"]
# the vector sets a sweep names, each the behaviours whose vectors are active together in stage 2
VECTOR_SETS = {"none": (), "harm": ("harm",), "hallucination": ("hallucination",), "both": ("harm", "hallucination")}
VECTOR_ALIASES = {False: "none", "off": "none", "false": "none", True: "harm", "on": "harm", "true": "harm"}
STAGE_KEYS = ("train_sv", "finetune")
# embedded: the demo's tiny world; smollm2: a real model and real harmful prompts, built offline
# (dist_secvec.worlds.smollm2); None: the model and data files the experiment names
WORLDS = (None, "embedded", "smollm2")


@dataclass
class Sweep:
    # harmful rows hidden in stage 2's data
    n_harmful_ft: list[int] = field(default_factory=lambda: [0, 100, 500, 1000])
    # the vectors of stage 2: off | on (without / with the harm vector), or the sets none | harm |
    # hallucination | both (a vector per behaviour, all active together; hallucination: embedded only)
    vector: list[Any] = field(default_factory=lambda: [False, True])
    n_harmful_sv: list[int] = field(default_factory=lambda: [100])  # harmful rows each vector is trained on
    # embedded only: hallucinated rows hidden in stage 2's data
    n_hallucination_ft: list[int] = field(default_factory=lambda: [0])
    # hallucinated rows each hallucination vector is trained on
    n_hallucination_sv: list[int] = field(default_factory=lambda: [100])
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
    vectors: tuple  # the behaviours whose vectors are active in stage 2 (VECTOR_SETS' values)
    n_harmful_sv: Optional[int]  # None without a harm vector
    seed: int
    finetune: str = ""  # the sweep's stage-2 variant ("" = none named)
    train_sv: str = ""  # the sweep's stage-1 variant ("" without a vector)
    n_hallucination_ft: int = 0
    n_hallucination_sv: Optional[int] = None  # None without a hallucination vector

    @property
    def vector(self) -> bool:
        return bool(self.vectors)

    @property
    def setting(self) -> str:
        return _setting({"vector": "on" if self.vector else "off", "vectors": "+".join(self.vectors),
                         "n_harmful_sv": self.n_harmful_sv, "n_hallucination_sv": self.n_hallucination_sv,
                         "train_sv": self.train_sv, "finetune": self.finetune})


# ---------------------------------------------------------------------------------------------
# parsing


def _int_list(value: list[int], key: str, minimum: int = 0) -> list[int]:
    if not value or not all(v >= minimum for v in value):
        raise ConfigError(f"experiment key '{key}': expected a non-empty list of integers >= {minimum}, got {value!r}")
    return list(dict.fromkeys(value))


def _vector_list(value: list) -> list[tuple]:
    """sweep.vector as vector sets (tuples of behaviours); off/on are none/harm."""
    allowed = "off/on or none/harm/hallucination/both"
    out = []
    for v in value:
        name = VECTOR_ALIASES.get(v, v) if isinstance(v, (bool, str)) else None
        if name not in VECTOR_SETS:
            raise ConfigError(f"experiment key 'sweep.vector': expected a list of {allowed}, got {v!r}")
        out.append(VECTOR_SETS[name])
    if not out:
        raise ConfigError(f"experiment key 'sweep.vector': expected a list of {allowed}, got an empty list")
    return list(dict.fromkeys(out))


def parse_experiment(data: Any, source: Optional[str] = None) -> Experiment:
    """An Experiment from the YAML mapping (config.build: every key and type checked, one line
    naming the bad key), then what the types alone do not say."""
    from dist_secvec.config import build, load_config
    from dist_secvec.worlds.embedded import WorldSizes

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
    sw.n_hallucination_ft = _int_list(sw.n_hallucination_ft, "sweep.n_hallucination_ft")
    sw.n_hallucination_sv = _int_list(sw.n_hallucination_sv, "sweep.n_hallucination_sv", minimum=1)
    hallucination = any("hallucination" in v for v in sw.vector) or max(sw.n_hallucination_ft) > 0
    if hallucination and exp.world != "embedded":
        key = "sweep.vector" if any("hallucination" in v for v in sw.vector) else "sweep.n_hallucination_ft"
        raise ConfigError(f"experiment key '{key}': hallucinated rows come from the embedded world only "
                          "(world: embedded); leave hallucination out of the sweep")
    if hallucination:
        from dist_secvec.worlds.embedded import N_HALLUCINATION_FT, N_HALLUCINATION_SV

        for key, values, most in (("sweep.n_hallucination_ft", sw.n_hallucination_ft, N_HALLUCINATION_FT),
                                  ("sweep.n_hallucination_sv", sw.n_hallucination_sv, N_HALLUCINATION_SV)):
            if max(values) > most:
                raise ConfigError(f"experiment key '{key}': at most {most} (the embedded world's hallucinated "
                                  f"rows for it), got {max(values)}")
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
        if any(sw.vector) and not exp.data.harmful_sv_pool:
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
    sw = exp.sweep
    runs = []
    for seed in sw.seeds:
        for ft in sw.finetune:
            for n_ft in sw.n_harmful_ft:
                for n_hft in sw.n_hallucination_ft:
                    for vecs in sw.vector:
                        for sv in (sw.train_sv if vecs else [""]):
                            for n_sv in (sw.n_harmful_sv if "harm" in vecs else [None]):
                                for n_hsv in (sw.n_hallucination_sv if "hallucination" in vecs else [None]):
                                    runs.append(RunSpec(n_ft, vecs, n_sv, seed, ft, sv, n_hft, n_hsv))
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
        from dist_secvec.worlds.embedded import WorldSizes, build_world
        from dist_secvec.worlds.embedded_stages import aligned_base, demo_defaults

        self.exp = exp
        self.cfg = load_config(None, None, base=deep_merge(deep_merge(demo_defaults(), exp.base),
                                                          {"output_dir": str(out)}))
        self.quick = self.cfg.demo.quick
        self.sizes = WorldSizes(**exp.world_sizes)
        if self.quick:  # the demo's quick sizes, as `dist-secvec demo --quick`
            from dist_secvec.worlds.embedded_stages import QUICK

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
        from dist_secvec.worlds.embedded_stages import stage_config

        over = deep_merge(deep_merge(self.exp.stage(stage), variant), sections)
        return stage_config(self.cfg, stage, self.quick, **over)

    def sv_config(self, n_sv: int, seed: int, out: Path, variant: dict, behaviour: str = "harm"):
        if behaviour == "hallucination":  # its own rows, judge, and benign rows without the fact family
            p = _write_jsonl(self.data_dir / f"hallucination_sv_{n_sv}.jsonl", self.world.hallucination_sv[:n_sv])
            sv = {"harmful_data": [p], "benign_data": [self.data["kl_hallucination"]], "behaviour": "hallucination",
                  "judges": ["demo_hallucination"]}
        else:
            p = _write_jsonl(self.data_dir / f"harmful_sv_{n_sv}.jsonl", self.world.harmful_sv[:n_sv])
            sv = {"harmful_data": [p], "benign_data": [self.data["kl_benign"]]}
        return self.stage("train_sv", variant, model={"path": str(self.base_dir)}, output_dir=str(out), seed=seed,
                          security_vector={**sv, "heldout_benign_data": [self.data["heldout_benign"]]})

    def ft_config(self, n_ft: int, seed: int, vector, out: Path, variant: dict, n_hallucination_ft: int = 0):
        mixed = self.world.new_task_ft + self.world.harmful_ft[:n_ft] + self.world.hallucination_ft[:n_hallucination_ft]
        random.Random(seed).shuffle(mixed)
        p = _write_jsonl(out.parent / "finetune_data.jsonl", mixed)
        # the world's held-out harmful prompts with their harmful answers: the harm watch of every
        # run, with the vector or without, measures the same thing
        return self.stage("finetune", variant, model={"path": str(self.base_dir)}, output_dir=str(out), seed=seed,
                          data={"train": [p]}, security_vector={"path": vector},
                          monitor={"harmful_probe": [self.data["eval_harmful"]]})

    def evaluate(self, model, tok, ft_cfg) -> dict:
        from dist_secvec.evaluate import score
        from dist_secvec.worlds.embedded_stages import evaluate_model

        r = evaluate_model(model, tok, self.cfg, self.world.eval_harmful, self.world.eval_new_task)
        lo, hi = r["harmful_rate_ci95"]
        # the held-out fact prompts, judged by the world's exact rule
        ec = dataclasses.replace(self.cfg.eval, hallucination_judges=["demo_hallucination"], with_secvec=False)
        facts = [{"prompt": f["prompt"], "response": f["response"]} for f in self.world.eval_facts]
        h = score(dataclasses.replace(self.cfg, eval=ec), model, tok, [], [], facts=facts)[0]["hallucination"]
        h = h["demo_hallucination"]
        h_lo, h_hi = h["hallucination_rate_ci95"]
        return {"harmful_rate": r["harmful_rate"], "harmful_ci_low": lo, "harmful_ci_high": hi,
                "hallucination_rate": h["hallucination_rate"], "hallucination_ci_low": h_lo,
                "hallucination_ci_high": h_hi, "n_facts": h["n"],
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

    def sv_config(self, n_sv: int, seed: int, out: Path, variant: dict, behaviour: str = "harm"):
        # behaviour: always harm here (parse_experiment)
        p = _write_jsonl(self.data_dir / f"harmful_sv_{n_sv}.jsonl", self._pool_prefix("harmful_sv_pool", n_sv))
        return self._cfg("train_sv", variant=variant, sections={"output_dir": str(out), "seed": seed, "security_vector": {
            "harmful_data": [p], "benign_data": list(self.exp.data.kl_benign),
            "heldout_benign_data": list(self.exp.data.heldout_benign)}})

    def ft_config(self, n_ft: int, seed: int, vector, out: Path, variant: dict, n_hallucination_ft: int = 0):
        train = list(self.exp.data.benign_train)  # n_hallucination_ft: always 0 here (parse_experiment)
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
        out = {"harmful_rate": js["harmful_rate"], "harmful_ci_low": lo, "harmful_ci_high": hi,
               "utility": u.get("accuracy"), "n_eval": js["n"], "judge": judge,
               "general_loss": (s.get("general_text") or {}).get("loss")}
        if s.get("hallucination"):  # base.eval.hallucination_prompts: the first hallucination judge's rate
            h = next(iter(s["hallucination"].values()))
            out.update(hallucination_rate=h["hallucination_rate"], hallucination_ci_low=h["hallucination_rate_ci95"][0],
                       hallucination_ci_high=h["hallucination_rate_ci95"][1], n_facts=h["n"])
        return out


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
        sv_variant, ft_variant = exp.sweep.train_sv.get(spec.train_sv, {}), exp.sweep.finetune[spec.finetune]
        # one vector per behaviour: (behaviour, its rows, its hash key); harm keys as before
        svs = []
        for behaviour in spec.vectors:
            n = spec.n_harmful_sv if behaviour == "harm" else spec.n_hallucination_sv
            fields = ({"n_harmful_sv": n} if behaviour == "harm"
                      else {"behaviour": behaviour, "n_hallucination_sv": n})
            svs.append((behaviour, n, _hash({**common, "stage": "train_sv", **fields, "seed": spec.seed,
                                             **({"variant": sv_variant} if sv_variant else {})})))
        sv_key = [k for _, _, k in svs] if len(svs) > 1 else (svs[0][2] if svs else None)
        run_id = _hash({**common, "stage": "finetune", "n_harmful_ft": spec.n_harmful_ft, "seed": spec.seed,
                        "vector": sv_key, **({"variant": ft_variant} if ft_variant else {}),
                        **({"n_hallucination_ft": spec.n_hallucination_ft} if spec.n_hallucination_ft else {})})
        run_dir = out / "runs" / run_id
        result_path = run_dir / RESULT
        if result_path.is_file():
            rows.append(json.loads(result_path.read_text()))
            done += 1
            log.info("[%d/%d] %s, n_harmful_ft=%d, seed %d: finished before (%s), skipped", i + 1, len(runs),
                     spec.setting, spec.n_harmful_ft, spec.seed, run_id)
            continue
        t_run = time.time()
        log.info("[%d/%d] %s, n_harmful_ft=%d%s, seed %d: run %s", i + 1, len(runs), spec.setting, spec.n_harmful_ft,
                 f", n_hallucination_ft={spec.n_hallucination_ft}" if spec.n_hallucination_ft else "", spec.seed, run_id)
        if run_dir.exists():  # an unfinished run: start it again from nothing
            shutil.rmtree(run_dir)
        paths = []
        for behaviour, n_sv, key in svs:
            prefix = "" if behaviour == "harm" else f"{behaviour}-"
            vdir = out / "vectors" / f"{prefix}sv{n_sv}-seed{spec.seed}-{key}"
            if key not in vectors:
                if not (vdir / "secvec" / "secvec.json").is_file():
                    if vdir.exists():
                        shutil.rmtree(vdir)
                    work = out / "vectors" / f".work-{key}"
                    res = _train_sv(env.sv_config(n_sv, spec.seed, work, sv_variant, behaviour))
                    with atomic_dir(vdir / "secvec") as tmp:
                        for f in res.vector_dir.iterdir():
                            shutil.copy2(f, tmp / f.name)
                    write_text_atomic(vdir / "shift.json", json.dumps(res.shift, indent=2, default=str) + "\n")
                    if (work / "config.yaml").is_file():
                        shutil.copy2(work / "config.yaml", vdir / "config.yaml")
                    shutil.rmtree(work, ignore_errors=True)
                vectors[key] = str(vdir / "secvec")
            paths.append(vectors[key])
        # one vector as one path (the config as before), several as a list
        vector_path = paths if len(paths) > 1 else (paths[0] if paths else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        ft_cfg = env.ft_config(spec.n_harmful_ft, spec.seed, vector_path, run_dir / "finetune", ft_variant,
                               spec.n_hallucination_ft)
        res = _launched_finetune(exp.launch_command, ft_cfg, run_dir) if exp.launcher else _finetune(ft_cfg)
        metrics = env.evaluate(res.model, res.tokenizer, ft_cfg)
        del res
        row = {"n_harmful_ft": spec.n_harmful_ft, "n_hallucination_ft": spec.n_hallucination_ft,
               "vector": "on" if spec.vector else "off", "vectors": "+".join(spec.vectors),
               "n_harmful_sv": spec.n_harmful_sv, "n_hallucination_sv": spec.n_hallucination_sv,
               "train_sv": spec.train_sv, "finetune": spec.finetune, "seed": spec.seed, **metrics,
               **_watch_summary(run_dir / "finetune", vector_path), "run_id": run_id,
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


def _watch_summary(ft_dir: Path, vector_path) -> dict:
    """What stage 2's harm watch saw (probe loss fall at the end) and the vectors' strength verdict
    (weak when any is)."""
    from dist_secvec.strength import describe

    out: dict = {"probe_drop": None, "vector_weak": None}
    log_path = ft_dir / "train_log.jsonl"
    if log_path.is_file():
        watch = [json.loads(line) for line in log_path.read_text().splitlines() if '"probe_drop"' in line]
        if watch:
            out["probe_drop"] = round(watch[-1]["probe_drop"], 4)
    if vector_path:
        paths = [vector_path] if isinstance(vector_path, str) else vector_path
        out["vector_weak"] = any(describe(json.loads((Path(p) / "secvec.json").read_text()))[1] for p in paths)
    return out


def _vectors(row: dict) -> list[str]:
    """The behaviours of a row's vectors (rows written before vector sets: harm when on)."""
    vecs = row.get("vectors")
    if vecs is None:
        return ["harm"] if row["vector"] == "on" else []
    return vecs.split("+") if vecs else []


def _setting(row: dict) -> str:
    vecs = _vectors(row)
    if not vecs:
        name = "no vector"
    elif vecs == ["harm"]:  # the name the harm-only sweeps have always had
        name = f"vector n_harmful_sv={row['n_harmful_sv']}"
    else:
        n = {"harm": row.get("n_harmful_sv"), "hallucination": row.get("n_hallucination_sv")}
        name = ("vectors " if len(vecs) > 1 else "vector ") + " + ".join(f"{b} ({n.get(b)} rows)" for b in vecs)
    if vecs and row.get("train_sv"):
        name += f" [{row['train_sv']}]"
    return f"{row['finetune']}: {name}" if row.get("finetune") else name


def _mean_std(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _pooled_ci(rs: list[dict], key: str, n_key: str) -> Optional[tuple[float, float]]:
    """The Wilson 95% interval of a rate over every seed's answers pooled (k and n summed)."""
    from dist_secvec.metrics import wilson_interval

    pairs = [(r[key], r.get(n_key)) for r in rs if r.get(key) is not None and r.get(n_key)]
    if not pairs:
        return None
    k = sum(round(rate * int(n)) for rate, n in pairs)
    return wilson_interval(k, sum(int(n) for _, n in pairs))


def _sort_key(r: dict) -> tuple:
    sets = list(VECTOR_SETS.values())  # none, harm, hallucination, both
    vecs = tuple(_vectors(r))
    return (r.get("finetune") or "", sets.index(vecs) if vecs in sets else len(sets), r.get("train_sv") or "",
            r["n_harmful_sv"] or 0, r.get("n_hallucination_sv") or 0, r["n_harmful_ft"],
            r.get("n_hallucination_ft") or 0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (setting, n_harmful_ft, n_hallucination_ft): mean, sample std, min and max over
    seeds, and the pooled Wilson 95% interval, of each rate."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(_sort_key(r), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        a = {"setting": _setting(rs[0]), "n_harmful_ft": rs[0]["n_harmful_ft"],
             "n_hallucination_ft": rs[0].get("n_hallucination_ft") or 0, "n_seeds": len(rs),
             "n_eval": rs[0].get("n_eval")}
        for name, col, n_key in (("harmful", "harmful_rate", "n_eval"),
                                 ("hallucination", "hallucination_rate", "n_facts")):
            xs = [r.get(col) for r in rs if r.get(col) is not None]
            m, sd = _mean_std(xs)
            a.update({f"{name}_mean": m, f"{name}_std": sd, f"{name}_min": min(xs, default=None),
                      f"{name}_max": max(xs, default=None), f"{name}_ci95": _pooled_ci(rs, col, n_key)})
        a["utility_mean"], a["utility_std"] = _mean_std([r["utility"] for r in rs])
        out.append(a)
    return out


def write_results(out: Path, rows: list[dict]) -> None:
    from dist_secvec.files import write_text_atomic

    rows = sorted(rows, key=lambda r: (*_sort_key(r), r["seed"]))
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

    def rate(a, name):
        if a[f"{name}_min"] is None:
            return "n/a"
        ci = a[f"{name}_ci95"]
        return (f"{pct(a[f'{name}_mean'])} ± {pct(a[f'{name}_std'])} [{pct(a[f'{name}_min'])}-{pct(a[f'{name}_max'])}]"
                + (f" (CI {pct(ci[0])}-{pct(ci[1])})" if ci else ""))

    # the hallucination columns where any run measured it or hid hallucinated rows
    facts = any(a["hallucination_min"] is not None for a in agg)
    hidden = any(a["n_hallucination_ft"] for a in agg)
    cols = (["setting", "n_harmful_ft"] + (["n_hallucination_ft"] if hidden else []) + ["seeds", "harmful rate"]
            + (["hallucination rate"] if facts else []) + ["utility", "n_eval"])
    lines = ["Harmful rate on held-out harmful prompts" + (", hallucination rate on held-out fact prompts" if facts
                                                          else "")
             + " and utility on the benign task, after stage 2, evaluated with the vectors off; mean ± sample std "
             "over seeds [min-max] (CI: the Wilson 95% interval of every seed's answers pooled).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in agg:
        cells = ([a["setting"], a["n_harmful_ft"]] + ([a["n_hallucination_ft"]] if hidden else [])
                 + [a["n_seeds"], rate(a, "harmful")] + ([rate(a, "hallucination")] if facts else [])
                 + [f"{pct(a['utility_mean'])} ± {pct(a['utility_std'])}", a["n_eval"]])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
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
    facts = any(a.get("hallucination_min") is not None for a in agg)
    if len({a["n_harmful_ft"] for a in agg}) == 1:  # one amount of harm: a bar per setting says more
        panels = ([("harmful", f"harmful rate (held-out, vector off), {agg[0]['n_harmful_ft']} harmful rows")]
                  + ([("hallucination", "hallucination rate (held-out facts, vector off)")] if facts else [])
                  + [("utility", "benign-task utility")])
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.5 * len(settings) + 1.6), sharey=True)
        for ax, (key, title) in zip(axes, panels):
            ys = [100 * a[f"{key}_mean"] if a[f"{key}_mean"] == a[f"{key}_mean"] else 0.0 for a in agg]
            ax.barh(range(len(agg)), ys, xerr=[100 * (a[f"{key}_std"] if a[f"{key}_std"] == a[f"{key}_std"] else 0)
                                               for a in agg], capsize=3,
                    color=["#d62728" if a["setting"].endswith("no vector") else "#2ca02c" for a in agg])
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
