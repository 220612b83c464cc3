"""Stage 1 under DeepSpeed ZeRO-3: `dist-secvec train-sv` on 2 CPU ranks (gloo) through the real
deepspeed launcher, against the plain one-process run on the same global batches.

2 ranks x micro-batch 2 read the same seeded stream as 1 process x micro-batch 4 (16 training
rows: every micro-batch full), and every loss term is a token mean over the global batch, so the
two runs must follow the same losses, keep the same best epoch and save the same vector, although
under ZeRO-3 each rank holds half of every base weight and half of the vector. The vector the
ZeRO-3 run saves (gathered from both ranks on rank 0) loads in stage 2: its files, hashes and
base fingerprint pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import launch_cli, plain_base

EPOCHS = 3


@pytest.fixture(scope="module")
def rows(tiny_world, tmp_path_factory) -> dict:
    """16 training rows of the behaviour, 4 held out, 20 benign rows: multiples of the global batch (4)."""
    d = tmp_path_factory.mktemp("sv_rows")
    harmful = Path(tiny_world.data["harmful_sv"]).read_text().splitlines()
    assert len(harmful) >= 20
    files = {"train": harmful[:16], "heldout": harmful[16:20],
             "benign": Path(tiny_world.data["kl_benign"]).read_text().splitlines()[:20]}
    assert len(files["benign"]) == 20
    for name, lines in files.items():
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (d / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                                    "stage3_param_persistence_threshold": 0}}))
    return {**{name: str(d / f"{name}.jsonl") for name in files}, "zero3": str(d / "zero3.json")}


def sv_args(tw, rows: dict, out: Path, *extra: str) -> list[str]:
    return [f"model.path={tw.model_dir}", f"security_vector.harmful_data={rows['train']}",
            f"security_vector.heldout_harmful_data={rows['heldout']}", f"security_vector.benign_data={rows['benign']}",
            "security_vector.rank=4", "security_vector.alpha=8", "security_vector.hidden_weight=0.1",
            "security_vector.patience=1", f"optim.epochs={EPOCHS}", "optim.lr=0.03", "optim.warmup_steps=0",
            "optim.schedule=constant", "eval.judges=[demo]", "eval.max_new_tokens=4", "logging.progress=false",
            "logging.log_every=1", "seed=0", f"output_dir={out}", *extra]


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "train_sv_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind in r]


@pytest.fixture(scope="module")
def runs(tiny_world, rows, tmp_path_factory) -> tuple[Path, Path]:
    from dist_secvec.config import load_config
    from dist_secvec.train_sv import run_train_sv

    tmp = tmp_path_factory.mktemp("sv_zero3")
    zero3, plain = tmp / "zero3", tmp / "plain"
    launch_cli(["--gpus", "2", "--", "train-sv",
                *sv_args(tiny_world, rows, zero3, "optim.micro_batch_size=2", f"deepspeed.config={rows['zero3']}")])
    run_train_sv(load_config(None, sv_args(tiny_world, rows, plain, "optim.micro_batch_size=4")))
    return zero3, plain


@pytest.mark.slow
def test_zero3_two_ranks_partition_and_follow_the_plain_run(runs):
    zero3, plain = runs
    meta = json.loads((zero3 / "secvec" / "secvec.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3
    for part in meta["partition"]:  # each rank held half of every base weight and of the vector
        for group in ("base", "security_vector"):
            assert part[group]["total"] > 0 and 0.5 <= part[group]["max_share"] <= 0.55, (group, part)
    plain_meta = json.loads((plain / "secvec" / "secvec.json").read_text())
    assert "zero_stage" not in plain_meta
    train = [r["loss"] for r in records(zero3, "loss")]
    assert train == pytest.approx([r["loss"] for r in records(plain, "loss")], rel=1e-4)
    held = [r["heldout_harmful_loss"] for r in records(zero3, "epoch")]
    assert held == pytest.approx([r["heldout_harmful_loss"] for r in records(plain, "epoch")], rel=1e-4)
    s, p = meta["strength"], plain_meta["strength"]
    # a rate this high overshoots after epoch 1: both runs stop early and go back to the best epoch,
    # the vector gathered, kept and put back under ZeRO-3
    assert "early_stop" in s["stopped_by"] and s["best_epoch"] < s["epochs_run"] < EPOCHS, s
    assert (s["best_epoch"], s["epochs_run"], s["stopped_by"]) == (p["best_epoch"], p["epochs_run"], p["stopped_by"])
    assert held[s["best_epoch"] - 1] == min(held) and s["loss_vector_on"] == pytest.approx(min(held), rel=1e-6)
    assert s["loss_vector_on"] == pytest.approx(p["loss_vector_on"], rel=1e-4)
    assert s["loss_vector_on"] < s["loss_vector_off"] - 0.02  # the vector learned the held-out rows
    # only rank 0 wrote: one train record per step, one held-out record per epoch
    assert [r["step"] for r in records(zero3, "loss")] == list(range(1, meta["steps"] + 1))


@pytest.mark.slow
def test_zero3_vector_equals_the_plain_vector_and_loads_in_stage2(runs, tiny_world):
    import torch
    from safetensors.torch import load_file

    from dist_secvec.secvec import check_fingerprint, load_security_vector

    zero3, plain = runs
    mine, ref = (load_file(str(d / "secvec" / "adapter_model.safetensors")) for d in (zero3, plain))
    assert sorted(mine) == sorted(ref) and mine
    for k in ref:
        assert mine[k].shape == ref[k].shape and mine[k].numel() > 0, k  # gathered, not one rank's partition
        # Adam turns rounding noise in near-zero gradients into updates of up to ~lr/10 in a few
        # elements; a wrong slice, step or restored epoch moves the vector by ~lr per step everywhere
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-2, atol=2e-3)
    diff = sum(float((mine[k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
    assert diff < 1e-3 * sum(float(v.pow(2).sum()) for v in ref.values()) ** 0.5
    assert max(float(v.abs().max()) for k, v in mine.items() if "lora_B" in k) > 1e-3  # trained (B starts at 0)
    sv = load_security_vector(str(zero3 / "secvec"))  # file hashes checked
    check_fingerprint(sv, plain_base(tiny_world.model_dir), str(tiny_world.model_dir))
    assert (zero3 / "secvec" / "probe.jsonl").read_text() == (plain / "secvec" / "probe.jsonl").read_text()


def test_train_sv_refuses_deepspeed_options_without_deepspeed(tiny_world, rows, tmp_path):
    """deepspeed.offload_optimizer alone would change nothing in stage 1 (no DeepSpeed without
    deepspeed.zero_stage or deepspeed.config): one line, before anything loads."""
    from dist_secvec.config import load_config, refuse_ignored_keys
    from dist_secvec.errors import ConfigError

    cfg = load_config(None, sv_args(tiny_world, rows, tmp_path / "out", "deepspeed.offload_optimizer=true"))
    with pytest.raises(ConfigError, match="'deepspeed.offload_optimizer': train-sv runs without DeepSpeed unless"):
        refuse_ignored_keys(cfg, "train-sv")
    refuse_ignored_keys(load_config(None, sv_args(tiny_world, rows, tmp_path / "out", "deepspeed.zero_stage=3",
                                                  "deepspeed.offload_optimizer=true")), "train-sv")


@pytest.mark.parametrize("overrides, msg", [
    (["model.quantization=int8"], "8-bit bases train wrong under ZeRO-3"),
    (["model.quantization=nf4", "model.dtype=bfloat16", "model.quant_storage=bfloat16"],
     "bitsandbytes repacks 4-bit weights on a CPU"),
])
def test_train_sv_refuses_under_zero3_from_a_json(tiny_world, rows, tmp_path, overrides, msg):
    """ZeRO-3 named by the DeepSpeed JSON (config validation sees no zero_stage) with an 8-bit base
    (stage 2's refusal), or with a 4-bit base on a CPU: one line, before any process group or model."""
    import torch
    import torch.distributed as dist

    from dist_secvec.config import load_config
    from dist_secvec.errors import ConfigError
    from dist_secvec.train_sv import run_train_sv

    if "nf4" in overrides[0] and torch.cuda.is_available():
        pytest.skip("a GPU runs the 4-bit base for inference without repacking it")
    cfg = load_config(None, sv_args(tiny_world, rows, tmp_path / "out", f"deepspeed.config={rows['zero3']}",
                                    *overrides))
    with pytest.raises(ConfigError, match=msg):
        run_train_sv(cfg, use_deepspeed=True)
    assert not (dist.is_available() and dist.is_initialized())
    assert not (tmp_path / "out").exists()
