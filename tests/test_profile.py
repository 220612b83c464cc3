"""`dist-secvec profile`: hand-counted FLOPs, measured memory, the vector's zero bytes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dist_secvec.config import load_config
from dist_secvec.profile import (build_job, flops_per_token, optimizer_state_bytes, run_steps, secvec_grad_bytes,
                                 secvec_optimizer_bytes)

REQUIRED = ("tokens_per_s", "tokens_per_s_per_rank", "step_time_s", "flops_per_token", "flops_formula", "mfu",
            "peak_memory_bytes", "secvec_grad_bytes", "secvec_optimizer_bytes", "world_size", "phases",
            "loss_tokens_per_s", "memory_breakdown", "secvec_overhead")


def _cfg(tiny_world, tmp_path, vector, **over):
    base = {"model": {"path": str(tiny_world.model_dir)}, "data": {"train": [tiny_world.data["finetune_mixed"]],
                                                                   "max_length": 64},
            "security_vector": {"path": str(vector) if vector else None},
            "optim": {"micro_batch_size": 4, "lr": 1e-3}, "output_dir": str(tmp_path / "out"),
            "logging": {"progress": False}, "seed": 0}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v}
    return load_config(None, None, base=base)


def _vocab(job):
    return job.model.config.vocab_size if hasattr(job.model, "config") else None


def test_flops_full_finetune_matches_hand_count(tiny_world, random_vector, tmp_path):
    job = build_job(_cfg(tiny_world, tmp_path, random_vector), 1)
    assert job.vector_mode == "attached"
    V, T = _vocab(job), 50.0
    # tiny Llama: hidden 32, 2 layers, intermediate 64, 4 heads of 8
    per_layer = 4 * 32 * 32 + 2 * 32 * 64 + 64 * 32  # q,k,v,o + gate,up + down = 10240
    linear = 2 * per_layer + 32 * V  # + lm_head
    attention = 12 * 2 * T * 4 * 8  # fwd QK^T + AV = 2*2*T*d per layer, x3 for fwd+bwd
    # vector rank 4 on q_proj (32->32), v_proj (32->32), down_proj (64->32) in both layers: 4*r*(K+N)
    delta = 2 * (4 * 4 * (32 + 32) + 4 * 4 * (32 + 32) + 4 * 4 * (64 + 32))
    assert delta == 7168
    flops, formula, parts = flops_per_token(job.model, T, job.sv_layers, job.folded)
    assert flops == 6 * linear + attention + delta  # every weight trainable in full fine-tuning
    assert parts["frozen_linear_params"] == 0 and parts["trainable_linear_params"] == linear
    assert "4*r*(K+N)" in formula and "12*n_layers*seq_len*n_heads*head_dim" in formula


def test_flops_lora_folded_matches_hand_count(tiny_world, random_vector, tmp_path):
    cfg = _cfg(tiny_world, tmp_path, random_vector,
               adapter={"type": "lora", "rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]})
    job = build_job(cfg, 1)
    assert job.vector_mode == "folded" and not job.sv_layers
    V, T = job.model.get_base_model().config.vocab_size, 40.0
    frozen = 2 * (4 * 32 * 32 + 2 * 32 * 64 + 64 * 32) + 32 * V
    lora = 2 * 2 * (2 * 32 + 32 * 2)  # 2 layers x (q, v) x (A: 2x32 + B: 32x2)
    flops, _, _ = flops_per_token(job.model, T, job.sv_layers, job.folded)
    assert flops == 4 * frozen + 6 * lora + 12 * 2 * T * 4 * 8 + 0  # folded vector: no per-token cost


def test_memory_breakdown_is_the_tensors_sizes(tiny_world, random_vector, tmp_path):
    job = build_job(_cfg(tiny_world, tmp_path, random_vector), 2)
    res = run_steps(job, steps=2, warmup=0)
    mem = res["memory"]
    all_params = list(job.model.parameters())
    trainable = [p for p in all_params if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in all_params)
    assert mem["param_bytes"] == 4 * sum(p.numel() for p in all_params)
    assert mem["grad_bytes"] == 4 * sum(p.numel() for p in trainable)  # grads only for trainable weights
    # AdamW: exp_avg + exp_avg_sq per trainable weight, plus a float32 scalar `step` each
    assert mem["optimizer_state_bytes"] == 2 * 4 * sum(p.numel() for p in trainable) + 4 * len(trainable)
    assert mem["secvec_param_bytes"] == 4 * sum(l.secvec_A.numel() + l.secvec_B.numel() for l in job.sv_layers) > 0
    assert mem["secvec_grad_bytes"] == 0 and mem["secvec_optimizer_bytes"] == 0
    assert mem["peak"]["kind"] == ("cuda" if torch.cuda.is_available() else "process_rss")
    assert len(res["records"]) == 2 and all(r["step"] > 0 and r["tokens_loss"] > 0 for r in res["records"])


def test_secvec_byte_measures_can_fail(tiny_world, random_vector, tmp_path):
    job = build_job(_cfg(tiny_world, tmp_path, random_vector), 1)
    run_steps(job, steps=1, warmup=0)
    assert secvec_grad_bytes(job.sv_layers, job.folded) == 0
    assert secvec_optimizer_bytes(job.optimizer, job.sv_layers, job.folded) == 0
    A = job.sv_layers[0].secvec_A
    A.grad = torch.zeros_like(A)  # a gradient where none may be: the measure must see it
    assert secvec_grad_bytes(job.sv_layers, job.folded) == A.numel() * 4
    job.optimizer.state[A] = {"exp_avg": torch.zeros_like(A), "exp_avg_sq": torch.zeros_like(A)}
    assert secvec_optimizer_bytes(job.optimizer, job.sv_layers, job.folded) == 2 * A.numel() * 4
    assert optimizer_state_bytes(job.optimizer, {id(A)}) == 2 * A.numel() * 4


def _job_file(tmp_path, tiny_world, random_vector) -> Path:
    """The tiny world's stage-2 job (full fine-tuning, micro-batch 4) as a YAML file for the CLI."""
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_world.model_dir)},
        "data": {"train": [tiny_world.data["finetune_mixed"]], "max_length": 64},
        "security_vector": {"path": str(random_vector)}, "optim": {"micro_batch_size": 4},
        "logging": {"progress": False}}))
    return cfg_file


