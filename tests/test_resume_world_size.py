"""Resume on another world size (dist_secvec.checkpoint): a checkpoint written on N ranks resumes
on M with the same rows per optimizer step, and the run goes on as if it had never moved.

Slow tests chain real launches (tests/ds_probe.py through the deepspeed launcher, gloo on CPU):
1 rank -> stop at step 2 -> 2 ranks -> stop at step 4 -> 1 rank -> step 6, and every loss equals
the uninterrupted one-process run's, which it cannot unless the weights, the optimizer state, the
schedule and the data position all came across. Under ZeRO-2 the moves go through DeepSpeed's
universal checkpoint; with no deepspeed keys, between one plain process and DeepSpeed stage 0.
The fast tests: what differs in the run shape is accepted or refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_secvec.checkpoint import CheckpointError, check_run_shape
from test_deepspeed import launch

STEPS = 6


def shape(world, micro, ga, stage=2, **kw):
    return {"world_size": world, "micro_batch_size": micro, "gradient_accumulation_steps": ga, "zero_stage": stage,
            "seed": 0, "vector_digest": "v", "total_steps": STEPS, **kw}


def test_another_world_size_with_the_same_rows_per_step_is_accepted():
    check_run_shape(Path("ck"), shape(1, 4, 2), shape(2, 2, 2))
    check_run_shape(Path("ck"), shape(2, 2, 2), shape(1, 2, 4))
    check_run_shape(Path("ck"), shape(1, 4, 1, stage=None), shape(2, 2, 1, stage=0))  # plain <-> DeepSpeed stage 0


@pytest.mark.parametrize("written, now, fix", [
    (shape(2, 2, 2), shape(1, 2, 2), "set optim.gradient_accumulation_steps=4"),
    (shape(1, 3, 1), shape(2, 2, 1), "run on a number of ranks that divides 3"),
    (shape(1, 4, 1, stage=2), shape(2, 2, 1, stage=3), "resume it with deepspeed.zero_stage=2"),
    (shape(1, 4, 1, stage=2), shape(1, 4, 1, stage=None), "resume it with deepspeed.zero_stage=2"),
    (shape(1, 4, 1), shape(2, 2, 1, seed=1), "seed is 0 there, 1 now"),
])
def test_what_cannot_resume_is_refused_in_one_line(written, now, fix):
    with pytest.raises(CheckpointError) as e:
        check_run_shape(Path("ck"), written, now)
    assert fix in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the chain 1 -> 2 -> 1 ranks


def run_cfg(tw, out: Path, stage) -> dict:
    deepspeed = {} if stage is None else {"zero_stage": stage}
    return {"model": {"path": str(tw.model_dir)},
            "data": {"train": [tw.data["finetune_mixed"]], "max_length": 64},
            "adapter": {"type": "none"},
            "optim": {"lr": 1e-3, "max_steps": STEPS, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                      "schedule": "linear", "warmup_steps": 1},
            "deepspeed": deepspeed, "monitor": {"rule": "none"},
            "checkpoint": {"every_steps": 2, "resume": "latest"},
            "logging": {"log_every": 1, "progress": False},
            "output_dir": str(out / "run"), "seed": 3}


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory) -> list[float]:
    """The losses of one uninterrupted plain process."""
    from dist_secvec.config import load_config
    from dist_secvec.finetune import run_finetune

    tmp = tmp_path_factory.mktemp("ref")
    cfg = run_cfg(tiny_world, tmp, None)
    cfg["checkpoint"] = {}
    (tmp / "ref.yaml").write_text(yaml.safe_dump(cfg))
    return run_finetune(load_config(str(tmp / "ref.yaml"))).losses


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3, None], ids=["zero2-universal", "zero3-universal", "plain-and-stage0"])
def test_one_rank_to_two_and_back_continues_the_run(tiny_world, tmp_path, reference, stage):
    cfg = run_cfg(tiny_world, tmp_path, stage)
    first = launch(1, cfg, tmp_path / "a", env={"PROBE_STOP_AT_STEP": "2"})
    assert "stopped at step 2" in first["stopped"]
    # the same 4 rows per step on 2 ranks: 2 each
    second = launch(2, cfg, tmp_path / "b", "optim.micro_batch_size=2", env={"PROBE_STOP_AT_STEP": "4"})
    assert "stopped at step 4" in second["stopped"]
    ck4 = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert json.loads((ck4 / "trainer_state.json").read_text())["world_size"] == 2
    if stage is not None:  # the move from 1 rank went through the universal checkpoint of step 2
        assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "universal" / "universal").is_dir()
    # back on 1 rank, 2 rows per micro-batch and 2 micro-batches per step
    last = launch(1, cfg, tmp_path / "c", "optim.micro_batch_size=2", "optim.gradient_accumulation_steps=2")
    assert last["info"]["world_size"] == 1 and (last["info"]["zero_stage"] == stage)
    assert len(last["losses"]) == STEPS
    assert last["losses"] == pytest.approx(reference, rel=2e-5)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in log] == pytest.approx(reference, rel=2e-5)
