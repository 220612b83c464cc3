"""Training checkpoints of stage 2: save every N steps, resume from the latest or a named one.

Layout, one directory per checkpoint:

    output_dir/checkpoints/step_00000040/
        trainable.safetensors, optimizer.pt, scheduler.pt   (one process, plain torch)
        deepspeed/...                                        (DeepSpeed: its own per-rank files)
        rng_rank0.json, rng_rank1.json, ...                  (python, numpy, torch RNG per rank)
        trainer_state.json                                   (step, losses, world, batch sizes, vector digest)
        manifest.json                                        (every file: size and sha256; written last)

Every rank writes into `.step_00000040.tmp` and fsyncs what it wrote; rank 0 writes the manifest
last, fsyncs, and renames the directory into place, so a directory without a manifest (a crash mid-save) is never resumed
from. On resume the manifest is checked file by file before anything is loaded.
Data order needs no state: the stream of micro-batches is a function of the seed, and the
resumed run passes over the `step * gradient_accumulation_steps` micro-batches already trained.

Another world size: a step trains on `micro_batch_size x gradient_accumulation_steps x ranks`
consecutive rows of that stream, so a checkpoint resumes on any number of ranks whose global batch
is the same (the same rows per step, the same schedule, the data position `step x global batch`).
The state follows: one plain process and DeepSpeed's unwrapped torch optimizer (ZeRO stage 0,
float32) hold the whole optimizer state on every rank and load it as it is; ZeRO-partitioned state
written on N ranks is converted once by DeepSpeed's universal checkpoint
(deepspeed.checkpoint.ds_to_universal, into `universal/` inside the checkpoint) and loaded from it on M.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from dist_secvec import files, manifest, runtime
from dist_secvec.distributed import barrier
from dist_secvec.manifest import MANIFEST, write_manifest
from dist_secvec.errors import UserError

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: incomplete, corrupted, or from another run."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def verify_manifest(d: Path, hashes: bool = True) -> None:
    """Every file the manifest lists exists with its size and hash; else a one-line CheckpointError."""
    manifest.verify_manifest(d, "checkpoint", "resume from an earlier checkpoint or delete this one",
                             missing_fix="resume from an earlier checkpoint (checkpoint.resume=DIR) or delete it",
                             error=CheckpointError, hashes=hashes)


def step_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `step_XXXXXXXX` directory (not the `.step_*.tmp` ones of a save in progress or killed),
    oldest first."""
    d = checkpoints_dir(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (with a manifest), oldest first."""
    return [p for p in step_checkpoints(output_dir) if (p / MANIFEST).is_file()]


def remove_stale(output_dir: str | Path) -> None:
    """Remove what a killed process left in output_dir/checkpoints: `.step_*.tmp` directories of a
    save cut short and `.step_*.old` ones of a removal cut short. Rank 0, with no save running."""
    d = checkpoints_dir(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".step_") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)


def _remove(d: Path) -> None:
    """Rename first, then delete: a kill mid-delete never leaves a `step_*` dir with files missing."""
    gone = d.with_name(f".{d.name}.old")
    d.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def resolve_resume(resume: Optional[str], output_dir: str | Path) -> Optional[Path]:
    """checkpoint.resume: None -> start fresh; "latest" -> the newest checkpoint in output_dir (None
    when there is none yet, so a requeued job can always pass it); a path. A `.step_*.tmp` dir (a
    save cut short) is never a candidate; a `step_*` dir without its manifest is one, and is then
    refused by the check in `load_checkpoint` (saves rename only complete directories into place,
    so a missing manifest means a damaged checkpoint, not an unfinished one)."""
    if resume is None:
        return None
    if runtime.is_main():
        remove_stale(output_dir)
    if resume == "latest":
        found = step_checkpoints(output_dir)
        return found[-1] if found else None
    return _named_checkpoint(resume)


def _named_checkpoint(resume: str) -> Path:
    p = Path(os.path.expanduser(resume))
    if not p.is_dir():
        raise CheckpointError(f"config key 'checkpoint.resume': checkpoint directory '{resume}' not found "
                              "(use \"latest\" or a directory under output_dir/checkpoints)")
    if not (p / MANIFEST).is_file() and not (p / STATE).is_file():
        hint = (f"; for the newest of its checkpoints set output_dir={resume} checkpoint.resume=latest"
                if (p / "checkpoints").is_dir() else "")
        raise CheckpointError(f"config key 'checkpoint.resume': '{resume}' is not a checkpoint (no {MANIFEST} or "
                              f"{STATE}); name a step_NNNNNNNN directory under output_dir/checkpoints or use "
                              f"\"latest\"{hint}")
    return p


def check_resume(resume: Optional[str], output_dir: str | Path) -> None:
    """checkpoint.resume, before the model loads: the checkpoint it names (for "latest" the newest
    one, if any) exists and is whole, its manifest's files present at their sizes. The hashes are
    checked when it is loaded (reading every byte twice would cost minutes on a large model)."""
    if resume is None:
        return
    if resume == "latest":
        found = step_checkpoints(output_dir)
        if not found:
            return
        d = found[-1]
    else:
        d = _named_checkpoint(resume)
    verify_manifest(d, hashes=False)


# ---------------------------------------------------------------------------------------------
# RNG state as JSON (no pickle)


def rng_state() -> dict:
    import numpy as np

    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# save / load


def _trainable(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(engine, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Collective under DeepSpeed (every rank calls it). Returns the checkpoint directory."""
    root = checkpoints_dir(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if runtime.is_main():
        remove_stale(output_dir)
        tmp.mkdir(parents=True)
    barrier()
    try:
        if engine.deepspeed:
            engine.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        elif runtime.is_main():
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(engine.module).items()},
                      str(tmp / "trainable.safetensors"))
            for name, obj in (("optimizer.pt", engine.optimizer), ("scheduler.pt", engine.scheduler)):
                with open(tmp / name, "wb") as f:  # a failed write surfaces as an OSError (errno), not torch's own
                    torch.save(obj.state_dict(), f)
        (tmp / f"rng_rank{runtime.rank()}.json").write_text(json.dumps(rng_state()))
        files.fsync_tree(tmp)  # each rank: its own files on disk (a no-op for the others' files)
        barrier()
        if runtime.is_main():
            (tmp / STATE).write_text(json.dumps(dict(state, step=step), indent=1) + "\n")
            write_manifest(tmp)
            files.fsync_tree(tmp)  # state and manifest too, before the rename makes it a checkpoint
            if final.exists():
                _remove(final)
            tmp.rename(final)
            files.fsync_dir(root)
            for old in complete_checkpoints(output_dir)[:-keep]:
                _remove(old)
    except Exception as e:
        why = files.write_failure(e)
        if why is None:
            raise
        if runtime.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint '{final}': {why} (earlier checkpoints are intact; resume "
                        "from the latest with checkpoint.resume=latest)") from e
    barrier()
    log.info("checkpoint step %d saved to %s", step, final)
    return final