def test_cli_profile_on_tiny_world(tiny_world, random_vector, tmp_path, monkeypatch):
    from dist_secvec.cli import main

    out = tmp_path / "prof"
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    monkeypatch.setenv("DIST_SECVEC_PROFILE_MEMORY", "off")  # test_cli_profile_memory_per_variant runs the children
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "3", "--warmup", "1"]) == 0
    r = json.loads((out / "profile.json").read_text())
    for key in REQUIRED:
        assert key in r, key
    assert r["world_size"] == 1 and len(r["tokens_per_s_per_rank"]) == 1 and len(r["peak_memory_bytes"]) == 1
    assert r["job"]["steps"] == 3 and r["step_time"]["n"] == 3
    assert r["tokens_per_s"] > 0 and r["loss_tokens_per_s"] <= r["tokens_per_s"] <= r["padded_tokens_per_s"]
    assert r["secvec_grad_bytes"] == 0 and r["secvec_optimizer_bytes"] == 0
    assert r["flops_per_token"] > 0 and r["flops_formula"].startswith("flops_per_token =")
    ov = r["secvec_overhead"]
    assert ov["no_vector"]["step_time_ratio"] == 1.0 and ov["torch"]["step_time_ratio"] > 0
    if not torch.cuda.is_available():
        assert r["mfu"] is None and ov["triton"]["step_time_ratio"] is None and "CUDA" in ov["triton"]["reason"]
        assert r["memory_breakdown"]["activation_bytes_estimate"] is None
    # the interleaved overhead report: every variant with its ratio, the vector's FLOP share, the target
    assert "interleaved" in r["overhead_method"] and "1.5 x flop_share" in r["overhead_target"]
    share = r["flops_parts"]["secvec_delta"] / r["flops_per_token"]
    assert set(r["overhead"]) == {"configured", "no_vector", "torch", "triton"}
    for v, rec in r["overhead"].items():
        assert {"ratio", "flop_share", "within_target"} <= set(rec), v
        assert rec["flop_share"] == pytest.approx(share)
    for v in ("configured", "torch"):
        rec = r["overhead"][v]
        assert rec["ratio"] > 0 and rec["n_steps"] == 3 and isinstance(rec["within_target"], bool)
        assert rec["within_target"] == (rec["ratio"] - 1 <= 1.5 * share)
        assert rec["step_time_p25"] <= rec["step_time_s"] <= rec["step_time_p75"]
    assert r["overhead"]["no_vector"]["ratio"] == 1.0 and r["overhead"]["no_vector"]["within_target"] is None
    assert r["overhead"]["no_vector"]["flop_share_computed"] == 0
    # which code computed the vector: full fine-tuning on CPU, the weight delta on every call
    assert r["overhead"]["no_vector"]["vector_paths"] == {}
    for v in ("configured", "torch"):
        paths = r["overhead"][v]["vector_paths"]
        assert paths["weight_delta"] > 0 and paths["delta"] == paths["fused_lora"] == 0, (v, paths)
    if not torch.cuda.is_available():
        assert r["overhead"]["triton"]["ratio"] is None and "CUDA" in r["overhead"]["triton"]["skipped"]
    assert r["variant_memory"] is None and "off" in r["variant_memory_method"]
    for name in ("profile.md", "profile_step_time.png", "profile_memory.png", "profile_overhead.png"):
        assert (out / name).stat().st_size > 0
    assert "| torch |" in (out / "profile.md").read_text()


