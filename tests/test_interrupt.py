"""Interruptions and faults in stage 2: nothing is lost beyond the last checkpoint, and
every failure explains itself.

- SIGKILL at random points (several seeds) of a real `python -m dist_secvec finetune` process,
  then `checkpoint.resume=latest` until it finishes: the same losses (train_log.jsonl, every step
  once) and the same final weights as an uninterrupted run; a killed save's `.step_*.tmp`
  directory is ignored and removed.
- SIGTERM: exit 0, one stop line, a complete checkpoint at the step it stopped; resume as above.
- Each file of a checkpoint flipped, truncated or deleted (the manifest too): resume refuses with
  exit 2 and one line naming the file, and leaves the checkpoint as it was.
- A checkpoint written with one security vector refuses to resume with another.
- NaN/inf loss: exit 2 naming the step, the last checkpoint intact; optim.nonfinite=skip finishes
  (on 2 DeepSpeed ranks: tests/test_deepspeed.py).
- SIGTERM/SIGINT while the model loads: exit 0 at once, one line, nothing written, resume works;
  during the final save: the save completes, then exit 0 with one line.
- 2 ranks under the deepspeed launcher, rank 1 killed with SIGKILL: the launcher kills the other
  rank and the job exits non-zero within a bounded time, no rank left behind.

The subprocess runs of the first two share one pool (two at a time on a 2-core machine); the
checks on a checkpoint run `cli.main` in-process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import tree_digest, write_random_vector
from dist_secvec.distributed import free_port

PY = sys.executable
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
STEPS = 40  # about 1 s of training after about 10 s of start-up: a kill at a random step lands mid-training
EVERY = 4
KILL_SEEDS = (0, 1, 2)
STOP_LINE = re.compile(rf"^dist-secvec finetune: stopped at step (\d+) of {STEPS} by SIGTERM; checkpoint saved, "
                       r"resume with checkpoint\.resume=latest$")


def sub_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def setup(tiny_world, random_vector, tmp_path_factory):
    """A config file for a STEPS-step full fine-tuning run with the vector attached (a checkpoint
    every EVERY steps); every run gets its own output_dir as an override."""
    root = tmp_path_factory.mktemp("interrupt")
    rows = Path(tiny_world.data["new_task_ft"]).read_text().splitlines()[:16]
    data = root / "ft16.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = {"model": {"path": str(tiny_world.model_dir)}, "data": {"train": str(data)},
           "security_vector": {"path": str(random_vector)}, "adapter": {"type": "none"},
           "optim": {"lr": 1e-2, "schedule": "constant", "micro_batch_size": 4, "max_steps": STEPS},
           "checkpoint": {"every_steps": EVERY, "keep": 2},
           "logging": {"progress": False, "log_every": 1}, "seed": 0}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


STARTED: list[subprocess.Popen] = []  # killed at the end of the `runs` fixture if a check failed midway


def start(cfg: Path, out: Path, *overrides: str, tag: str = "run") -> tuple[subprocess.Popen, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    err = out.parent / f"{out.name}.{tag}.stderr"
    with open(err, "w") as f:
        p = subprocess.Popen([PY, "-m", "dist_secvec", "finetune", "--config", str(cfg), f"output_dir={out}",
                              *overrides], stdout=subprocess.DEVNULL, stderr=f, env=sub_env())
    STARTED.append(p)
    return p, err


def logged_steps(out: Path) -> list[int]:
    path = out / "train_log.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return steps


def wait_for_step(p: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if p.poll() is not None:
            raise AssertionError(f"run ended (exit {p.returncode}) before step {step}")
        if max(logged_steps(out), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def finished(out: Path) -> bool:
    return (out / "final" / "dist_secvec_run.json").is_file()


def resume_until_done(cfg: Path, out: Path, res: dict, limit: int = 4) -> None:
    """checkpoint.resume=latest until final/ exists, as a requeued job would do."""
    for i in range(limit):
        if finished(out):
            return
        p, err = start(cfg, out, "checkpoint.resume=latest", tag=f"resume{i}")
        rc = p.wait(timeout=300)
        text = err.read_text()
        assert rc == 0, f"resume {i}: exit {rc}\n{text[-3000:]}"
        m = re.search(r"resumed from \S+ at step (\d+)", text)
        res.setdefault("resumed_at", []).append(int(m.group(1)) if m else 0)
    assert finished(out)


def run_reference(cfg: Path, root: Path) -> dict:
    out = root / "reference"
    p, err = start(cfg, out)
    assert p.wait(timeout=300) == 0, err.read_text()[-3000:]
    return {"out": out}


def run_killed(cfg: Path, root: Path, seed: int) -> dict:
    """SIGKILL once (twice for odd seeds) at random points (a random step reached, then a random delay), each
    time resuming with checkpoint.resume=latest; before the first resume a half-written save of
    the next checkpoint is planted, as a kill during a save leaves it."""
    rng = random.Random(seed)
    out = root / f"killed{seed}"
    res: dict = {"out": out, "kills": []}
    extra: tuple[str, ...] = ()
    kills = 1 + seed % 2
    for kill in range(kills):
        p, err = start(cfg, out, *extra, tag=f"kill{kill}")
        lo = max(logged_steps(out), default=0) + 1
        # steps take a few ms on an idle machine: leave 20 steps between the chosen step and the end
        at = rng.randint(lo, max(lo, STEPS - 20 if kill == kills - 1 else STEPS // 2 - 5))
        wait_for_step(p, out, at)
        time.sleep(rng.uniform(0.0, 0.01))
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
        if kill > 0:  # this run was itself a resume
            m = re.search(r"resumed from \S+ at step (\d+)", err.read_text())
            res.setdefault("resumed_at", []).append(int(m.group(1)) if m else 0)
        last = max(logged_steps(out), default=0)
        ckpts = [int(d.name[5:]) for d in (out / "checkpoints").glob("step_*")]
        res["kills"].append({"wait_for": at, "last_logged": last, "latest": max(ckpts, default=0)})
        if kill == 0:  # a save of the next checkpoint cut short: no manifest, a garbage file
            nxt = (last // EVERY + 1) * EVERY
            half = out / "checkpoints" / f".step_{nxt:08d}.tmp"
            half.mkdir(parents=True, exist_ok=True)
            (half / "trainable.safetensors").write_bytes(b"\0" * 100)
            (out / "checkpoints" / f".step_{EVERY:08d}.old").mkdir(exist_ok=True)  # a removal cut short
        extra = ("checkpoint.resume=latest",)
    resume_until_done(cfg, out, res)
    return res


def run_sigterm(cfg: Path, root: Path) -> dict:
    out = root / "sigterm"
    p, err = start(cfg, out)
    wait_for_step(p, out, 5)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    res = {"out": out, "rc": rc, "stderr": err.read_text(), "logged": logged_steps(out),
           "checkpoints": sorted(d.name for d in (out / "checkpoints").iterdir())}
    m = STOP_LINE.match(res["stderr"].strip().splitlines()[-1]) if res["stderr"].strip() else None
    res["stopped_at"] = int(m.group(1)) if m else None
    if res["stopped_at"]:
        from dist_secvec.checkpoint import verify_manifest

        ck = out / "checkpoints" / f"step_{res['stopped_at']:08d}"
        verify_manifest(ck)  # complete, every file as its manifest says
        res["state"] = json.loads((ck / "trainer_state.json").read_text())
    resume_until_done(cfg, out, res)
    return res


class Runs(dict):
    """Scenario name -> its result; a scenario that failed re-raises its error in the tests that ask for it."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, BaseException):
            raise value
        return value


