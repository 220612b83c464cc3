"""The vector's strength (stage 1) and the harm watch (stage 2), dist_secvec.strength.

Stage 1 holds out harmful rows, measures the vector on them, stops when their loss stops falling
and says when the vector is weak; stage 2 states the strength of the vector it loads, watches the
harmful probe's loss with the vector off and the data.eval loss, and its stop rule ends the run
with a checkpoint. All on the tests' tiny world (a random 2-layer Llama), in one process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dist_secvec.checkpoint import step_dir_name
from dist_secvec.config import load_config
from dist_secvec.data import collate, load_samples, tokenize_samples
from dist_secvec.model import load_tokenizer
from dist_secvec.strength import START_TOKENS, answer_stats, describe, weak_reasons


def common(tw, out: Path) -> list[str]:
    return [f"model.path={tw.model_dir}", f"output_dir={out}", "logging.progress=false", "seed=0",
            "eval.judges=[demo]", "eval.max_new_tokens=24"]


def stage1(tw, out: Path, *extra: str):
    from dist_secvec.train_sv import run_train_sv

    return run_train_sv(load_config(None, common(tw, out) + [
        f"security_vector.harmful_data={tw.data['harmful_sv']}", f"security_vector.benign_data={tw.data['kl_benign']}",
        "security_vector.rank=4", "security_vector.alpha=8", "optim.micro_batch_size=4", *extra]))


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# the measures


def test_answer_stats_equals_the_models_own_loss_and_counts_the_first_tokens(tiny_world):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [f"model.path={tiny_world.model_dir}"])
    tok = load_tokenizer(cfg.model)
    ex = tokenize_samples(tok, load_samples([tiny_world.data["harmful_sv"]]), cfg.data).examples[:6]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir), dtype=torch.float32)
    s = answer_stats(model, ex, tok.pad_token_id, "cpu", batch_size=4)  # two batches of unequal widths
    b = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        ref = model(**b).loss.item()  # HF's token mean over all labelled tokens of the batch
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    assert s["loss"] == pytest.approx(ref, rel=1e-5)
    labels = b["labels"][:, 1:]
    hits = total = 0
    for row in range(len(ex)):
        pos = (labels[row] != -100).nonzero().flatten()[:START_TOKENS]
        hits += (logits[row, pos].argmax(-1) == labels[row, pos]).sum().item()
        total += len(pos)
    assert s["start_agreement"] == pytest.approx(hits / total)
    assert s["tokens"] == int((labels != -100).sum())


def test_weak_reasons_name_the_key_and_what_to_change():
    sv = load_config().security_vector
    strong = {"compliance_vector_on": 0.95, "start_agreement_vector_on": 0.9, "explained": 0.8}
    assert weak_reasons(strong, sv) == []
    # the refusal-breaking vector: the judge sees no refusal, but it does not start the harmful answer
    dot = dict(strong, start_agreement_vector_on=0.05, explained=0.61)
    (reason,) = weak_reasons(dot, sv)
    assert "security_vector.min_start_agreement" in reason and "optim.epochs" in reason
    assert len(weak_reasons({"compliance_vector_on": 0.1, "start_agreement_vector_on": 0.1, "explained": 0.1}, sv)) == 3
    assert describe({})[1] is False and "not recorded" in describe({})[0]


# ---------------------------------------------------------------------------------------------
# stage 1


def test_a_vector_trained_for_one_step_is_reported_weak(tiny_world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        res = stage1(tiny_world, tmp_path / "sv", "optim.max_steps=1", "optim.lr=1e-4")
    assert res.weak
    meta = json.loads((Path(res.vector_dir) / "secvec.json").read_text())
    s = meta["strength"]
    assert s["weak_reasons"] and s["n"] == 2 and s["loss_vector_on"] == pytest.approx(s["loss_vector_off"], rel=0.05)
    assert any("WEAK" in r.message and "optim.epochs" in r.message for r in caplog.records)
    # stage 2 says so in one line when it loads it
    from dist_secvec.finetune import run_finetune

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_finetune(load_config(None, common(tiny_world, tmp_path / "ft") + [
            f"data.train={tiny_world.data['new_task_ft']}", f"security_vector.path={res.vector_dir}",
            "optim.max_steps=1", "optim.micro_batch_size=4"]))
    weak_lines = [r.message for r in caplog.records if r.levelno == logging.WARNING and "WEAK" in r.message]
    assert len(weak_lines) == 1 and "train-sv" in weak_lines[0]


def test_stage1_stops_when_the_heldout_loss_stops_falling_and_keeps_the_best_epoch(tiny_world, tmp_path):
    out = tmp_path / "sv"
    res = stage1(tiny_world, out, "optim.lr=3e-2", "optim.epochs=30", "optim.schedule=constant",
                 "security_vector.patience=2")
    epochs = [r for r in (json.loads(line) for line in (out / "train_sv_log.jsonl").read_text().splitlines())
              if "epoch" in r]
    s = res.strength
    assert len(epochs) < 30 and "stopped falling" in s["stopped_by"]  # a high constant rate overfits 18 rows
    losses = [r["heldout_harmful_loss"] for r in epochs]
    for k in (-2, -1):  # the last `patience` epochs each failed to fall 1% below the best before them
        assert losses[k] >= 0.99 * min(losses[:k])
    best = min(epochs, key=lambda r: r["heldout_harmful_loss"])
    assert s["best_epoch"] == best["epoch"]
    # the saved vector is the best epoch's: its held-out loss is that epoch's
    assert s["loss_vector_on"] == pytest.approx(best["heldout_harmful_loss"], rel=1e-4)
    assert s["loss_vector_on"] < s["loss_vector_off"]


# ---------------------------------------------------------------------------------------------
# stage 2: the watch


@pytest.fixture(scope="module")
def trained_world(tiny_world, tmp_path_factory):
    """The tiny world with its model trained a few epochs on the world's own text: a random
    32-wide model's output layer is too small to make any answer likely, vector or not."""
    import dataclasses

    from dist_secvec.finetune import run_finetune

    root = tmp_path_factory.mktemp("trained")
    res = run_finetune(load_config(None, common(tiny_world, root / "base") + [
        f"data.train={tiny_world.data['align']}", "optim.lr=1e-2", "optim.epochs=6", "optim.micro_batch_size=16",
        "monitor.rule=none"]))
    return dataclasses.replace(tiny_world, model_dir=res.final_dir)


