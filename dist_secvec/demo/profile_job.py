"""The job `dist-secvec profile` measures when no --config is given: the embedded demo's stage-2
run with the vector active (demo world, cached aligned base, a stage-1 vector cached beside it;
a short stage 1 is trained when none is there)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.distributed import barrier
from dist_secvec.files import atomic_dir
from dist_secvec.profile.measure import gather
from dist_secvec.worlds.embedded_stages import _cache_root, aligned_base, demo_defaults, demo_world, stage_config

log = logging.getLogger(__name__)


def profile_defaults() -> dict:
    base = demo_defaults()
    base["output_dir"] = "runs/profile"
    return base


def profile_job(cfg: Config) -> Config:
    """The stage-2 config to profile; every rank calls it (after the process group is up)."""
    from dist_secvec.train_sv import run_train_sv

    quick = cfg.demo.quick
    out = Path(cfg.output_dir)
    sizes, world, data = demo_world(cfg)  # written by rank 0
    barrier()
    base_dir = aligned_base(cfg, sizes, data, world.texts(), quick)  # every rank (data parallel) or the cache
    vec_dir = _cache_root(cfg) / f"secvec-{base_dir.name}"
    # rank 0 decides and trains the ~100-sample stage 1 alone; the others wait at the barrier
    if gather(not (vec_dir / "secvec.json").exists())[0] and runtime.is_main():
        log.info("no cached stage-1 vector for %s: training a short one", base_dir.name)
        sv_cfg = stage_config(cfg, "train_sv", quick, model={"path": str(base_dir)}, output_dir=str(out / "stage1"),
                               optim={"epochs": 5},
                               security_vector={"harmful_data": [data["harmful_sv"]],
                                                "benign_data": [data["kl_benign"]]})
        sv = run_train_sv(sv_cfg)
        with atomic_dir(vec_dir) as tmp:
            for f in sv.vector_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
    barrier()
    log.info("profiling the demo's stage-2 job: base %s, vector %s", base_dir, vec_dir)
    return stage_config(cfg, "finetune", quick, model={"path": str(base_dir)}, output_dir=str(out),
                         data={"train": [data["finetune_mixed"]]}, security_vector={"path": str(vec_dir)})
