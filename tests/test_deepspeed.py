"""Stage 2 under DeepSpeed: real ranks started by the real deepspeed launcher (gloo on CPU).

Each `slow` test starts tests/ds_probe.py on 1 or 2 CPU ranks. What they show:
- ZeRO-3 partitions every parameter, the 4-bit base and the frozen security vector included
  (each rank holds half of each, rounded up), and the vector never reaches an optimizer;
- 2 ranks x micro-batch 2 follow the loss trajectory of 1 rank x micro-batch 4 (and of the
  plain single-process loop) on the same global batches;
- full fine-tuning and QLoRA (NF4 base) both train and export a model/adapter that reloads on one
  process to the logits of the gathered model;
- stop at step k with a checkpoint, resume: steps k+1.. repeat the uninterrupted run's losses;
- optim.nonfinite=skip: a NaN loss on one rank drops that step on both (ZeRO 0, 2, 3), and the
  losses equal the plain loop's that skipped the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_secvec.distributed import free_port

PROBE = Path(__file__).with_name("ds_probe.py")
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
STEPS = 6


def launch(ranks: int, cfg: dict, out: Path, *overrides: str, env: dict | None = None,
           timeout: float = 300) -> dict:
    """Run ds_probe.py on `ranks` CPU ranks; returns rank 0's probe.json."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    cmd = [str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(free_port()), "--no_local_rank",
           str(PROBE), str(cfg_path), str(out / "probe"), *overrides]
    r = subprocess.run(cmd, cwd=out, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"launcher exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    (out / "launcher.log").write_text(r.stdout + r.stderr)
    return json.loads((out / "probe" / "probe.json").read_text())


#: the per-row gate on with a random vector: some rows train with it on, some off
GATED = {"gate_threshold": 0.001}


def base_cfg(tw, vector: Path, out: Path, **sections) -> dict:
    cfg = {"model": {"path": str(tw.model_dir)},
           "data": {"train": [tw.data["finetune_mixed"]], "max_length": 64},
           "adapter": {"type": "none"},
           "security_vector": {"path": str(vector)},
           "optim": {"lr": 1e-3, "max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                     "schedule": "linear", "warmup_steps": 1},
           "deepspeed": {"config": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}},
           "logging": {"log_every": 1, "progress": False},
           "output_dir": str(out / "run"), "seed": 3}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def reload_logits(final: Path, base_dir: Path, adapter: bool, dtype=None):
    """The exported model (or base + adapter) on one process, plain transformers/peft."""
    import torch
    from transformers import AutoModelForCausalLM

    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype),
                                          str(final))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(final), dtype=dtype)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def gathered_logits(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "probe" / "logits.safetensors"))["logits"]


def assert_partitioned(info: dict, groups: tuple[str, ...]) -> None:
    parts = info["partition"]
    assert len(parts) == 2
    for g in groups:
        held = [p[g]["held"] for p in parts]
        total = parts[0][g]["total"]
        assert total > 0, g
        for p in parts:  # every parameter split in two (rounded up), none kept whole
            assert 0.5 <= p[g]["max_share"] <= 0.5 + 2 / max(total, 1) + 0.01, (g, p[g])
        assert sum(held) >= total and max(held) <= total // 2 + len(parts[0]) * 64, (g, held, total)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_ft(tiny_world, random_vector, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_full")
    return out, launch(2, base_cfg(tiny_world, random_vector, out, security_vector=GATED), out)


@pytest.mark.slow
def test_zero3_two_ranks_partition_base_and_vector(full_ft):
    out, probe = full_ft
    info = probe["info"]
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert_partitioned(info, ("security_vector", "trainable"))


@pytest.mark.slow
def test_no_shared_memory_left_behind(full_ft):
    """DeepSpeed's CPU all-reduce buffers (/dev/shm, 66 MB per rank, never unlinked by DeepSpeed)
    are removed once every rank has mapped them: a finished run leaves none."""
    _, probe = full_ft
    if not probe["shm_comm_op"]:
        pytest.skip("DeepSpeed's shm comm op is not in use here")
    leftover = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{probe['master_port']}_*"))
    assert not leftover, leftover