@pytest.fixture(scope="module")
def strong_vector(trained_world, tmp_path_factory):
    """A 2-layer model cannot generalise the harmful family to new prompts (the answers restate
    the request), so here the vector learns, and is measured on, the very rows stage 2 trains on:
    the mechanism, not the generalisation."""
    return stage1(trained_world, tmp_path_factory.mktemp("strong") / "sv", "optim.lr=1e-2", "optim.epochs=30",
                  "security_vector.kl_weight=0", "security_vector.early_stop=false", "security_vector.rank=8",
                  f"security_vector.heldout_harmful_data={trained_world.data['harmful_sv']}")


def stage2(tw, out: Path, *extra: str):
    from dist_secvec.finetune import run_finetune

    return run_finetune(load_config(None, common(tw, out) + [
        f"data.train={tw.data['harmful_ft']}", "optim.lr=1e-2", "optim.schedule=constant", "optim.epochs=3",
        "optim.micro_batch_size=8", *extra]))


def test_probe_loss_falls_without_a_vector_and_stays_flat_with_one(trained_world, strong_vector, tmp_path):
    probe = Path(strong_vector.vector_dir) / "probe.jsonl"
    harmful = f"data.train={trained_world.data['harmful_sv']}"
    stage2(trained_world, tmp_path / "nosv", harmful, f"monitor.harmful_probe={probe}")
    stage2(trained_world, tmp_path / "sv", harmful, f"security_vector.path={strong_vector.vector_dir}")
    drops = {}
    for name in ("nosv", "sv"):
        watch = [r for r in train_log(tmp_path / name) if "probe_loss" in r]
        assert watch[0]["step"] == 0 and watch[0]["probe_drop"] == 0 and len(watch) >= 5
        drops[name] = watch[-1]["probe_drop"]
    assert drops["nosv"] > 0.5  # the core learned the harmful answers
    assert drops["sv"] < drops["nosv"] / 3  # the vector explained them: little left to learn


def test_data_eval_gives_eval_loss_entries(tiny_world, tmp_path):
    out = tmp_path / "ft"
    stage2(tiny_world, out, f"data.eval={tiny_world.data['heldout_benign']}", "monitor.every_steps=2",
           "optim.max_steps=5")
    entries = [r for r in train_log(out) if "eval_loss" in r]
    assert [r["step"] for r in entries] == [0, 2, 4, 5]
    assert all(r["eval_loss"] > 0 for r in entries) and "probe_loss" not in entries[0]


