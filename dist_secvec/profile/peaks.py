"""Each variant's peak memory, compared with no_vector's (the target: within 2%).

On CPU each variant runs in a fresh process of its own (`python -m dist_secvec.profile
--memory-child SPEC`, one per rank; under a launcher the children of all ranks form a new process
group): a process's peak RSS cannot be reset and would hold every variant's job. On CUDA, in this
process: the peak allocated while the variant is built and warmed up, the stats reset before and
the bytes of jobs already alive subtracted.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.distributed import barrier, free_port
from dist_secvec.profile.measure import gather, run_steps
from dist_secvec.profile.memory import peak_bytes
from dist_secvec.profile.variants import build_variant

log = logging.getLogger(__name__)

TARGET = "peak within 2% of no_vector (worst rank)"


def memory_mode(cfg: Config, device: torch.device) -> str:
    """profile.memory, auto resolved: inline on CUDA, process on CPU."""
    mode = cfg.profile.memory
    if mode == "auto":
        return "inline" if device.type == "cuda" else "process"
    return mode


def memory_in_processes(cfg: Config, names: list[str], steps: int, warmup: int, out: Path,
                        use_ds: bool, repeats: int = 1) -> dict[str, list]:
    """Each variant's peak memory in fresh processes (one per rank: under a launcher the children
    of all ranks form a process group of their own on a new port): build the job, run warmup +
    steps optimizer steps, report the process's peak RSS (CUDA: peak allocated). With repeats > 1
    every variant runs that many times (variants interleaved) and the run with the median peak is
    kept (a fresh process's peak RSS varies from run to run). Returns, per name, every rank's
    {"peak": ..., "memory": ..., "peak_repeats": [...]} or {"error": ...}."""
    rank = runtime.rank()
    work = out / ".profile_memory"
    work.mkdir(parents=True, exist_ok=True)
    timeout = cfg.profile.memory_timeout_s
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            port = gather(free_port() if rank == 0 else None)[0]
            spec = work / f"{name}_rank{rank}.json"
            result_file = work / f"{name}_rank{rank}.result.json"
            result_file.unlink(missing_ok=True)
            spec.write_text(json.dumps({"cfg": cfg.to_dict(), "variant": name, "steps": steps, "warmup": warmup,
                                        "result": str(result_file)}))
            env = dict(os.environ)
            if use_ds:  # the children of every rank: a new group, same ranks, a new port
                env.update(RANK=str(rank), WORLD_SIZE=str(runtime.world_size()), MASTER_PORT=str(port),
                           LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                           MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"))
            else:
                for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(k, None)
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, "-m", "dist_secvec.profile", "--memory-child", str(spec)],
                                   env=env, capture_output=True, text=True, timeout=timeout)
                if p.returncode == 0 and result_file.exists():
                    res = json.loads(result_file.read_text())
                else:
                    res = {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-800:]}"}
            except subprocess.TimeoutExpired:
                res = {"error": f"timed out after {timeout:g} s (profile.memory_timeout_s)"}
            res["seconds"] = time.perf_counter() - t0
            if "error" in res:
                log.warning("memory of variant %s in a separate process failed: %s", name, res["error"])
            runs[name].append(res)
    results: dict[str, list] = {}
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        if len(ok) < len(runs[name]):
            mine = next(r for r in runs[name] if "error" in r)
        else:
            ok.sort(key=lambda r: peak_bytes(r["peak"]))
            mine = ok[(len(ok) - 1) // 2]  # the median run (the lower middle one of an even count)
            mine["peak_repeats"] = [peak_bytes(r["peak"]) for r in runs[name]]
        results[name] = gather(mine)
    return results


def memory_child(spec_path: str) -> int:
    """`python -m dist_secvec.profile --memory-child SPEC`: one variant's job in this fresh
    process; writes its peak memory and memory figures to SPEC's result file."""
    spec = json.loads(Path(spec_path).read_text())
    from dist_secvec.config import load_config

    cfg = load_config(None, None, base=spec["cfg"])
    logging.basicConfig(level=logging.WARNING)
    job = build_variant(cfg, spec["variant"])
    res = run_steps(job, spec["steps"], spec["warmup"])
    mem = res["memory"]
    if runtime.is_main() or job.use_ds:
        Path(spec["result"]).write_text(json.dumps({"peak": mem["peak"], "memory": mem, "mode": job.mode,
                                                    "pid": os.getpid(),
                                                    "steps": spec["steps"], "warmup": spec["warmup"]}))
    if job.use_ds:
        barrier()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def variant_memory(mode: str, measured: dict, children: Optional[dict], device: torch.device) -> dict:
    """Each variant's peak memory per rank and its ratio to no_vector's: {"method", "reason",
    "target", "variants": {name: {"peak_bytes", "kind", "ratio", "within_2pct", ...}} or None}."""
    per: dict[str, Any] = {}
    if mode == "process":
        for name, ranks in (children or {}).items():
            errs = [r["error"] for r in ranks if "error" in r]
            per[name] = ({"peak_bytes": None, "error": errs[0]} if errs else
                         {"peak_bytes": [peak_bytes(r["peak"]) for r in ranks],
                          "repeats": [r.get("peak_repeats") for r in ranks],
                          "kind": ranks[0]["peak"]["kind"], "seconds": max(r["seconds"] for r in ranks)})
        method = ("a fresh process per variant (and rank): the peak of building the job and running "
                  f"its warmup + measured steps ({'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'}; "
                  "the median of profile.memory_repeats runs)")
    elif mode == "inline" and device.type == "cuda":
        for name, rec in measured.items():
            peaks = [r["memory"]["peak"] for r in rec["ranks"]]
            per[name] = {"peak_bytes": [peak_bytes(p) for p in peaks], "kind": "cuda"}
        method = ("this process, CUDA: peak allocated while the variant is built and runs its warmup steps, the "
                  "peak stats reset before and the bytes other jobs hold subtracted")
    else:
        reason = ("profile.memory=none" if mode == "none" else
                  "a CPU process's peak RSS cannot be reset and holds every job: set profile.memory=process for "
                  "a fresh process per variant")
        return {"method": None, "reason": reason, "target": TARGET, "variants": None}
    base = per.get("no_vector", {}).get("peak_bytes")
    for name, rec in per.items():
        mine = rec.get("peak_bytes")
        if base and mine and all(base) and all(m is not None for m in mine):
            ratio = max(m / b for m, b in zip(mine, base))  # the worst rank
            rec["ratio"] = ratio
            rec["within_2pct"] = ratio <= 1.02
        else:
            rec["ratio"] = rec["within_2pct"] = None
    return {"method": method, "reason": None, "target": TARGET, "variants": per}