def test_cli_profile_memory_per_variant(tiny_world, random_vector, tmp_path, monkeypatch):
    """Each variant's peak memory comes from a fresh process of its own (CPU: peak RSS cannot be
    reset in a process that holds the other variants' jobs), compared with no_vector's."""
    from dist_secvec.cli import main

    out = tmp_path / "prof"
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    monkeypatch.setenv("DIST_SECVEC_PROFILE_VARIANTS", "no_vector")
    monkeypatch.setenv("DIST_SECVEC_PROFILE_MEMORY", "process")
    monkeypatch.setenv("DIST_SECVEC_PROFILE_MEMORY_STEPS", "1")
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "2", "--warmup", "0"]) == 0
    r = json.loads((out / "profile.json").read_text())
    assert r["job"]["warmup"] == 1  # with variants every job runs at least one step alone first
    assert "fresh process" in r["variant_memory_method"]
    mem = r["variant_memory"]
    assert set(mem) == {"configured", "no_vector"}
    for v, rec in mem.items():
        assert "error" not in rec, rec
        assert len(rec["peak_memory_bytes"]) == 1 and rec["peak_memory_bytes"][0] > 100 * 2 ** 20  # a whole process
        assert rec["peak_memory_kind"] == ("cuda" if torch.cuda.is_available() else "process_rss")
        assert isinstance(rec["within_2pct"], bool)
    assert mem["no_vector"]["ratio_to_no_vector"] == 1.0
    c = mem["configured"]
    assert c["ratio_to_no_vector"] == pytest.approx(c["peak_memory_bytes"][0] / mem["no_vector"]["peak_memory_bytes"][0])
    assert c["within_2pct"] == (c["ratio_to_no_vector"] <= 1.02)
    assert r["overhead"]["configured"]["peak_memory_ratio"] == c["ratio_to_no_vector"]
    assert r["overhead"]["configured"]["memory_within_target"] == c["within_2pct"]


def test_memory_child_is_another_process(tiny_world, random_vector, tmp_path):
    import os

    from dist_secvec.profile import memory_in_processes

    cfg = _cfg(tiny_world, tmp_path, random_vector)
    res = memory_in_processes(cfg, ["torch"], steps=1, warmup=0, out=tmp_path / "m", use_ds=False, repeats=2)
    (rec,) = res["torch"]  # one rank
    assert "error" not in rec, rec
    assert len(rec["peak_repeats"]) == 2 and rec["peak"]["max_rss" if rec["peak"]["kind"] == "process_rss"
                                                             else "max_allocated"] == min(rec["peak_repeats"])
    assert rec["pid"] != os.getpid() and rec["mode"] == "attached" and rec["steps"] == 1
    assert rec["memory"]["secvec_grad_bytes"] == 0 and rec["memory"]["secvec_optimizer_bytes"] == 0
    assert rec["memory"]["secvec_param_bytes"] > 0
    assert rec["peak"]["kind"] == ("cuda" if torch.cuda.is_available() else "process_rss")