@pytest.mark.slow
def test_zero3_full_finetune_loss_falls_and_export_reloads(full_ft, tiny_world):
    import torch

    out, probe = full_ft
    losses = probe["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.05, losses
    # full fine-tuning on CPU: the vector's forwards with every row on ran as one weight delta, under
    # ZeRO-3 too; only micro-batches of rows on and off took the gated delta
    paths = probe["info"]["security_vector_paths"]
    assert paths["weight_delta"] > paths["delta"] and paths["fused_lora"] == 0, paths
    final = out / "run" / "final"
    assert json.loads((final / "dist_secvec_run.json").read_text())["security_vector"]
    from safetensors import safe_open

    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any("secvec" in k or "lora" in k for k in keys)
    torch.testing.assert_close(reload_logits(final, tiny_world.model_dir, adapter=False), gathered_logits(out),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_one_rank_and_plain_loop_follow_the_two_rank_losses(full_ft, tiny_world, random_vector, tmp_path,
                                                            monkeypatch):
    """Same global batches (2 x 2 vs 1 x 4 examples per micro-batch): the same losses. The 1-rank
    run also recomputes activations (reentrant checkpointing, the variant for frozen weights
    under ZeRO-3) and offloads optimizer states and parameters to CPU (ZeRO-Offload with the run's
    torch AdamW), which must not change them either. The plain loop adds the vector after each
    base layer (security_vector.weight_delta=false) where the DeepSpeed runs form W + s B A from ZeRO-3's
    gathered weights: the same losses too. The per-row gate is on: each step's rows are grouped by it
    alike on one and two ranks, and every rank runs the vector on, off or gated in step."""
    _, probe2 = full_ft
    cfg = base_cfg(tiny_world, random_vector, tmp_path, optim={"micro_batch_size": 4}, security_vector=GATED)
    gate = probe2["info"]["security_vector_gate"]
    assert gate["rows_vector_on"] > 0 and gate["rows_vector_off"] > 0  # rows of both kinds, grouped per step
    probe1 = launch(1, cfg, tmp_path / "one", "model.gradient_checkpointing=true",
                    "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true")
    assert probe1["info"]["world_size"] == 1
    assert probe1["losses"] == pytest.approx(probe2["losses"], rel=2e-5)

    from dist_secvec.config import load_config
    from dist_secvec.finetune import run_finetune

    plain = dict(cfg, deepspeed={}, output_dir=str(tmp_path / "plain"),  # no checkpointing here
                 security_vector={**cfg["security_vector"], "weight_delta": False})
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    res = run_finetune(load_config(str(tmp_path / "plain.yaml")))
    assert res.info["zero_stage"] is None
    assert res.info["security_vector_paths"]["weight_delta"] == 0 and probe1["info"]["security_vector_paths"]["weight_delta"] > 0
    assert res.losses == pytest.approx(probe2["losses"], rel=2e-5)


@pytest.mark.slow
def test_zero3_qlora_nf4_two_ranks(tiny_world, random_vector, tmp_path):
    import torch

    cfg = base_cfg(tiny_world, random_vector, tmp_path,
                   model={"path": str(tiny_world.model_dir), "dtype": "bfloat16", "quantization": "nf4",
                          "quant_storage": "bfloat16", "compute_dtype": "bfloat16"},
                   adapter={"type": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
                   data={"train": [tiny_world.data["new_task_ft"]], "max_length": 64},
                   optim={"lr": 1e-2, "schedule": "constant", "warmup_steps": 0, "max_steps": 10,
                          "micro_batch_size": 4})
    probe = launch(2, cfg, tmp_path)
    info = probe["info"]
    assert_partitioned(info, ("security_vector", "trainable", "frozen"))  # frozen = the 4-bit base
    losses = probe["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())  # gathered, not empty partitions
    assert not any("secvec" in k for k in adapter)
    # reload on one process: the same NF4 base (bitsandbytes) + the adapter
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import PeftModel

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                           bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir), dtype=torch.bfloat16,
                                                quantization_config=q, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(final))
    model.train()  # as in ds_probe.py: bitsandbytes' CPU eval path repacks 4-bit weights (fails below 64 columns)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
    with torch.no_grad():
        mine = model(input_ids=ids).logits.float()
    torch.testing.assert_close(mine, gathered_logits(tmp_path), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_zero3_stop_at_step_k_then_resume_repeats_the_losses(full_ft, tiny_world, random_vector, tmp_path):
    _, uninterrupted = full_ft
    cfg = base_cfg(tiny_world, random_vector, tmp_path, checkpoint={"every_steps": 2, "keep": 2},
                   security_vector=GATED)  # resume skips whole steps of the grouped rows
    first = launch(2, cfg, tmp_path / "a", env={"PROBE_STOP_AT_STEP": "3"})
    assert "stopped at step 3" in first["stopped"]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]
    assert not (tmp_path / "run" / "final").exists()
    resumed = launch(2, dict(cfg, checkpoint={"every_steps": 2, "resume": "latest"}), tmp_path / "b")
    assert len(resumed["losses"]) == STEPS
    assert resumed["losses"][3:] == pytest.approx(uninterrupted["losses"][3:], rel=1e-6, abs=1e-7)
    assert resumed["losses"][:3] == pytest.approx(uninterrupted["losses"][:3], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_zero3_two_vectors_two_ranks_follow_the_plain_loop(tiny_world, random_vector, tmp_path):
    """Two vectors composed (one on q/v/down, one on q/o) under ZeRO-3 on two ranks, gated per
    vector: the run info lists both with their modules, the gate counts each vector's rows, and the
    losses are those of one plain process on the same global batches."""
    from conftest import write_random_vector
    from dist_secvec.config import load_config
    from dist_secvec.finetune import run_finetune

    second = write_random_vector(tiny_world.model_dir, tmp_path / "sv2", seed=1, targets=("q_proj", "o_proj"))
    paths = [str(random_vector), str(second)]
    cfg = base_cfg(tiny_world, random_vector, tmp_path, security_vector={"path": paths, **GATED})
    probe = launch(2, cfg, tmp_path / "two")
    info = probe["info"]
    assert [v["path"] for v in info["security_vectors"]] == paths
    assert [v["modules"][0].rsplit(".", 1)[-1] for v in info["security_vectors"]] == ["down_proj", "o_proj"]
    assert [p["path"] for p in info["security_vector_gate"]["per_vector"]] == paths
    plain = dict(cfg, deepspeed={}, output_dir=str(tmp_path / "plain"), optim={**cfg["optim"], "micro_batch_size": 4})
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    res = run_finetune(load_config(str(tmp_path / "plain.yaml")))
    assert res.info["security_vector_gate"] == info["security_vector_gate"]
    assert res.losses == pytest.approx(probe["losses"], rel=2e-5)


# ---------------------------------------------------------------------------------------------
# the DeepSpeed config a run gets (no processes)


def _cfg(*overrides):
    from dist_secvec.config import load_config

    return load_config(None, ["model.path=/m", *overrides])


def test_ds_config_fills_auto_from_the_run_config():
    from dist_secvec.distributed import ds_config

    repo_json = str(Path(__file__).parents[1] / "configs" / "ds_zero3.json")
    ds = ds_config(_cfg(f"deepspeed.config={repo_json}", "optim.micro_batch_size=3",
                        "optim.gradient_accumulation_steps=5", "optim.max_grad_norm=0.5", "model.dtype=bfloat16"), 4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and "optimizer" not in ds


def test_ds_config_stage_and_offload_switches():
    from dist_secvec.distributed import ds_config

    ds = ds_config(_cfg("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"), 2)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the run's torch AdamW steps on the offloaded copy
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # model.dtype float32


@pytest.mark.parametrize("inline, msg", [
    ({"optimizer": {"type": "AdamW"}}, "remove the \"optimizer\" block"),
    ({"train_micro_batch_size_per_gpu": 8}, "'train_micro_batch_size_per_gpu' is 8 but optim.micro_batch_size gives 4"),
    ({"bf16": {"enabled": True}}, "'bf16.enabled' is True but model.dtype is float32"),
])
def test_ds_config_conflicts_are_one_line_errors(inline, msg):
    from dist_secvec.distributed import ds_config
    from dist_secvec.errors import ConfigError

    cfg = _cfg()
    cfg.deepspeed.config = inline
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        ds_config(cfg, 1)


def test_ds_config_bad_json_file(tmp_path):
    from dist_secvec.distributed import ds_config
    from dist_secvec.errors import ConfigError

    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json' is not valid JSON"):
        ds_config(_cfg(f"deepspeed.config={bad}"), 1)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        ds_config(_cfg(f"deepspeed.config={bad}"), 1)


def test_rank_batches_two_ranks_split_the_one_rank_stream():
    import torch

    from dist_secvec.distributed import rank_batches

    ex = list(range(10))
    one = rank_batches(ex, 4, 0, 1, torch.Generator().manual_seed(1))
    r0 = rank_batches(ex, 2, 0, 2, torch.Generator().manual_seed(1))
    r1 = rank_batches(ex, 2, 1, 2, torch.Generator().manual_seed(1))
    for _ in range(7):  # across epoch boundaries: every micro-batch is full
        a, b, c = next(one), next(r0), next(r1)
        assert a == b + c and len(b) == len(c) == 2
    skipped = rank_batches(ex, 4, 0, 1, torch.Generator().manual_seed(1), skip=3)
    again = rank_batches(ex, 4, 0, 1, torch.Generator().manual_seed(1))
    for _ in range(3):
        next(again)
    assert [next(skipped) for _ in range(4)] == [next(again) for _ in range(4)]


@pytest.mark.parametrize("overrides, msg", [
    (["model.quantization=int8", "adapter.type=lora"], "8-bit bases train wrong under ZeRO-3"),
    (["optim.nonfinite=skip", "deepspeed.zero_stage=0", "model.dtype=bfloat16"],
     "skip cannot drop a step cleanly under ZeRO stage 0 with bfloat16 weights"),
])
def test_finetune_refuses_before_starting_processes(tiny_world, tmp_path, overrides, msg):
    """ZeRO-3 from a DeepSpeed JSON (not only deepspeed.zero_stage) + int8, or the skip policy under
    ZeRO-0 with 16-bit weights (DeepSpeed's wrapper optimizer has no clean skip): one-line errors
    before any process group or model exists."""
    import json as _json

    import torch.distributed as dist

    from dist_secvec.config import load_config
    from dist_secvec.errors import ConfigError
    from dist_secvec.finetune import run_finetune

    ds = tmp_path / "z3.json"
    ds.write_text(_json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['new_task_ft']}",
                             f"deepspeed.config={ds}", f"output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=msg):
        run_finetune(cfg)
    assert not (dist.is_available() and dist.is_initialized())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_zero3_lora_folds_the_vector_and_restores_the_base(tiny_world, random_vector, tmp_path):
    """A LoRA on a frozen fp32 base under ZeRO-3: the vector is folded into the partitioned base
    weights layer by layer, training follows the single-process fold run, and afterwards the base
    holds its original weights again: the gathered model's logits equal the base from disk plus
    the exported adapter (a base still holding the vector would differ)."""
    import torch

    cfg = base_cfg(tiny_world, random_vector, tmp_path, adapter={"type": "lora", "rank": 4, "alpha": 8},
                   optim={"lr": 1e-2, "micro_batch_size": 2})
    probe = launch(2, cfg, tmp_path)
    assert probe["info"]["security_vector_mode"] == "folded" and probe["info"]["zero_stage"] == 3
    torch.testing.assert_close(reload_logits(tmp_path / "run" / "final", tiny_world.model_dir, adapter=True),
                               gathered_logits(tmp_path), rtol=1e-5, atol=1e-5)

    from dist_secvec.config import load_config
    from dist_secvec.finetune import run_finetune

    plain = dict(cfg, deepspeed={}, output_dir=str(tmp_path / "plain"))
    plain["optim"] = dict(cfg["optim"], micro_batch_size=4)
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    res = run_finetune(load_config(str(tmp_path / "plain.yaml")))
    assert res.info["security_vector_mode"] == "folded"
    assert res.losses == pytest.approx(probe["losses"], rel=2e-5)


# ---------------------------------------------------------------------------------------------
# optim.nonfinite=skip on 2 ranks: a NaN loss on one rank drops that step on every rank


NAN_STEP = 3  # its first micro-batch (forward 2 * NAN_STEP - 1 with 2 micro-batches per step)


@pytest.fixture(scope="module")
def plain_nan_run(tiny_world, random_vector, tmp_path_factory):
    """The plain single-process loop (1 rank x micro-batch 4: the same global batches) with the
    NaN on the same step, skipped: PlainEngine drops the gradients, no update, no schedule step."""
    import dist_secvec.finetune as ft
    import dist_secvec.stage2 as stage2  # finetune's engine is built there
    from dist_secvec.config import load_config

    tmp = tmp_path_factory.mktemp("plain_nan")
    cfg = dict(base_cfg(tiny_world, random_vector, tmp, optim={"micro_batch_size": 4, "nonfinite": "skip"}),
               deepspeed={}, output_dir=str(tmp / "plain"))
    (tmp / "plain.yaml").write_text(yaml.safe_dump(cfg))

    class NaNEngine(stage2.PlainEngine):
        calls = 0

        def __call__(self, **batch):
            out = super().__call__(**batch)
            NaNEngine.calls += 1
            if NaNEngine.calls == 2 * NAN_STEP - 1:
                out["loss"] = out["loss"] * float("nan")
            return out

    mp = pytest.MonkeyPatch()
    mp.setattr(stage2, "PlainEngine", NaNEngine)
    try:
        res = ft.run_finetune(load_config(str(tmp / "plain.yaml")))
    finally:
        mp.undo()
    return res.losses


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_skip_policy_two_ranks_drops_the_nan_step(tiny_world, random_vector, tmp_path, stage, plain_nan_run):
    """Rank 1 alone sees a NaN loss at step NAN_STEP: both ranks skip that step (DeepSpeed's own
    overflow path: no update, no schedule step, the micro-step counters as after any step), the run
    finishes with exit 0, and every loss, before and after, equals the plain loop that skipped the
    same step; the weights stay finite."""
    import math

    import torch
    from safetensors.torch import load_file

    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    cfg = base_cfg(tiny_world, random_vector, tmp_path, optim={"nonfinite": "skip"},
                   deepspeed={"config": {"zero_optimization": zero}}, checkpoint={"every_steps": NAN_STEP})
    probe = launch(2, cfg, tmp_path, env={"PROBE_NAN_AT": f"{2 * NAN_STEP - 1}:1"})
    losses = probe["losses"]
    assert len(losses) == STEPS and math.isnan(losses[NAN_STEP - 1])
    assert all(math.isfinite(x) for i, x in enumerate(losses) if i != NAN_STEP - 1), losses
    assert losses == pytest.approx(plain_nan_run, rel=2e-5, nan_ok=True)
    log = (tmp_path / "launcher.log").read_text()
    assert f"step {NAN_STEP}: non-finite loss or gradient; step skipped (optim.nonfinite=skip)" in log
    assert torch.isfinite(gathered_logits(tmp_path)).all()
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [s for s in range(1, STEPS + 1) if s != NAN_STEP]
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{NAN_STEP:08d}" / "trainer_state.json").read_text())
    assert math.isnan(state["losses"][NAN_STEP - 1])  # the checkpoint of the skipped step is written too