def _broadcast_error(err: Optional[str]) -> None:
    """Rank 0 checked; every rank raises the same one-line error (or none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise CheckpointError(err)


# what may differ between the run that wrote a checkpoint and the one resuming it, as long as
# their product, the rows of one optimizer step, is the same
SHAPE_KEYS = ("world_size", "micro_batch_size", "gradient_accumulation_steps")
UNIVERSAL = "universal"  # the DeepSpeed universal checkpoint made from a checkpoint's ZeRO shards


def global_batch(shape: dict) -> Optional[int]:
    try:
        return int(shape["world_size"]) * int(shape["micro_batch_size"]) * int(shape["gradient_accumulation_steps"])
    except (KeyError, TypeError, ValueError):
        return None


def _shape(s: dict) -> str:
    return (f"micro_batch_size {s.get('micro_batch_size')} x gradient_accumulation_steps "
            f"{s.get('gradient_accumulation_steps')} x {s.get('world_size')} rank(s)")


def _batch_fix(rows: int, now: dict) -> str:
    """The settings that give `rows` per step on this run's ranks."""
    world, micro = now["world_size"], now["micro_batch_size"]
    if rows % (micro * world) == 0:
        return f"set optim.gradient_accumulation_steps={rows // (micro * world)}"
    if rows % world == 0:
        per_rank = rows // world
        return (f"set optim.micro_batch_size x optim.gradient_accumulation_steps to {per_rank} (e.g. "
                f"optim.micro_batch_size={per_rank} optim.gradient_accumulation_steps=1)")
    return f"run on a number of ranks that divides {rows}"


