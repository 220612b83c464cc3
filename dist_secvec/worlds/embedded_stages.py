"""The embedded world's stages, shared by `dist-secvec demo`, `dist-secvec experiment` (world:
embedded) and the default `dist-secvec profile` job: the per-stage settings (the YAML recipes in
configs/demo/ and what --quick changes), the world the demo's config describes, the aligned base
(trained once and cached, keyed by everything that shapes it) and the scoring with the world's judge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import yaml

from dist_secvec import runtime
from dist_secvec.config import Config, deep_merge, load_config
from dist_secvec.distributed import barrier
from dist_secvec.files import atomic_dir
from dist_secvec.worlds.embedded import WorldSizes, build_tiny_llama, build_tokenizer, build_world

log = logging.getLogger(__name__)

CACHE_VERSION = "v4"  # in the aligned base's cache key: a new value orphans every cached base

#: the demo's per-stage settings (model size, epochs, learning rates) and what --quick changes:
#: YAML recipes shipped with the package (configs/demo/)
RECIPES = Path(__file__).resolve().parent.parent / "configs" / "demo"


def _recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text(encoding="utf-8")) or {}


STAGES = {stage: _recipe(stage) for stage in ("align", "train_sv", "finetune")}
QUICK = _recipe("quick")


def demo_defaults() -> dict:
    """The demo's config before the user's file and overrides (output_dir=DIR etc.)."""
    return {"output_dir": "runs/demo", "seed": 0, "logging": {"log_every": 50},
            "model": {"dtype": "float32"}, "data": {"max_length": 64},
            "eval": {"max_new_tokens": 32, "batch_size": 50, "judges": ["demo"]}}


#: stages every rank runs under a launcher (data parallel); stage 1 and evaluation run on rank 0
DATA_PARALLEL_STAGES = ("align", "finetune")


def stage_config(cfg: Config, stage: str, quick: bool, **sections) -> Config:
    """A full Config for one stage: the demo's config + stage settings + the given sections. Under
    a launcher a data-parallel stage keeps the demo's global batch: each of the N ranks takes
    micro_batch_size / N of it, so the run has the single process's steps and its results."""
    base = cfg.to_dict()
    base.pop("source", None)
    base = deep_merge(base, STAGES[stage])
    if quick:
        base = deep_merge(base, QUICK.get(stage, {}))
    base = deep_merge(base, sections)
    world = runtime.world_size()
    if world > 1 and stage in DATA_PARALLEL_STAGES:
        mb = base["optim"]["micro_batch_size"]
        if mb % world == 0:
            base["optim"]["micro_batch_size"] = mb // world
        else:
            log.warning("demo stage %s: micro-batch %d does not split over %d ranks; each rank takes %d "
                        "(a global batch %d times the single process's)", stage, mb, world, mb, world)
    return load_config(None, None, base=base)


def _cache_root(cfg: Config) -> Path:
    from dist_secvec.files import cache_root

    return (Path(cfg.demo.cache_dir) if cfg.demo.cache_dir else cache_root()) / "demo"


def aligned_base(cfg: Config, sizes: WorldSizes, data: dict, tok_texts: list[str], quick: bool) -> Path:
    """Train (or reuse from the cache) the aligned tiny model; returns its directory."""
    from dist_secvec.finetune import run_finetune

    stage = stage_config(cfg, "align", quick, model={"path": "unused"})
    # the global batch in the key: a base trained on N ranks is the single process's, and reused by it
    optim = dict(stage.optim.__dict__, micro_batch_size=stage.optim.micro_batch_size * runtime.world_size())
    key_fields = {"v": CACHE_VERSION, "seed": cfg.seed, "sizes": sizes.__dict__, "optim": optim,
                  "max_length": stage.data.max_length}
    if cfg.demo.world != "capitals":  # the first world keeps the key it had alone, and its cached bases
        key_fields["world"] = cfg.demo.world
    key_src = json.dumps(key_fields, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cached = _cache_root(cfg) / f"aligned-{key}"
    if (cached / "model.safetensors").exists() and (cached / "dist_secvec_run.json").exists():
        log.info("aligned base from cache: %s", cached)
        return cached
    work = Path(cfg.output_dir) / "align"
    init_dir = work / "init"
    if runtime.is_main():
        init_dir.mkdir(parents=True, exist_ok=True)
        tok = build_tokenizer(tok_texts, init_dir, world=cfg.demo.world)
        build_tiny_llama(tok, init_dir, cfg.seed)
    barrier()
    log.info("training the aligned base (cached afterwards in %s)", cached.parent)
    stage = stage_config(cfg, "align", quick, model={"path": str(init_dir)}, data={"train": [data["align"]]},
                          output_dir=str(work))
    res = run_finetune(stage)  # every rank (data parallel under a launcher)
    if runtime.is_main():
        with atomic_dir(cached) as tmp:
            for f in res.final_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
    barrier()
    return cached


def evaluate_model(model, tok, cfg: Config, harmful_rows: list[dict], task_rows: list[dict]) -> dict:
    """The eval command's scoring (evaluate.score), vector off, with the world's judge: harmful
    rate on the held-out harmful prompts, accuracy (the answer contained) on the new task's."""
    import dataclasses

    from dist_secvec.evaluate import score

    ec = dataclasses.replace(cfg.eval, judges=["demo"], utility_match="contains", utility_loss=False,
                             with_secvec=False)
    harmful = [{"prompt": r["prompt"]} for r in harmful_rows]
    tasks = [{"prompt": r["prompt"], "response": r["answer"]} for r in task_rows]
    summary, _ = score(dataclasses.replace(cfg, eval=ec), model, tok, harmful, tasks)
    harm, util = summary["judges"]["demo"], summary["utility"]
    return {"harmful_rate": harm["harmful_rate"], "benign_accuracy": util["accuracy"], "n_eval": harm["n"],
            "harmful_rate_ci95": list(harm["harmful_rate_ci95"]), "benign_accuracy_ci95": list(util["accuracy_ci95"]),
            "examples": {"harmful": [(r["prompt"], r["response"]) for r in harmful[:3]],
                         "new_task": [(r["prompt"], r["response"]) for r in tasks[:3]]}}


def demo_world(cfg: Config):
    """The world the demo's config describes, written to output_dir/data: (sizes, world, paths)."""
    sizes = WorldSizes(n_harmful_sv=cfg.demo.n_harmful_sv, n_harmful_ft=cfg.demo.n_harmful_ft, n_eval=cfg.demo.n_eval)
    if cfg.demo.quick:
        for k, v in QUICK["sizes"].items():
            setattr(sizes, k, min(v, getattr(sizes, k)))
    world = build_world(cfg.seed, sizes, world=cfg.demo.world)
    return sizes, world, world.write(Path(cfg.output_dir) / "data", write=runtime.is_main())