def test_interleaved_rounds_rotate_and_share_batches(tiny_world, random_vector, tmp_path, monkeypatch):
    """Every variant runs `steps` measured steps after its warmup alone, in rounds of per_round
    steps whose order rotates; step i of each variant sees the same batch."""
    from dist_secvec import profile
    from dist_secvec.data import load_samples, tokenize_samples
    from dist_secvec.model import load_tokenizer

    cfg = _cfg(tiny_world, tmp_path, random_vector)
    tok = load_tokenizer(cfg.model)
    examples = tokenize_samples(tok, load_samples(cfg.data.train, "auto", cfg.data.split, None), cfg.data).examples
    calls = []
    real_step = profile.StepRunner.step

    def step(self, measured=True):
        rec = real_step(self, measured)
        calls.append((self.job.vector_mode, measured, rec["tokens_padded"]))
        return rec

    monkeypatch.setattr(profile.StepRunner, "step", step)
    m = profile.measure_jobs(cfg, ["configured", "no_vector"], steps=3, warmup=1, tok=tok, examples=examples,
                             per_round=2)
    order = [mode for mode, measured, _ in calls]
    # build + warmup alone, then rounds: (cfg x2, off x2), (off x1, cfg x1): rotated
    assert order == ["attached", "off", "attached", "attached", "off", "off", "off", "attached"]
    assert [c[1] for c in calls] == [False, False] + [True] * 6
    tokens = {mode: [t for md, meas, t in calls if md == mode] for mode in ("attached", "off")}
    assert tokens["attached"] == tokens["off"]  # the same batches in the same order
    for name in ("configured", "no_vector"):
        (rank,) = m[name]["ranks"]
        assert len(rank["step_times"]) == 3 and rank["memory"]["peak"]["kind"]
    assert m["configured"]["mode"] == "attached" and m["no_vector"]["mode"] == "off"


def test_overhead_report_pairs_steps_and_checks_the_target():
    from dist_secvec.profile import overhead_report, spread

    def agg(times, delta, fpt=1000.0):
        return {"step_time_s": spread(times)["median"], "step_time": spread(times), "step_times": times,
                "flops_parts": {"secvec_delta": delta}, "flops_per_token": fpt}

    base = [1.0, 2.0, 1.0, 2.0]
    a = {"configured": agg([1.05, 2.1, 1.05, 2.1], 0.0), "no_vector": agg(base, 0.0),
         "torch": agg([1.2, 2.4, 1.2, 2.4], 40.0, 1040.0)}
    measured = {n: {"mode": m, "backend": None} for n, m in
                (("configured", "folded"), ("no_vector", "off"), ("torch", "attached"))}
    mem = {"variants": {"no_vector": {"peak_memory_bytes": [100], "ratio_to_no_vector": 1.0, "within_2pct": True}}}
    rep = overhead_report(a, measured, {"triton": "Triton path needs CUDA"}, mem, 2, 2, True)
    v = rep["variants"]
    share = 40.0 / 1040.0  # the vector's share where it is attached, for every variant
    assert v["torch"]["ratio"] == pytest.approx(1.2) and v["torch"]["flop_share"] == pytest.approx(share)
    assert v["torch"]["within_target"] is False  # +20% > 1.5 x 3.8%
    assert v["configured"]["ratio"] == pytest.approx(1.05) and v["configured"]["within_target"] is True
    assert v["configured"]["flop_share_computed"] == 0.0  # folded: no per-token cost
    assert v["no_vector"]["ratio"] == 1.0 and v["no_vector"]["memory_within_target"] is True
    assert v["triton"] == {"ratio": None, "flop_share": pytest.approx(share), "within_target": None,
                           "skipped": "Triton path needs CUDA"}
    assert "2 rounds of 2" in rep["method"]