def check_run_shape(d: Path, state: dict, expect: dict) -> None:
    """The checkpoint belongs to this run: the same settings, except the world size and the batch
    split (SHAPE_KEYS), which may differ when the global batch is the same; one plain process and
    DeepSpeed's ZeRO stage 0 hold the same state. Else a one-line CheckpointError."""
    for key, want in expect.items():
        have = state.get(key)
        if key in SHAPE_KEYS or have == want or (key == "zero_stage" and {have, want} == {None, 0}):
            continue
        what = "the security vector differs" if key == "vector_digest" else f"{key} is {have!r} there, {want!r} now"
        if key == "zero_stage":
            then = "by one plain process" if have is None else f"under ZeRO stage {have}"
            now = "one plain process" if want is None else f"ZeRO stage {want}"
            fix = "no deepspeed keys" if have is None else f"deepspeed.zero_stage={have}"
            raise CheckpointError(f"checkpoint '{d}' was written {then}, this run is {now}; resume it with {fix}, "
                                  "on any number of ranks")
        raise CheckpointError(f"checkpoint '{d}' belongs to another run setup ({what}); "
                              "resume with the settings it was written with, or start a new output_dir")
    have, want = global_batch(state), global_batch(expect)
    if have is not None and have != want:
        raise CheckpointError(f"checkpoint '{d}' was written with {have} rows per optimizer step ({_shape(state)}), "
                              f"this run takes {want} ({_shape(expect)}); to resume on {expect['world_size']} "
                              f"rank(s) keep {have} rows per step: {_batch_fix(have, expect)}")


def _bare_torch_optimizer(engine) -> bool:
    """DeepSpeed's optimizer is the run's own torch AdamW, unwrapped (ZeRO stage 0, float32): its
    whole state on every rank, as in one plain process."""
    opt = engine.engine.optimizer
    return isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "overflow")


def load_checkpoint(engine, d: Path, expect: dict) -> dict:
    """Verify `d` (manifest, same run shape, same vector) and load model, optimizer, schedule and
    this rank's RNG into `engine`, on the world size it was written on or another one (see the
    module docstring). Returns the trainer state. Collective under DeepSpeed."""
    err = None
    state: dict = {}
    if runtime.is_main():
        try:
            verify_manifest(d)
            state = json.loads((d / STATE).read_text())
            check_run_shape(d, state, expect)
        except CheckpointError as e:
            err = str(e)
        except (OSError, json.JSONDecodeError) as e:
            err = f"checkpoint '{d}': cannot read {STATE} ({type(e).__name__}); resume from an earlier checkpoint"
    _broadcast_error(err)
    state = json.loads((d / STATE).read_text())
    written_plain = (d / "trainable.safetensors").is_file()
    if engine.deepspeed and not written_plain:
        _load_deepspeed(engine, d, state.get("world_size") != expect.get("world_size"))
    elif engine.deepspeed:  # one plain process wrote it; DeepSpeed ZeRO stage 0 (check_run_shape) resumes
        if not _bare_torch_optimizer(engine):
            raise CheckpointError(f"checkpoint '{d}' was written by one plain process; DeepSpeed resumes it only "
                                  "with its optimizer unwrapped (ZeRO stage 0, model.dtype=float32): set those or "
                                  "resume on one process")
        _load_whole(engine, d, *_read_plain(d))
        engine.engine.global_steps = int(state["step"])
        engine.engine.global_samples = int(state["step"]) * engine.engine.train_batch_size()
    elif written_plain:
        _load_whole(engine, d, *_read_plain(d))
    else:  # DeepSpeed wrote it, one plain process resumes: its whole state must be in the model states file
        _load_whole(engine, d, *_read_deepspeed_whole(d), exact=False)
    rng = d / f"rng_rank{runtime.rank()}.json"
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    log.info("resumed from %s at step %d", d, state["step"])
    return state