@pytest.fixture(scope="module")
def runs(setup):
    """The subprocess scenarios, two at a time."""
    root, cfg = setup
    jobs = {"reference": lambda: run_reference(cfg, root), "sigterm": lambda: run_sigterm(cfg, root)}
    for s in KILL_SEEDS:
        jobs[f"killed{s}"] = lambda s=s: run_killed(cfg, root, s)
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {k: pool.submit(f) for k, f in jobs.items()}
            return Runs({k: f.exception() or f.result() for k, f in futures.items()})
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.kill()
                p.wait()


def losses_and_weights(out: Path):
    from safetensors.torch import load_file

    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs], [r["loss"] for r in recs], load_file(str(out / "final" / "model.safetensors"))


def assert_same_as_reference(out: Path, reference: Path) -> None:
    import torch

    steps, losses, weights = losses_and_weights(out)
    ref_steps, ref_losses, ref_weights = losses_and_weights(reference)
    assert steps == ref_steps == list(range(1, STEPS + 1))  # every step once, in order
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert set(weights) == set(ref_weights)
    for k, v in weights.items():
        torch.testing.assert_close(v, ref_weights[k], rtol=1e-6, atol=1e-6, msg=k)
    run = json.loads((out / "final" / "dist_secvec_run.json").read_text())
    assert run["final_loss"] == pytest.approx(ref_losses[-1], rel=1e-6)
    state = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["losses"] == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# SIGKILL, SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_random_points_then_resume_repeats_the_run(runs, seed):
    res = runs[f"killed{seed}"]
    assert len(res["kills"]) == 1 + seed % 2
    for k, resumed in zip(res["kills"], res["resumed_at"]):
        assert 0 < k["last_logged"] < STEPS, k  # the kill landed mid-training
        # at most the steps since the last checkpoint are lost (a kill during a save: one interval more)
        assert k["last_logged"] - 2 * EVERY < resumed <= k["last_logged"], (k, resumed)
        assert resumed == k["latest"], (k, resumed)
    assert_same_as_reference(res["out"], runs["reference"]["out"])


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_exits_0_and_resumes(runs):
    res = runs["sigterm"]
    assert res["rc"] == 0, res["stderr"][-3000:]
    lines = [ln for ln in res["stderr"].splitlines() if ln.startswith("dist-secvec")]
    assert len(lines) == 1 and STOP_LINE.match(lines[0]), lines
    k = res["stopped_at"]
    assert 5 <= k < STEPS
    assert f"step_{k:08d}" in res["checkpoints"]
    assert not [c for c in res["checkpoints"] if c.startswith(".")]
    assert res["state"]["step"] == k and len(res["state"]["losses"]) == k
    assert res["logged"][-1] == k
    assert res["resumed_at"] == [k]
    assert_same_as_reference(res["out"], runs["reference"]["out"])