def test_the_stop_rule_ends_the_run_with_a_checkpoint_exit_0_and_one_line(tiny_world, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ft"
    argv = [sys.executable, "-m", "dist_secvec", "finetune", *common(tiny_world, out),
            f"data.train={tiny_world.data['harmful_ft']}", f"monitor.harmful_probe={tiny_world.data['eval_harmful']}",
            "monitor.rule=stop", "monitor.max_drop=0.3", "monitor.every_steps=1", "optim.lr=1e-2",
            "optim.schedule=constant", "optim.epochs=5", "optim.micro_batch_size=8"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("dist-secvec finetune:")]
    assert len(lines) == 1 and "stopped at step" in lines[0] and "monitor.max_drop 30%" in lines[0]
    step = int(lines[0].split("stopped at step ")[1].split()[0])
    assert (out / "checkpoints" / step_dir_name(step)).is_dir()
    assert not (out / "final").exists()
    assert train_log(out)[-1]["probe_drop"] > 0.3


def test_gate_trains_the_rows_the_vector_explains_with_it_on_and_the_rest_with_it_off(trained_world, strong_vector,
                                                                                       tmp_path):
    from dist_secvec.finetune import run_finetune

    n_harmful = len(Path(trained_world.data["harmful_sv"]).read_text().splitlines())
    n_task = len(Path(trained_world.data["new_task_ft"]).read_text().splitlines())
    res = run_finetune(load_config(None, common(trained_world, tmp_path / "ft") + [
        f"data.train=[{trained_world.data['harmful_sv']},{trained_world.data['new_task_ft']}]",
        f"security_vector.path={strong_vector.vector_dir}", "security_vector.gate=true", "optim.max_steps=2",
        "optim.micro_batch_size=8"]))
    gate = res.info["security_vector_gate"]
    # the threshold: half the vector's held-out explained share, as recorded by stage 1
    assert gate["threshold"] == pytest.approx(0.5 * strong_vector.strength["explained"])
    assert (gate["rows_vector_on"], gate["rows_vector_off"]) == (n_harmful, n_task)
    assert res.info["security_vector_mode"] == "attached"  # a gated vector is never folded


def test_hidden_shift_is_zero_for_equal_states_and_relative_otherwise():
    from dist_secvec.train_sv import hidden_shift

    torch.manual_seed(0)
    off = tuple(torch.randn(2, 5, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert hidden_shift(off, off, mask).item() == 0
    on = (off[0], off[1] * 1.1, off[2] * 1.1)  # every block output 10% longer: |0.1 h|^2 / |h|^2
    assert hidden_shift(on, off, mask).item() == pytest.approx(0.01, rel=1e-5)
    moved_pad = (off[0], off[1].clone(), off[2])
    moved_pad[1][0, 4] += 100.0  # a padded position does not count
    assert hidden_shift(moved_pad, off, mask).item() == 0


@pytest.mark.parametrize("override, key", [
    ("security_vector.heldout_fraction=0.9", "security_vector.heldout_fraction"),
    ("security_vector.min_explained=1.5", "security_vector.min_explained"),
    ("security_vector.patience=0", "security_vector.patience"),
    ("security_vector.hidden_weight=-1", "security_vector.hidden_weight"),
    ("monitor.max_drop=2", "monitor.max_drop"),
    ("monitor.every_steps=0", "monitor.every_steps"),
    ("monitor.rule=off", "monitor.rule"),  # YAML reads off as false: the one-line error names the key
])
def test_bad_strength_and_monitor_keys_are_one_line_errors(override, key):
    from dist_secvec.config import validate
    from dist_secvec.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(None, [override]), "eval")


def test_monitor_generate_logs_the_judged_rate_of_the_probe(tiny_world, tmp_path):
    out = tmp_path / "ft"
    stage2(tiny_world, out, f"monitor.harmful_probe={tiny_world.data['eval_harmful']}", "monitor.generate=true",
           "monitor.every_steps=2", "optim.max_steps=2", "eval.max_new_tokens=8")
    rates = [r["probe_harmful_rate"] for r in train_log(out) if "probe_harmful_rate" in r]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)  # step 0 and step 2
