"""Run features users know from other trainers, on the tiny Llama: the attention kernel
(model.attn_implementation) and experiment tracking (logging.report_to, TensorBoard), with the
train log's tokens/s. (The recipes command is in test_recipes.py.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_secvec.config import load_config, refuse_ignored_keys, validate
from dist_secvec.errors import ConfigError
from dist_secvec.finetune import run_finetune

REPO = Path(__file__).resolve().parents[1]
FLASH_RUNS_HERE = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def make_cfg(tiny_world, data: str, out: Path, *overrides: str):
    return load_config(None, [
        f"model.path={tiny_world.model_dir}", f"data.train={data}", f"output_dir={out}",
        "optim.lr=1e-2", "optim.schedule=constant", "optim.micro_batch_size=8", "optim.max_steps=4",
        "logging.progress=false", "logging.log_every=1", "seed=0", *overrides])


def read_log(out: Path, name: str = "train_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------
# model.attn_implementation


def test_eager_and_sdpa_train_alike_and_are_recorded(tiny_world, small_data, tmp_path):
    runs = {}
    for impl in ("eager", "sdpa", "auto"):
        runs[impl] = run_finetune(make_cfg(tiny_world, small_data, tmp_path / impl,
                                           f"model.attn_implementation={impl}"))
    assert runs["eager"].info["attn_implementation"] == "eager"
    assert runs["sdpa"].info["attn_implementation"] == "sdpa"
    assert runs["auto"].info["attn_implementation"] in ("sdpa", "eager")  # transformers' choice, recorded
    info = json.loads((runs["eager"].final_dir / "dist_secvec_run.json").read_text())
    assert info["attn_implementation"] == "eager"
    # the same computation by two kernels: the same losses over several steps of training
    assert runs["sdpa"].losses == pytest.approx(runs["eager"].losses, rel=1e-4, abs=1e-5)


def test_eager_and_sdpa_models_give_the_same_logits(tiny_world):
    from dist_secvec.config import ModelConfig
    from dist_secvec.model import attn_implementation, load_model

    x = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding: the kernels must mask alike
    logits = {}
    for impl in ("eager", "sdpa"):
        model = load_model(ModelConfig(path=str(tiny_world.model_dir), attn_implementation=impl))
        assert attn_implementation(model) == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=x, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(FLASH_RUNS_HERE, reason="flash_attn and a CUDA GPU are present: flash_attention_2 is allowed")
def test_flash_attention_2_refused_in_one_line_before_the_model_loads(tiny_world, small_data, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "dist_secvec", "finetune", f"model.path={tiny_world.model_dir}",
                          f"data.train={small_data}", f"output_dir={out}", "model.dtype=bfloat16",
                          "model.attn_implementation=flash_attention_2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "config key 'model.attn_implementation': flash_attention_2 needs" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_flash_attention_2_needs_cuda_and_16_bits(tiny_world, monkeypatch):
    """With flash_attn importable the GPU and the dtype decide (importability faked here)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", "model.attn_implementation=flash_attention_2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU"):
        validate(cfg, "eval")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="model.dtype=float32"):
        validate(cfg, "eval")


def test_attn_implementation_choices():
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_config(None, ["model.attn_implementation=flash"])


# ---------------------------------------------------------------------------------------------
# logging.report_to


def test_finetune_reports_to_tensorboard_what_train_log_holds(tiny_world, small_data, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_world, small_data, out, "optim.max_steps=5", "logging.log_every=2",
                   f"data.eval={small_data}", "monitor.every_steps=2", "logging.report_to=[tensorboard]")
    res = run_finetune(cfg)
    log = read_log(out)
    train = [r for r in log if "loss" in r]
    watch = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 5]
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in watch] == [0, 2, 4, 5]
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    sc = event_scalars(out / "tensorboard")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = sc[f"train/{key}"]
        assert [s for s, _ in got] == [r["step"] for r in train], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in train], rel=1e-6), key
    assert [v for _, v in sc["train/loss"]] == pytest.approx([res.losses[i - 1] for i in (2, 4, 5)], rel=1e-6)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in sc["watch/eval_loss"]] == \
        [(r["step"], r["eval_loss"]) for r in watch]