# ---------------------------------------------------------------------------------------------
# a checkpoint that cannot be resumed from: in-process cli.main, one line, exit 2, nothing touched


@pytest.fixture
def cli(capsys):
    from dist_secvec.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*argv: str):
        rc = main(list(argv))
        cap = capsys.readouterr()
        # in-process only: transformers' loading bar, already set up before the CLI turns it off
        err = "".join(ln for ln in cap.err.splitlines(keepends=True) if "it/s]" not in ln)
        return rc, type(cap)(cap.out, err)

    yield run
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:
        path.unlink()


CKPT_FILES = ("manifest.json", "trainer_state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt",
              "rng_rank0.json")


@pytest.fixture(scope="module")
def good_checkpoint(runs):
    d = runs["reference"]["out"] / "checkpoints" / f"step_{STEPS - EVERY:08d}"
    assert sorted(p.name for p in d.iterdir()) == sorted(CKPT_FILES)
    return d


def refused(cli, setup, ck: Path, out: Path, *overrides: str, resume: str = "latest") -> str:
    """Resume from `ck` must end in exit 2 and one stderr line; the checkpoint and output_dir unchanged."""
    _, cfg = setup
    before, before_out = tree_digest(ck), tree_digest(out)
    rc, cap = cli("finetune", "--config", str(cfg), f"output_dir={out}", f"checkpoint.resume={resume}",
                  "logging.level=error", *overrides)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("dist-secvec finetune: error: "), cap.err[-2000:]
    assert tree_digest(ck) == before and tree_digest(out) == before_out
    return lines[0]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_corrupted_checkpoint_file_is_refused(cli, setup, good_checkpoint, tmp_path, name, how):
    out = tmp_path / "out"
    ck = out / "checkpoints" / good_checkpoint.name
    shutil.copytree(good_checkpoint, ck)
    corrupt(ck / name, how)
    line = refused(cli, setup, ck, out)
    assert f"'{name}'" in line or (name == "manifest.json" and how == "delete" and "no manifest.json" in line), line
    assert str(ck) in line and ("earlier checkpoint" in line or "delete" in line), line