def _read_failure(d: Path, e: Exception) -> CheckpointError:
    # verified by hash, so this is a format mismatch
    return CheckpointError(f"checkpoint '{d}': cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def _read_plain(d: Path) -> tuple[dict, dict, dict]:
    """(trainable tensors by name, optimizer state, schedule state) of a plain process's checkpoint."""
    from safetensors.torch import load_file

    try:
        return (load_file(str(d / "trainable.safetensors")), torch.load(d / "optimizer.pt", weights_only=True),
                torch.load(d / "scheduler.pt", weights_only=True))
    except Exception as e:
        raise _read_failure(d, e) from e


def _read_deepspeed_whole(d: Path) -> tuple[dict, dict, dict]:
    """The same from a DeepSpeed checkpoint whose optimizer state is whole (ZeRO stage 0, the
    unwrapped torch optimizer): its model states file holds module, optimizer and schedule."""
    ds_dir = d / "deepspeed"
    refusal = CheckpointError(f"checkpoint '{d}' holds DeepSpeed's own optimizer state (ZeRO-partitioned or its "
                              "16-bit wrapper's); one plain process cannot resume it: resume under DeepSpeed "
                              "(deepspeed.zero_stage as it was written, on any number of ranks)")
    if list(ds_dir.glob("*optim_states.pt")):
        raise refusal
    try:
        sd = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        module, opt, sched = sd["module"], sd["optimizer"], sd["lr_scheduler"]
    except Exception as e:
        raise _read_failure(d, e) from e
    if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
        raise refusal
    return module, opt, sched


def _load_whole(engine, d: Path, tensors: dict, opt: dict, sched: dict, exact: bool = True) -> None:
    """A whole (unpartitioned) state into the run's trainable parameters, torch optimizer and schedule.
    exact: `tensors` are the trainable ones alone (else the whole module's, DeepSpeed's)."""
    params = _trainable(engine.module)
    if (set(tensors) != set(params)) if exact else not set(params) <= set(tensors):
        raise CheckpointError(f"checkpoint '{d}': its trainable parameters do not match this model's "
                              "(another adapter or model?); start a new output_dir")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    engine.optimizer.load_state_dict(opt)
    engine.scheduler.load_state_dict(sched)


def _load_deepspeed(engine, d: Path, other_world: bool) -> None:
    """DeepSpeed's own load; from another world size with ZeRO-partitioned state, through its
    universal checkpoint (made once, by rank 0, and kept inside the checkpoint)."""
    ds = engine.engine
    if not other_world or _bare_torch_optimizer(engine):
        path, _ = ds.load_checkpoint(str(d), tag="deepspeed", load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    else:
        folder = _universal_checkpoint(d)
        ds._config.load_universal_checkpoint = True  # read by the load only (engine.load_universal_checkpoint)
        try:
            path, _ = ds.load_checkpoint(str(folder), tag=UNIVERSAL, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        finally:
            ds._config.load_universal_checkpoint = False
    if path is None:
        raise CheckpointError(f"checkpoint '{d}': DeepSpeed could not load it; resume from an earlier one")


def _universal_checkpoint(d: Path) -> Path:
    """d/universal: the ZeRO shards of d/deepspeed as DeepSpeed's universal checkpoint (one file per
    parameter and state), written by rank 0 through a temporary directory. Collective."""
    folder = d / UNIVERSAL
    err = None
    if runtime.is_main() and not (folder / UNIVERSAL).is_dir():
        import argparse
        import contextlib
        import io

        from deepspeed.checkpoint import ds_to_universal

        tmp = d / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(d / "deepspeed"), output_folder=str(tmp / UNIVERSAL),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        log.info("checkpoint %s: converting its ZeRO shards to a universal checkpoint for another world size", d)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
                ds_to_universal.main(args)
            files.fsync_tree(tmp)
            tmp.rename(folder)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = files.write_failure(e) or f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            err = (f"checkpoint '{d}': cannot convert it for another world size ({why}); resume on the "
                   "world size it was written on")
    _broadcast_error(err)
    barrier()
    return folder