def test_gather_needs_a_process_group_under_several_ranks(monkeypatch):
    from dist_secvec.errors import UserError
    from dist_secvec.profile import gather

    assert gather(3) == [3]
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank started by hand, no launcher: no process group
    with pytest.raises(UserError, match="launcher"):
        gather(3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_profile_two_ranks_zero3_through_the_launcher(tiny_world, random_vector, tmp_path):
    """`dist-secvec profile` on 2 CPU ranks under ZeRO-3, started by launch/deepspeed.sh and the real
    deepspeed launcher: rank 0 writes every rank's figures; each rank holds half the parameters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dist_secvec.profile import param_bytes

    root = Path(__file__).resolve().parents[1]
    job = {"model": {"path": str(tiny_world.model_dir)},
           "data": {"train": [tiny_world.data["finetune_mixed"]], "max_length": 64},
           "adapter": {"type": "none"}, "security_vector": {"path": str(random_vector)},
           "optim": {"micro_batch_size": 2, "lr": 1e-3}, "logging": {"progress": False}, "seed": 0}
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump({**job, "deepspeed": {"config": {"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}}}))
    out = tmp_path / "prof"
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPSPEED=str(Path(sys.executable).with_name("deepspeed")),
               DIST_SECVEC_PROFILE_VARIANTS="no_vector",  # one overhead variant: keeps the test short
               DIST_SECVEC_PROFILE_MEMORY_STEPS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([str(root / "launch" / "deepspeed.sh"), "--gpus", "2", "--cpu", "--master-port",
                        str(_free_port()), "--", "profile", "--config", str(cfg_file), f"output_dir={out}",
                        "--steps", "2", "--warmup", "1"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert "time (ms)" not in r.stdout  # DeepSpeed's per-step timer lines are kept out of the output
    p = json.loads((out / "profile.json").read_text())
    for key in REQUIRED:
        assert key in p, key
    assert p["world_size"] == 2 and p["zero_stage"] == 3 and p["step_time"]["n"] == 2
    for key in ("tokens_per_s_per_rank", "peak_memory_bytes", "param_bytes_per_rank", "step_time_s_per_rank",
                "grad_bytes_per_rank", "optimizer_state_bytes_per_rank"):
        assert len(p[key]) == 2 and all(v > 0 for v in p[key]), key
    assert p["tokens_per_s"] == pytest.approx(sum(p["tokens_per_s_per_rank"]))
    assert p["comm_time_s"] is not None and p["comm_time_s"] >= 0 and "bwd_allreduce" in p["comm_time_source"]
    assert p["secvec_grad_bytes"] == 0 and p["secvec_optimizer_bytes"] == 0
    assert p["job"]["vector_mode"] == "attached"  # never folded into ZeRO-3 partitions
    assert p["flops_parts"]["secvec_delta"] == 7168  # the vector's whole shapes, not its partitions
    # the 1-rank figure: the same job in one plain process
    one = build_job(load_config(None, None, base={**job, "output_dir": str(tmp_path / "one")}), 1)
    whole = param_bytes(one.model)
    assert p["param_bytes_whole"] == whole
    for held in p["param_bytes_per_rank"]:
        assert 0.5 * whole <= held <= 0.55 * whole  # the target: at most 55% of the 1-rank figure
    assert sum(p["param_bytes_per_rank"]) >= whole
    assert p["param_memory_ratio"] <= 0.55
    ov = p["secvec_overhead"]
    assert ov["no_vector"]["step_time_ratio"] == 1.0 and ov["configured"]["step_time_ratio"] > 0 and "torch" not in ov
    # interleaved rounds on both ranks; each variant's memory from child processes of both ranks (a group of their own)
    assert set(p["overhead"]) == {"configured", "no_vector"} and p["overhead"]["configured"]["n_steps"] == 2
    assert isinstance(p["overhead"]["configured"]["within_target"], bool)
    for v, rec in p["variant_memory"].items():
        assert "error" not in rec, rec
        assert len(rec["peak_memory_bytes"]) == 2 and all(b > 0 for b in rec["peak_memory_bytes"]), v
        assert isinstance(rec["within_2pct"], bool)
    for name in ("profile.md", "profile_step_time.png", "profile_memory.png", "profile_overhead.png"):
        assert (out / name).stat().st_size > 0


def test_out_of_memory_while_interleaving_says_how_to_avoid_it(tiny_world, random_vector, tmp_path, monkeypatch,
                                                                capsys):
    """The interleaved variants are all held at once; running out of memory there is one line that
    names DIST_SECVEC_PROFILE_INTERLEAVE=0, exit 2."""
    import dist_secvec.profile as prof
    from dist_secvec.cli import main

    real, calls = prof.build_job, []

    def build_job(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second variant does not fit next to the first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(prof, "build_job", build_job)
    monkeypatch.setenv("DIST_SECVEC_PROFILE_MEMORY", "off")
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    out = tmp_path / "prof"
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "2", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "DIST_SECVEC_PROFILE_INTERLEAVE=0" in err[-1] and "1 of the variants" in err[-1], err[-3:]
    assert not (out / "profile.json").exists()