def test_corrupted_checkpoint_named_by_path_is_refused(cli, setup, good_checkpoint, tmp_path):
    ck = tmp_path / "kept" / good_checkpoint.name
    shutil.copytree(good_checkpoint, ck)
    corrupt(ck / "trainable.safetensors", "flip")
    line = refused(cli, setup, ck, tmp_path / "out", resume=str(ck))
    assert "'trainable.safetensors' is corrupted" in line


def test_checkpoint_of_another_vector_is_refused(cli, setup, good_checkpoint, tiny_world, tmp_path):
    """The safety invariant: a run's checkpoint continues only with the vector it was written with."""
    other = write_random_vector(tiny_world.model_dir, tmp_path / "other_sv", seed=1)
    out = tmp_path / "out"
    ck = out / "checkpoints" / good_checkpoint.name
    shutil.copytree(good_checkpoint, ck)
    line = refused(cli, setup, ck, out, f"security_vector.path={other}")
    assert "security vector differs" in line and str(ck) in line, line


# ---------------------------------------------------------------------------------------------
# NaN / inf


@pytest.fixture
def nan_at(monkeypatch):
    """The loss of optimizer step `k` (one micro-batch per step) becomes NaN."""
    import dist_secvec.stage2 as stage2  # finetune's engine is built there

    def install(k: int):
        class NaNEngine(stage2.PlainEngine):
            calls = 0

            def __call__(self, **batch):
                out = super().__call__(**batch)
                NaNEngine.calls += 1
                if NaNEngine.calls == k:
                    out["loss"] = out["loss"] * float("nan")
                return out

        monkeypatch.setattr(stage2, "PlainEngine", NaNEngine)
    return install


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(cli, setup, nan_at, tmp_path):
    from dist_secvec.checkpoint import verify_manifest

    _, cfg = setup
    k = 3 * EVERY - 1
    nan_at(k)
    out = tmp_path / "out"
    rc, cap = cli("finetune", "--config", str(cfg), f"output_dir={out}", "logging.level=error")
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, cap.err[-2000:]
    assert f"not finite at step {k}" in lines[0] and "checkpoint.resume=latest" in lines[0], lines
    ck = out / "checkpoints"
    last = ck / f"step_{2 * EVERY:08d}"
    assert sorted(p.name for p in ck.iterdir()) == [f"step_{EVERY:08d}", last.name]
    verify_manifest(last)
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 2 * EVERY
    assert not (out / "final").exists()
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, k))


def test_huge_learning_rate_stops_with_exit_2(cli, setup, tmp_path):
    """A real divergence (no patched loss): lr 1e6 blows the weights up within a few steps."""
    _, cfg = setup
    rc, cap = cli("finetune", "--config", str(cfg), f"output_dir={tmp_path / 'out'}", "optim.lr=1e6",
                  "checkpoint.every_steps=1", "logging.level=error")
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, cap.err[-2000:]
    m = re.search(r"not finite at step (\d+)", lines[0])
    assert m, lines
    k = int(m.group(1))
    from dist_secvec.checkpoint import complete_checkpoints, verify_manifest

    last = complete_checkpoints(tmp_path / "out")[-1]
    assert last.name == f"step_{k - 1:08d}"
    verify_manifest(last)


