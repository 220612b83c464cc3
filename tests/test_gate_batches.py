"""Stage 2's per-row gate: each step's rows grouped so that micro-batches have the vector all on or
all off, which then take the layers' chosen path or skip the vector; the step's math unchanged."""

from __future__ import annotations

import pytest
import torch

from dist_secvec.config import load_config
from dist_secvec.distributed import rank_batches
from dist_secvec.secvec import path_calls, row_gate


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_steps_hold_the_same_rows_sorted_by_key(world):
    rows = list(range(40))
    key = lambda r: r % 3 == 0  # noqa: E731
    mb, per_step, steps = 2, 3, 6

    def stream(k):
        its = [rank_batches(rows, mb, r, world, torch.Generator().manual_seed(5), key=k, per_step=per_step)
               for r in range(world)]
        return [[next(it) for _ in range(per_step)] for _ in range(steps) for it in its]

    plain, grouped = stream(None), stream(key)
    mixed = 0
    for s in range(steps):
        a = [r for mbs in plain[s * world:(s + 1) * world] for b in mbs for r in b]
        b = [r for mbs in grouped[s * world:(s + 1) * world] for b in mbs for r in b]
        assert sorted(a) == sorted(b)  # one step: the same rows, only their order differs
        micro = [m for mbs in grouped[s * world:(s + 1) * world] for m in mbs]
        mixed += sum(len({key(r) for r in m}) > 1 for m in micro)
    assert mixed <= steps  # at most one micro-batch per step holds both kinds
    # without grouping rows of both kinds share most micro-batches
    assert sum(len({key(r) for r in m}) > 1 for mbs in plain for m in mbs) > steps
    # resume: skipping whole steps gives the stream from there
    skipped = rank_batches(rows, mb, 0, 1, torch.Generator().manual_seed(5), skip=2 * per_step, key=key,
                           per_step=per_step)
    again = rank_batches(rows, mb, 0, 1, torch.Generator().manual_seed(5), key=key, per_step=per_step)
    for _ in range(2 * per_step):
        next(again)
    assert [next(skipped) for _ in range(5)] == [next(again) for _ in range(5)]


def _job(tiny_world, vector, tmp_path, adapter):
    from dist_secvec.stage2 import setup_stage2

    cfg = load_config(None, None, base={
        "model": {"path": str(tiny_world.model_dir)},
        "data": {"train": [tiny_world.data["finetune_mixed"]], "max_length": 64, "max_samples": 48},
        "security_vector": {"path": str(vector), "gate_threshold": 0.0, "backend": "torch"},
        "adapter": adapter, "optim": {"micro_batch_size": 4, "gradient_accumulation_steps": 3, "lr": 1e-3},
        "output_dir": str(tmp_path / "out"), "logging": {"progress": False}, "seed": 0})
    job = setup_stage2(cfg)
    # the first step's 12 rows: 8 on, 4 off, spread out in the shuffled order
    first = [e for b in _plain(job, 3) for e in b]
    job.gate = {id(e): float(i % 3 != 1) for i, e in enumerate(first)}
    return job


def _plain(job, n=None):
    """The job's micro-batches in shuffled order, ungrouped (the first n, or the stream)."""
    it = rank_batches(job.train.examples, 4, 0, 1, torch.Generator().manual_seed(job.cfg.seed), job.cfg.data.shuffle)
    return it if n is None else [next(it) for _ in range(n)]


@pytest.mark.parametrize("adapter, fast", [
    ({"type": "lora", "rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]}, "fused_lora"),
    ({"type": "none"}, "weight_delta")], ids=["lora", "full"])
def test_gated_step_takes_the_fast_path_and_keeps_the_math(tiny_world, random_vector, tmp_path, monkeypatch,
                                                          adapter, fast):
    """A gated step of grouped micro-batches (vector on: the layers' chosen path; off: no vector)
    gives the loss, gradient norm and update of the same rows gated row by row in the shuffled
    order, with every micro-batch on the delta path."""
    from dist_secvec import stage2
    from dist_secvec.stage2 import train_step

    grouped = _job(tiny_world, random_vector, tmp_path / "a", adapter)
    assert fast in {layer.path for layer in grouped.sv_layers}
    before = path_calls(grouped.sv_layers)[fast]  # setup scored the rows with the vector on
    res = train_step(grouped, grouped.batches(), 1)
    assert path_calls(grouped.sv_layers)[fast] > before  # the all-on micro-batches took the fast path

    ref = _job(tiny_world, random_vector, tmp_path / "b", adapter)
    monkeypatch.setattr(stage2, "micro_gates", lambda job, firsts: [
        row_gate(job.sv_layers, torch.tensor([job.gate[id(e)] for e in f])) for f in firsts])
    plain = _plain(ref)
    before = path_calls(ref.sv_layers)[fast]
    res_ref = train_step(ref, plain, 1)
    assert path_calls(ref.sv_layers)[fast] == before
    assert res.loss == pytest.approx(res_ref.loss, rel=1e-5)
    assert res.grad_norm == pytest.approx(res_ref.grad_norm, rel=1e-4)
    for a, b in zip(grouped.params, ref.params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