def test_no_tracker_by_default(tiny_world, small_data, tmp_path):
    out = tmp_path / "run"
    run_finetune(make_cfg(tiny_world, small_data, out, "optim.max_steps=2"))
    assert not (out / "tensorboard").exists()
    assert all(r["tokens_per_s"] > 0 for r in read_log(out))


def test_train_sv_reports_to_tensorboard(tiny_world, tmp_path):
    from dist_secvec.train_sv import run_train_sv

    out = tmp_path / "sv"
    run_train_sv(load_config(None, [
        f"model.path={tiny_world.model_dir}", f"output_dir={out}", "logging.progress=false", "seed=0",
        f"security_vector.harmful_data={tiny_world.data['harmful_sv']}", "security_vector.kl_weight=0",
        "security_vector.rank=4", "optim.micro_batch_size=8", "optim.max_steps=3", "logging.log_every=1",
        "eval.judges=[demo]", "eval.max_new_tokens=8", "logging.report_to=[tensorboard]",
        "model.attn_implementation=eager"]))
    meta = json.loads((out / "secvec" / "secvec.json").read_text())
    assert meta["attn_implementation"] == "eager" and meta["dtype"] == "float32"  # how the vector was trained
    log = read_log(out, "train_sv_log.jsonl")
    steps = [r for r in log if "harmful_ce" in r]
    held = [r for r in log if "heldout_harmful_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["tokens_per_s"] > 0 for r in steps)
    sc = event_scalars(out / "tensorboard")
    assert sc["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert sc["train/harmful_ce"] == [(r["step"], pytest.approx(r["harmful_ce"], rel=1e-6)) for r in steps]
    assert [s for s, _ in sc["heldout/heldout_harmful_loss"]] == [r["step"] for r in held]


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tiny_world, small_data, tmp_path):
    """A run stopped after logging step 4 but checkpointed at step 2 trains 3-4 again: each step once."""
    out = tmp_path / "run"
    extra = ("optim.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep=5", "logging.report_to=[tensorboard]")
    first = run_finetune(make_cfg(tiny_world, small_data, out, *extra))
    import shutil

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    again = run_finetune(make_cfg(tiny_world, small_data, out, *extra, "checkpoint.resume=latest"))
    assert again.losses == pytest.approx(first.losses)
    sc = event_scalars(out / "tensorboard")
    assert [s for s, _ in sc["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in sc["train/loss"]] == pytest.approx(first.losses, rel=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["logging.report_to=[comet]"], "'comet' is not one of tensorboard, wandb, none"),
    (["logging.report_to=[none, tensorboard]"], "'none' cannot go with a tracker"),
    (["logging.report_to=[tensorboard]", "logging.project=p"], "config key 'logging.project': names a wandb project"),
])
def test_report_to_bad_values(tiny_world, small_data, tmp_path, overrides, match):
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", *overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, "finetune")


def test_report_to_wandb_without_the_package_is_refused(tiny_world, small_data, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "logging.report_to=[wandb]")
    with pytest.raises(ConfigError, match="config key 'logging.report_to': wandb needs the wandb package"):
        validate(cfg, "finetune")


def wandb_history(run_file: Path) -> list[dict]:
    """The history records of an offline W&B run file (a LevelDB-style log of W&B's protobuf
    records, 32 KiB blocks; the wandb package no longer ships a Python reader for it)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            buf = b""
    return out


def test_finetune_reports_to_wandb_offline_what_train_log_holds(tiny_world, small_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_finetune(make_cfg(tiny_world, small_data, out, "optim.max_steps=3", "logging.report_to=[wandb]"))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    hist = wandb_history(run_file)
    train = [r for r in read_log(out) if "loss" in r]
    assert [h["_step"] for h in hist] == [r["step"] for r in train] == [1, 2, 3]
    for h, r in zip(hist, train):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert h[f"train/{key}"] == pytest.approx(r[key], rel=1e-6), key


def test_report_to_none_is_no_tracker_and_eval_refuses_one(tiny_world, small_data, tmp_path):
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "logging.report_to=[none]")
    validate(cfg, "finetune")
    refuse_ignored_keys(cfg, "eval")
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "logging.report_to=tensorboard")  # one name: a list
    assert cfg.logging.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="eval logs no training steps"):
        refuse_ignored_keys(cfg, "eval")