def test_nan_loss_with_skip_policy_finishes(cli, setup, nan_at, tmp_path):
    import math

    _, cfg = setup
    nan_at(5)
    out = tmp_path / "out"
    rc, cap = cli("finetune", "--config", str(cfg), f"output_dir={out}", "optim.nonfinite=skip",
                  "logging.level=warning")
    assert rc == 0, cap.err[-2000:]
    assert "step 5: non-finite loss or gradient; step skipped" in cap.err
    assert (out / "final" / "dist_secvec_run.json").is_file()
    losses = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())["losses"]
    assert len(losses) == STEPS and math.isnan(losses[4]) and all(math.isfinite(x) for i, x in enumerate(losses)
                                                                   if i != 4)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [s for s in range(1, STEPS + 1) if s != 5]


# ---------------------------------------------------------------------------------------------
# 2 ranks, one killed


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's training processes (found by their RANK variable)."""
    import psutil

    found = {}
    try:
        kids = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for c in kids:
        try:
            env = c.environ()
        except (psutil.Error, OSError):
            continue
        cmd = " ".join(c.cmdline())
        if "RANK" in env and "dist_secvec" in cmd and "deepspeed.launcher" not in cmd:
            found[int(env["RANK"])] = c.pid
    return found


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# A rank that hangs (SIGSTOP) instead of dying: the survivor's next collective must time out after
# deepspeed.timeout_s, then the launcher SIGTERMs the hung rank and SIGKILLs it 30 s later.
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_two_ranks_one_killed_the_job_exits_nonzero_in_bounded_time(setup, tmp_path, fault):
    root, cfg_path = setup
    timeout_s = 20 if fault == "SIGKILL" else 5
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["optim"].update(max_steps=40, micro_batch_size=2)
    cfg["deepspeed"] = {"config": {"zero_optimization": {"stage": 2}}, "timeout_s": timeout_s}
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["logging"]["level"] = "info"
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        p = subprocess.Popen([str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(free_port()),
                              "--no_local_rank", "--module", "dist_secvec", "finetune", "--config", str(path)],
                             cwd=tmp_path, env=sub_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(p, tmp_path / "run", EVERY + 1, timeout=240)  # a checkpoint exists
        pids = _rank_pids(p.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], getattr(signal, fault))
        t = time.time()
        rc = p.wait(timeout=120)
        took = time.time() - t
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert rc != 0, text[-3000:]
    if fault == "SIGKILL":
        # the launcher saw a rank die and killed the other: the job ends, it does not hang. Which
        # rank it reports first is a race: rank 1 (-9), or rank 0 failing on the broken connection
        assert re.search(r"exits with return code = -?[1-9]", text), text[-3000:]
        assert took < 60, took
    else:
        # rank 0 gives up after timeout_s (exit 1); the launcher then kills the hung rank 1
        assert "exits with return code = 1" in text, text[-3000:]
        assert took < timeout_s + 45, took
    time.sleep(0.5)
    assert _gone(pids[0]) and _gone(pids[1])
    from dist_secvec.checkpoint import complete_checkpoints, verify_manifest

    ckpts = complete_checkpoints(tmp_path / "run")
    assert ckpts, "no checkpoint before the fault"
    verify_manifest(ckpts[-1])  # the last checkpoint is whole


def test_vector_changed_mid_run_is_refused_at_the_checkpoint(cli, setup, monkeypatch, tmp_path):
    """The stage-2 invariant checked at every checkpoint: a vector that changed in memory (here one
    entry of one layer, after step 1) stops the run at the next checkpoint, which is not written."""
    import torch

    import dist_secvec.stage2 as stage2  # finetune's engine is built there

    class TamperingEngine(stage2.PlainEngine):
        def step(self, boundary):
            norm = super().step(boundary)
            if boundary and self.scheduler.last_epoch == 1:
                a = next(p for n, p in self.module.named_parameters() if "secvec_A" in n)
                with torch.no_grad():
                    a.view(-1)[0] += 1.0
            return norm

    monkeypatch.setattr(stage2, "PlainEngine", TamperingEngine)
    _, cfg = setup
    out = tmp_path / "out"
    rc, cap = cli("finetune", "--config", str(cfg), f"output_dir={out}", "logging.level=error")
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, cap.err[-2000:]
    assert f"security vector changed during stage 2 (step {EVERY})" in lines[0], lines
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not (out / "final").exists()


