"""`dist-secvec profile`: hand-counted FLOPs, measured memory, the vector's zero bytes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import launch_cli
from dist_secvec.config import load_config
from dist_secvec.profile import (build_variant, flops_per_token, optimizer_state_bytes, run_steps, secvec_grad_bytes,
                                 secvec_optimizer_bytes)
from dist_secvec.secvec import describe_paths

# profile.json's sections (dist_secvec.profile.report) and the figures every run fills in
REQUIRED = ("schema", "device", "world_size", "job", "step_time", "phases", "comm", "tokens", "flops", "memory",
            "secvec", "partition", "overhead")
FILLED = (("tokens", "per_s", "nonpad"), ("tokens", "per_s_per_rank", "nonpad"), ("tokens", "per_s", "loss"),
          ("step_time", "median"), ("flops", "per_token"), ("flops", "formula"), ("memory", "peak", "bytes"),
          ("memory", "breakdown"), ("secvec", "grad_bytes"), ("secvec", "optimizer_bytes"))


def at(r: dict, path: tuple):
    for k in path:
        r = r[k]
    return r


def check_sections(r: dict) -> None:
    for key in REQUIRED:
        assert key in r, key
    assert "mfu" in r["flops"]
    for path in FILLED:
        assert at(r, path) is not None, path
    assert r["schema"] == 2


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
    job = build_variant(_cfg(tiny_world, tmp_path, random_vector))
    assert job.mode == "attached"
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
    job = build_variant(cfg)
    assert job.mode == "folded" and not job.sv_layers
    V, T = job.model.get_base_model().config.vocab_size, 40.0
    frozen = 2 * (4 * 32 * 32 + 2 * 32 * 64 + 64 * 32) + 32 * V
    lora = 2 * 2 * (2 * 32 + 32 * 2)  # 2 layers x (q, v) x (A: 2x32 + B: 32x2)
    flops, _, _ = flops_per_token(job.model, T, job.sv_layers, job.folded)
    assert flops == 4 * frozen + 6 * lora + 12 * 2 * T * 4 * 8 + 0  # folded vector: no per-token cost


def test_memory_breakdown_is_the_tensors_sizes(tiny_world, random_vector, tmp_path):
    job = build_variant(_cfg(tiny_world, tmp_path, random_vector))
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
    job = build_variant(_cfg(tiny_world, tmp_path, random_vector))
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


def test_cli_profile_on_tiny_world(tiny_world, random_vector, tmp_path):
    from dist_secvec.cli import main

    out = tmp_path / "prof"
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    # profile.memory=none: test_cli_profile_memory_per_variant runs the children
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "3", "--warmup", "1",
                 "profile.memory=none"]) == 0
    r = json.loads((out / "profile.json").read_text())
    check_sections(r)
    tok, mem = r["tokens"], r["memory"]
    assert r["world_size"] == 1 and len(tok["per_s_per_rank"]["nonpad"]) == 1 and len(mem["peak"]["bytes"]) == 1
    assert r["job"]["steps"] == 3 and r["step_time"]["n"] == 3
    assert tok["per_s"]["nonpad"] > 0 and tok["per_s"]["loss"] <= tok["per_s"]["nonpad"] <= tok["per_s"]["padded"]
    assert r["secvec"]["grad_bytes"] == 0 and r["secvec"]["optimizer_bytes"] == 0
    assert r["flops"]["per_token"] > 0 and r["flops"]["formula"].startswith("flops_per_token =")
    ov = r["overhead"]
    v = ov["variants"]
    assert v["no_vector"]["ratio_of_medians"] == 1.0 and v["torch"]["ratio_of_medians"] > 0
    if not torch.cuda.is_available():
        assert r["flops"]["mfu"] is None and v["triton"]["ratio"] is None and "CUDA" in v["triton"]["skipped"]
        assert mem["breakdown"]["activation_bytes_estimate"] is None
    # the interleaved overhead report: every variant with its ratio, the vector's FLOP share, the target
    assert "interleaved" in ov["method"] and "1.5 x flop_share" in ov["target"]
    share = r["flops"]["parts"]["secvec_delta"] / r["flops"]["per_token"]
    assert ov["flop_share"] == pytest.approx(share)
    assert set(v) == {"configured", "no_vector", "torch", "triton"}
    for name, rec in v.items():
        assert {"ratio", "flop_share", "within_target"} <= set(rec), name
        assert rec["flop_share"] == pytest.approx(share)
    for name in ("configured", "torch"):
        rec = v[name]
        assert rec["ratio"] > 0 and rec["step_time"]["n"] == 3 and isinstance(rec["within_target"], bool)
        assert rec["within_target"] == (rec["ratio"] - 1 <= 1.5 * share)
        assert rec["step_time"]["p25"] <= rec["step_time"]["median"] <= rec["step_time"]["p75"]
        assert rec["ratio_p25"] <= rec["ratio"] <= rec["ratio_p75"]
    assert v["no_vector"]["ratio"] == 1.0 and v["no_vector"]["within_target"] is None
    assert v["no_vector"]["flop_share_computed"] == 0 and v["no_vector"]["mode"] == "off"
    # which code computed the vector: full fine-tuning on CPU, the weight delta on every call, as
    # finetune chooses it (path_options: micro-batch x max_length rows per call)
    assert v["no_vector"]["vector_paths"] == {}
    for name in ("configured", "torch"):
        paths = v[name]["vector_paths"]
        assert paths["weight_delta"] > 0 and paths["delta"] == paths["fused_lora"] == 0, (name, paths)
    assert r["job"]["vector_paths"] == v["configured"]["vector_paths"]
    assert r["job"]["vector_mode"] == "attached" and r["job"]["vector_layers"] == 6
    assert r["job"]["vector_path_choice"] == "6 weight_delta"
    if not torch.cuda.is_available():
        assert v["triton"]["ratio"] is None and "CUDA" in v["triton"]["skipped"]
    assert ov["memory"]["method"] is None and ov["memory"]["reason"] == "profile.memory=none"
    assert all(rec.get("memory") is None for rec in v.values())
    for name in ("profile.md", "profile_step_time.png", "profile_memory.png", "profile_overhead.png"):
        assert (out / name).stat().st_size > 0
    assert "| torch |" in (out / "profile.md").read_text()


def test_profile_job_gates_rows_as_finetune_does(tiny_world, random_vector, tmp_path):
    """With a gate threshold the vector is gated per row in the profiled job too: the gate's
    decision reported, the vector never folded, the layers on the path they would take ungated."""
    from dist_secvec.profile import measure_jobs
    from dist_secvec.stage2 import setup_stage2

    cfg = _cfg(tiny_world, tmp_path, random_vector, security_vector={"gate_threshold": 0.0},
               adapter={"type": "lora", "rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]})
    job = setup_stage2(cfg)
    assert job.gate is not None and job.mode == "attached"
    assert "gated" not in describe_paths(job.sv_layers)
    m = measure_jobs(cfg, ["configured"], steps=2, warmup=0, tok=job.tok, train=job.train)
    assert m["configured"]["mode"] == "attached" and m["configured"]["gate"] == job.gate_info
    assert m["configured"]["path_choice"] == describe_paths(job.sv_layers)
    assert sum(m["configured"]["paths"].values()) > 0


def test_cli_profile_memory_per_variant(tiny_world, random_vector, tmp_path):
    """Each variant's peak memory comes from a fresh process of its own (CPU: peak RSS cannot be
    reset in a process that holds the other variants' jobs), compared with no_vector's."""
    from dist_secvec.cli import main

    out = tmp_path / "prof"
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "2", "--warmup", "0",
                 "profile.variants=[no_vector]", "profile.memory=process", "profile.memory_steps=1"]) == 0
    r = json.loads((out / "profile.json").read_text())
    assert r["job"]["warmup"] == 1  # with variants every job runs at least one step alone first
    assert "fresh process" in r["overhead"]["memory"]["method"]
    mem = {v: rec["memory"] for v, rec in r["overhead"]["variants"].items()}
    assert set(mem) == {"configured", "no_vector"}
    for v, rec in mem.items():
        assert "error" not in rec, rec
        assert len(rec["peak_bytes"]) == 1 and rec["peak_bytes"][0] > 100 * 2 ** 20  # a whole process
        assert rec["kind"] == ("cuda" if torch.cuda.is_available() else "process_rss")
        assert isinstance(rec["within_2pct"], bool)
    assert mem["no_vector"]["ratio"] == 1.0
    c = mem["configured"]
    assert c["ratio"] == pytest.approx(c["peak_bytes"][0] / mem["no_vector"]["peak_bytes"][0])
    assert c["within_2pct"] == (c["ratio"] <= 1.02)


def test_profile_keys_are_checked_in_one_line(tiny_world, random_vector, tmp_path, capsys):
    from dist_secvec.cli import main

    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    for override, msg in (("profile.variants=[no_vector,cuda]", "'profile.variants': unknown variant(s) cuda"),
                          ("profile.memory=always", "'profile.memory': 'always' is not one of"),
                          ("profile.round_steps=0", "'profile.round_steps': must be >= 1")):
        assert main(["profile", "--config", str(cfg_file), f"output_dir={tmp_path / 'p'}", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (override, err)
    assert not (tmp_path / "p").exists()


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
    train = tokenize_samples(tok, load_samples(cfg.data.train, "auto", cfg.data.split, None), cfg.data)
    calls = []
    real_step = profile.StepRunner.step

    def step(self, measured=True):
        rec = real_step(self, measured)
        calls.append((self.job.mode, measured, rec["tokens_padded"]))
        return rec

    monkeypatch.setattr(profile.StepRunner, "step", step)
    m = profile.measure_jobs(cfg, ["configured", "no_vector"], steps=3, warmup=1, tok=tok, train=train,
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
    from dist_secvec.profile import PHASES, overhead_report, spread

    def agg(times, delta, fpt=1000.0):
        return {"step_time_s": spread(times)["median"], "step_time": spread(times), "step_times": times,
                "phases": {p: spread(times) for p in PHASES},
                "flops_parts": {"secvec_delta": delta}, "flops_per_token": fpt}

    base = [1.0, 2.0, 1.0, 2.0]
    a = {"configured": agg([1.05, 2.1, 1.05, 2.1], 0.0), "no_vector": agg(base, 0.0),
         "torch": agg([1.2, 2.4, 1.2, 2.4], 40.0, 1040.0)}
    measured = {n: {"mode": m, "backend": None} for n, m in
                (("configured", "folded"), ("no_vector", "off"), ("torch", "attached"))}
    mem = {"method": "m", "variants": {"no_vector": {"peak_bytes": [100], "ratio": 1.0, "within_2pct": True}}}
    rep = overhead_report(a, measured, {"triton": "Triton path needs CUDA"}, mem, 2, 2, True)
    v = rep["variants"]
    share = 40.0 / 1040.0  # the vector's share where it is attached, for every variant
    assert rep["flop_share"] == pytest.approx(share) and rep["memory"]["method"] == "m"
    assert v["torch"]["ratio"] == pytest.approx(1.2) and v["torch"]["flop_share"] == pytest.approx(share)
    assert v["torch"]["within_target"] is False  # +20% > 1.5 x 3.8%
    assert v["configured"]["ratio"] == pytest.approx(1.05) and v["configured"]["within_target"] is True
    assert v["configured"]["flop_share_computed"] == 0.0  # folded: no per-token cost
    assert v["no_vector"]["ratio"] == 1.0 and v["no_vector"]["memory"]["within_2pct"] is True
    assert v["torch"]["memory"] is None  # no memory figure measured for it
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


@pytest.mark.slow
def test_profile_two_ranks_zero3_through_the_launcher(tiny_world, random_vector, tmp_path):
    """`dist-secvec profile` on 2 CPU ranks under ZeRO-3, started by launch/deepspeed.sh and the real
    deepspeed launcher: rank 0 writes every rank's figures; each rank holds half the parameters."""
    from dist_secvec.profile import param_bytes

    job = {"model": {"path": str(tiny_world.model_dir)},
           "data": {"train": [tiny_world.data["finetune_mixed"]], "max_length": 64},
           "adapter": {"type": "none"}, "security_vector": {"path": str(random_vector)},
           "optim": {"micro_batch_size": 2, "lr": 1e-3}, "logging": {"progress": False}, "seed": 0}
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump({**job, "deepspeed": {"config": {"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}}}))
    out = tmp_path / "prof"
    # one overhead variant: keeps the test short
    r = launch_cli(["--gpus", "2", "--", "profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "2",
                    "--warmup", "1", "profile.variants=[no_vector]", "profile.memory_steps=1"])
    assert "time (ms)" not in r.stdout  # DeepSpeed's per-step timer lines are kept out of the output
    p = json.loads((out / "profile.json").read_text())
    check_sections(p)
    mem = p["memory"]
    assert p["world_size"] == 2 and p["zero_stage"] == 3 and p["step_time"]["n"] == 2
    for key, values in (("tokens per s", p["tokens"]["per_s_per_rank"]["nonpad"]), ("peak", mem["peak"]["bytes"]),
                        ("step time", p["step_time"]["per_rank"]),
                        *((k, mem["per_rank"][k]) for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"))):
        assert len(values) == 2 and all(v > 0 for v in values), key
    assert p["tokens"]["per_s"]["nonpad"] == pytest.approx(sum(p["tokens"]["per_s_per_rank"]["nonpad"]))
    assert p["comm"] is not None and p["comm"]["median"] >= 0 and "bwd_allreduce" in p["comm"]["source"]
    assert p["secvec"]["grad_bytes"] == 0 and p["secvec"]["optimizer_bytes"] == 0
    assert p["job"]["vector_mode"] == "attached"  # full fine-tuning: never folded
    assert p["flops"]["parts"]["secvec_delta"] == 7168  # the vector's whole shapes, not its partitions
    assert len(p["partition"]) == 2
    # the 1-rank figure: the same job in one plain process
    one = build_variant(load_config(None, None, base={**job, "output_dir": str(tmp_path / "one")}))
    whole = param_bytes(one.model)
    assert mem["param_bytes_whole"] == whole
    for held in mem["per_rank"]["param_bytes"]:
        assert 0.5 * whole <= held <= 0.55 * whole  # the target: at most 55% of the 1-rank figure
    assert sum(mem["per_rank"]["param_bytes"]) >= whole
    assert mem["param_memory_ratio"] <= 0.55
    ov = p["overhead"]["variants"]
    assert ov["no_vector"]["ratio_of_medians"] == 1.0 and ov["configured"]["ratio_of_medians"] > 0
    # interleaved rounds on both ranks; each variant's memory from child processes of both ranks (a group of their own)
    assert set(ov) == {"configured", "no_vector"} and ov["configured"]["step_time"]["n"] == 2
    assert isinstance(ov["configured"]["within_target"], bool)
    for v, rec in ov.items():
        m = rec["memory"]
        assert "error" not in m, m
        assert len(m["peak_bytes"]) == 2 and all(b > 0 for b in m["peak_bytes"]), v
        assert isinstance(m["within_2pct"], bool)
    for name in ("profile.md", "profile_step_time.png", "profile_memory.png", "profile_overhead.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_profile_folds_under_zero3_as_finetune_does(tiny_world, random_vector, tmp_path):
    """A LoRA on an unquantized base under ZeRO-3 on 2 CPU ranks: finetune folds the vector into the
    partitioned base weights layer by layer, and the job profile measures is that same job, folded
    in as many layers, with no per-token vector cost."""
    from dist_secvec.secvec import load_security_vector

    job = {"model": {"path": str(tiny_world.model_dir)},
           "data": {"train": [tiny_world.data["finetune_mixed"]], "max_length": 64},
           "adapter": {"type": "lora", "rank": 4, "alpha": 8}, "security_vector": {"path": str(random_vector)},
           "optim": {"micro_batch_size": 2, "lr": 1e-3, "max_steps": 2},
           "deepspeed": {"config": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}},
           "logging": {"progress": False}, "seed": 0}
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(job))
    ft = launch_cli(["--gpus", "2", "--", "finetune", "--config", str(cfg_file), f"output_dir={tmp_path / 'ft'}"])
    info = json.loads((tmp_path / "ft" / "final" / "dist_secvec_run.json").read_text())
    assert info["zero_stage"] == 3 and info["security_vector_mode"] == "folded"
    n_layers = len(load_security_vector(str(random_vector)).weights)
    assert f"folded into {n_layers} frozen base weights" in ft.stderr + ft.stdout

    out = tmp_path / "prof"
    launch_cli(["--gpus", "2", "--", "profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "1",
                "--warmup", "0", "profile.variants=[]"])
    p = json.loads((out / "profile.json").read_text())
    assert p["zero_stage"] == 3 and p["world_size"] == info["world_size"] == 2
    assert p["job"]["vector_mode"] == info["security_vector_mode"] == "folded"
    assert p["job"]["vector_layers"] == n_layers
    assert p["job"]["vector_path_choice"] == info["security_vector_path_choice"] == "folded"
    assert p["flops"]["parts"]["secvec_delta"] == 0  # folded: no per-token cost
    assert p["secvec"]["grad_bytes"] == 0 and p["secvec"]["optimizer_bytes"] == 0
    assert p["overhead"]["variants"] is None and "profile.variants=[]" in p["overhead"]["reason"]


def test_out_of_memory_while_interleaving_says_how_to_avoid_it(tiny_world, random_vector, tmp_path, monkeypatch,
                                                                capsys):
    """The interleaved variants are all held at once; running out of memory there is one line that
    names profile.interleave=false, exit 2."""
    from dist_secvec.cli import main
    from dist_secvec.profile import variants

    real, calls = variants.build_variant, []

    def build_variant(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second variant does not fit next to the first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(variants, "build_variant", build_variant)
    cfg_file = _job_file(tmp_path, tiny_world, random_vector)
    out = tmp_path / "prof"
    assert main(["profile", "--config", str(cfg_file), f"output_dir={out}", "--steps", "2", "--warmup", "0",
                 "profile.memory=none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "profile.interleave=false" in err[-1] and "1 of the variants" in err[-1], err[-3:]
    assert not (out / "profile.json").exists()


def test_profile_audits_as_finetune_does_and_every_variant_trains_the_rows_left(tiny_world, random_vector,
                                                                                 tmp_path, monkeypatch):
    """data.audit=drop in the profiled job: the configured job leaves out the rows its audit flags,
    as finetune does, and the no_vector variant trains on the same rows (the same batches)."""
    from dist_secvec import profile
    from dist_secvec.model import load_tokenizer
    from dist_secvec.profile import variants
    from dist_secvec.stage2 import setup_stage2

    monkeypatch.setenv("DIST_SECVEC_CACHE", str(tmp_path / "cache"))
    harm = Path(tiny_world.data["harmful_sv"]).read_text().splitlines()[:6]
    ben = Path(tiny_world.data["new_task_ft"]).read_text().splitlines()[:10]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(harm + ben) + "\n")
    # the threshold at the median score: about half the rows flagged, whatever the random vector does
    cfg = _cfg(tiny_world, tmp_path, random_vector, data={"train": [str(data)], "audit": "report"},
               audit={"threshold": 0.0}, monitor={"rule": "none"})
    scores = sorted(r["score"] for r in map(json.loads, (Path(setup_stage2(cfg).cfg.output_dir) / "audit" /
                                                           "audit.jsonl").read_text().splitlines()))
    t = (scores[7] + scores[8]) / 2
    cfg = _cfg(tiny_world, tmp_path, random_vector, data={"train": [str(data)], "audit": "drop"},
               audit={"threshold": t}, monitor={"rule": "none"})
    n_flag = sum(s >= t for s in scores)
    assert 0 < n_flag < 16
    built, calls = {}, []
    real_build, real_step = variants.build_variant, profile.StepRunner.step

    def build(cfg, name="configured", *a, **k):
        built[name] = real_build(cfg, name, *a, **k)
        return built[name]

    def step(self, measured=True):
        rec = real_step(self, measured)
        calls.append((self.job.mode, rec["tokens_padded"]))
        return rec

    monkeypatch.setattr(variants, "build_variant", build)
    monkeypatch.setattr(profile.StepRunner, "step", step)
    tok = load_tokenizer(cfg.model)
    m = profile.measure_jobs(cfg, ["configured", "no_vector"], steps=2, warmup=0, tok=tok, train=None)
    assert m["configured"]["audit"]["flagged"] == n_flag and m["configured"]["audit"]["cached"] is True
    assert len(built["configured"].train.examples) == 16 - n_flag
    assert built["no_vector"].train.examples == built["configured"].train.examples
    assert built["no_vector"].mode == "off" and m["no_vector"]["audit"] is None
    tokens = {mode: [t for md, t in calls if md == mode] for mode in ("attached", "off")}
    assert tokens["attached"] == tokens["off"] and len(tokens["off"]) == 2