# ---------------------------------------------------------------------------------------------
# SIGTERM/SIGINT while loading (before the first step) or during the final save

SLOW = """
import os, sys, time
import dist_secvec.finetune as ft
import dist_secvec.stage2 as stage2

phase, mark = os.environ["SLOW_PHASE"], os.environ["SLOW_MARK"]
# load_model: in stage 2's setup; write_manifest: final/'s, inside atomic_dir
mod, name = {"load": (stage2, "load_model"), "save": (ft, "write_manifest")}[phase]
real = getattr(mod, name)

def slow(*args, **kwargs):
    open(mark, "w").close()
    time.sleep({"load": 60, "save": 3}[phase])
    return real(*args, **kwargs)

setattr(mod, name, slow)
from dist_secvec.cli import main
sys.exit(main(sys.argv[1:]))
"""
SHORT = ("optim.max_steps=4", "checkpoint.every_steps=2")


def signal_in_phase(cfg: Path, out: Path, phase: str, sig: str) -> tuple[int, float, list[str], str]:
    """A finetune run whose model load (or final save) is slowed down; `sig` is sent once it is there.
    Returns the exit code, the seconds from the signal to the exit, the `dist-secvec` lines, stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mark, err = out.parent / f"{phase}.mark", out.parent / f"{phase}.stderr"
    env = dict(sub_env(), SLOW_PHASE=phase, SLOW_MARK=str(mark))
    with open(err, "w") as f:
        p = subprocess.Popen([PY, "-c", SLOW, "finetune", "--config", str(cfg), f"output_dir={out}", *SHORT],
                             stdout=subprocess.DEVNULL, stderr=f, env=env)
    STARTED.append(p)
    t = time.time()
    while not mark.exists():
        assert p.poll() is None and time.time() - t < 120, err.read_text()[-3000:]
        time.sleep(0.02)
    t = time.time()
    p.send_signal(getattr(signal, sig))
    rc = p.wait(timeout=120)
    text = err.read_text()
    return rc, time.time() - t, [ln for ln in text.splitlines() if ln.startswith("dist-secvec")], text


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_while_loading_stops_at_once_and_resume_works(setup, tmp_path, sig):
    _, cfg = setup
    out = tmp_path / "out"
    rc, took, lines, text = signal_in_phase(cfg, out, "load", sig)
    assert rc == 0 and lines == [f"dist-secvec finetune: stopped by {sig} while loading, before the first training "
                                 "step: nothing was trained since the last checkpoint; resume with "
                                 "checkpoint.resume=latest"], text[-3000:]
    assert took < 10 and "Traceback" not in text, (took, text[-3000:])
    assert not (out / "final").exists() and not (out / "checkpoints").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    p, err = start(cfg, out, *SHORT, "checkpoint.resume=latest", tag="resume")
    assert p.wait(timeout=300) == 0, err.read_text()[-3000:]
    assert finished(out) and logged_steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_the_final_save_finishes_it_then_exits_0(setup, tmp_path, sig):
    from dist_secvec.manifest import verify_manifest

    _, cfg = setup
    out = tmp_path / "out"
    rc, took, lines, text = signal_in_phase(cfg, out, "save", sig)
    assert rc == 0 and lines == [f"dist-secvec finetune: {sig} received while finishing: the run is complete, "
                                 f"{out / 'final'} was saved first (nothing to resume)"], text[-3000:]
    assert "Traceback" not in text
    verify_manifest(out / "final")  # whole, as its manifest says
    assert json.loads((out / "final" / "dist_secvec_run.json").read_text())["steps"] == 4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
