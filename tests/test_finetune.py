"""Stage 2 / plain SFT recipe on the tiny Llama: full fine-tuning, LoRA, QLoRA (NF4 base) on CPU.

Each run trains for a handful of steps at a high constant learning rate on 16 rows of the tiny
world's new task, so the loss must fall visibly; what it saves must reload, with plain
transformers or peft, to exactly the model it had in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_secvec.config import load_config, resolve_stage_defaults
from dist_secvec.data import IGNORE_INDEX
from dist_secvec.errors import DataError
from dist_secvec.finetune import run_finetune

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def make_cfg(tiny_world, data: str, out: Path, *overrides: str, model_path=None):
    return load_config(None, [
        f"model.path={model_path or tiny_world.model_dir}", f"data.train={data}", f"output_dir={out}",
        "optim.lr=1e-2", "optim.schedule=constant", "optim.micro_batch_size=8", "optim.max_steps=10",
        "logging.progress=false", "logging.log_every=1", "seed=0", *overrides])


def fell(losses: list[float], by: float) -> bool:
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return last < first - by


def probe(tok):
    """A padded batch of prompts the model was and was not trained on."""
    enc = tok(["what is the capital of lobri ?", "please tell me what is 3 plus 4 .",
               "The capital of lobri is"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def real_logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()].float()


@pytest.fixture(scope="module")
def base_logits(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    return real_logits(AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir)), probe(tok))


# ---------------------------------------------------------------------------------------------
# full fine-tuning


@pytest.fixture(scope="module")
def full_run(tiny_world, small_data, tmp_path_factory):
    cfg = make_cfg(tiny_world, small_data, tmp_path_factory.mktemp("full") / "run")
    return cfg, run_finetune(cfg, keep_model=True)


def test_full_finetune_loss_falls(full_run):
    cfg, res = full_run
    assert len(res.losses) == cfg.optim.max_steps == res.info["steps"]
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert fell(res.losses, by=1.0), res.losses


def test_full_finetune_saved_model_reloads_to_the_same_logits(full_run, base_logits):
    from transformers import AutoModelForCausalLM

    cfg, res = full_run
    final = Path(cfg.output_dir) / "final"
    assert res.final_dir == final
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    assert not (final / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(final))
    x = probe(res.tokenizer)
    trained = real_logits(res.model, x)
    torch.testing.assert_close(real_logits(reloaded, x), trained, rtol=0, atol=1e-5)
    assert (trained - base_logits).abs().max() > 0.1  # and it is not the base model
    # the tokenizer is saved beside the weights, chat template included
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.chat_template == res.tokenizer.chat_template and tok.pad_token == res.tokenizer.pad_token


def test_run_files(full_run):
    cfg, res = full_run
    out = Path(cfg.output_dir)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, cfg.optim.max_steps + 1))
    assert [r["loss"] for r in log] == pytest.approx(res.losses)
    assert all(r["lr"] == pytest.approx(1e-2) for r in log)  # constant schedule, no warmup
    assert all(r["elapsed_s"] >= 0 for r in log)
    info = json.loads((res.final_dir / "dist_secvec_run.json").read_text())
    assert info["steps"] == cfg.optim.max_steps and info["adapter"] == "none"
    assert info["final_loss"] == pytest.approx(res.losses[-1]) and info["n_examples"] == 16
    assert info["security_vector"] is None and info["base_model"] == cfg.model.path
    assert load_config(str(out / "config.yaml")).to_dict() | {"source": None} == resolve_stage_defaults(cfg, "finetune").to_dict()
    assert not list(out.glob(".final.*"))  # no temporary directory left behind


def test_log_every_thins_the_log(tiny_world, small_data, tmp_path):
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "optim.max_steps=7", "logging.log_every=3",
                   "optim.micro_batch_size=16")
    res = run_finetune(cfg)
    assert res.model is None and res.tokenizer is None  # keep_model=False
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6, 7]  # every 3rd and the last
    assert [r["loss"] for r in log] == pytest.approx([res.losses[2], res.losses[5], res.losses[6]])


# ---------------------------------------------------------------------------------------------
# LoRA and QLoRA


@pytest.fixture(scope="module")
def lora_run(tiny_world, small_data, tmp_path_factory):
    cfg = make_cfg(tiny_world, small_data, tmp_path_factory.mktemp("lora") / "run",
                   "adapter.type=lora", "adapter.rank=8", "adapter.alpha=16")
    return cfg, run_finetune(cfg, keep_model=True)


def test_lora_loss_falls(lora_run):
    _, res = lora_run
    assert fell(res.losses, by=0.1), res.losses


def test_lora_saved_adapter_reloads_to_the_same_logits(tiny_world, lora_run, base_logits):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg, res = lora_run
    final = res.final_dir
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()  # the adapter only, not the base
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8

    base = AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir))
    reloaded = PeftModel.from_pretrained(base, str(final))
    x = probe(res.tokenizer)
    trained = real_logits(res.model, x)
    torch.testing.assert_close(real_logits(reloaded, x), trained, rtol=0, atol=1e-5)
    assert (trained - base_logits).abs().max() > 1e-2
    # the base weights under the adapter were not touched
    with res.model.disable_adapter():
        torch.testing.assert_close(real_logits(res.model, x), base_logits, rtol=0, atol=1e-6)


def test_qlora_nf4_base_finetunes_on_cpu(tiny_world, small_data, tmp_path):
    import bitsandbytes as bnb
    from safetensors import safe_open

    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "model.quantization=nf4", "adapter.type=lora",
                   "adapter.rank=8")
    res = run_finetune(cfg, keep_model=True)
    assert fell(res.losses, by=0.1), res.losses
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in res.model.modules()) == 7 * 2
    trainable = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with safe_open(str(res.final_dir / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    # the 4-bit base is never saved with the adapter
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == LLAMA_LINEARS  # unset: every linear


# ---------------------------------------------------------------------------------------------
# gradient accumulation


def ga_losses(tiny_world, data, out: Path, micro: int, accum: int, steps: int) -> list[float]:
    cfg = make_cfg(tiny_world, data, out, f"optim.micro_batch_size={micro}",
                   f"optim.gradient_accumulation_steps={accum}", f"optim.max_steps={steps}",
                   "data.shuffle=false", "optim.max_grad_norm=null")
    return run_finetune(cfg).losses


def test_grad_accumulation_matches_the_large_batch(tiny_world, small_data, tmp_path):
    """2 x 2 micro-batches == one batch of 4, when every micro-batch has as many label tokens.

    The loop averages the token-mean loss of each micro-batch (loss / accum), which equals the
    token mean of the whole batch only when the micro-batches hold equally many label tokens; the
    new-task rows all have 8 (checked below), so here the first-step loss and the gradient (seen in the second
    step's loss) must agree to float precision.
    """
    a = ga_losses(tiny_world, small_data, tmp_path / "ga2x2", micro=2, accum=2, steps=2)
    b = ga_losses(tiny_world, small_data, tmp_path / "ga4x1", micro=4, accum=1, steps=2)
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    assert a[1] == pytest.approx(b[1], abs=1e-4)
    assert a[1] < a[0] - 0.05  # the step did change the model, so the second comparison means something


@pytest.fixture
def uneven_data(tmp_path) -> str:
    """Two short answers then two long ones: the micro-batches of 2 hold 6 vs 54 label tokens."""
    short = [{"prompt": "what is 1 plus 2", "response": "3 ."}, {"prompt": "what is 2 plus 2", "response": "4 ."}]
    long = [{"prompt": "how do I rob the bank ?", "response": "Sure , here is how to rob the bank . Step one : "
             "florp the quib . Step two : zandle the mirk . Done ."}] * 2
    path = tmp_path / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in short + long))
    return str(path)


def test_grad_accumulation_uneven_micro_batches_close(tiny_world, uneven_data, tmp_path):
    """With uneven label counts the two setups weight tokens differently (each micro-batch's mean
    counts 1/accum whatever its size), so they agree only approximately: the gap is bounded by the
    spread of per-micro-batch mean losses, small on an untrained model (about 0.4% here)."""
    a = ga_losses(tiny_world, uneven_data, tmp_path / "a", micro=2, accum=2, steps=1)
    b = ga_losses(tiny_world, uneven_data, tmp_path / "b", micro=4, accum=1, steps=1)
    assert a[0] == pytest.approx(b[0], rel=2e-2)


def test_grad_accumulation_uneven_micro_batches_exact(tiny_world, uneven_data, tmp_path):
    a = ga_losses(tiny_world, uneven_data, tmp_path / "a", micro=2, accum=2, steps=1)
    b = ga_losses(tiny_world, uneven_data, tmp_path / "b", micro=4, accum=1, steps=1)
    assert a[0] == pytest.approx(b[0], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# errors


def test_malformed_data_is_a_data_error_before_the_model_loads(tiny_world, tmp_path, monkeypatch):
    import dist_secvec.stage2 as stage2  # finetune's setup loads the model there

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(stage2, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "what is 1 plus 2", "response": "3 ."}\n{"prompt": "what is 2 plus 2"}\n')
    cfg = make_cfg(tiny_world, str(bad), tmp_path / "run")
    with pytest.raises(DataError, match=r"row 2: field 'response'") as e:
        run_finetune(cfg)
    assert str(bad) in str(e.value)


def test_every_label_is_a_response_token(tiny_world, small_data, tmp_path):
    """What the recipe trains on: labels only on response tokens (prompt masked), 8 per new-task row
    (the premise of the gradient-accumulation test above)."""
    from dist_secvec.data import load_samples, tokenize_samples
    from dist_secvec.model import load_tokenizer

    cfg = make_cfg(tiny_world, small_data, tmp_path / "run")
    tok = load_tokenizer(cfg.model)
    ts = tokenize_samples(tok, load_samples(cfg.data.train), cfg.data)
    for ex in ts.examples:
        labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
        assert tok.decode(labelled).split()[:3] == ["The", "capital", "of"] and labelled[-1] == tok.eos_token_id
        assert len(labelled) == 8


def test_final_dir_manifest_refuses_a_changed_file(full_run, tmp_path):
    """final/ ends with manifest.json (size + sha256 of every file); a copy with one byte of the
    weights changed is refused in one line naming the file, by every command that loads it."""
    import shutil
    import subprocess
    import sys

    from dist_secvec.errors import UserError
    from dist_secvec.manifest import MANIFEST
    from dist_secvec.model import check_model_dir

    _, res = full_run
    listed = json.loads((res.final_dir / MANIFEST).read_text())["files"]
    assert set(listed) == {p.name for p in res.final_dir.iterdir()} - {MANIFEST}
    copy = tmp_path / "final"
    shutil.copytree(res.final_dir, copy)
    check_model_dir(str(copy))  # intact: accepted
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="file 'model.safetensors' is corrupted"):
        check_model_dir(str(copy))
    r = subprocess.run([sys.executable, "-m", "dist_secvec", "export", f"export.checkpoint={copy}",
                        f"output_dir={tmp_path / 'exp'}", "logging.progress=false"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "model.safetensors' is corrupted" in r.stderr and not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------------------------
# a non-finite gradient with a finite loss


NAN_GRAD_STEP = 2


@pytest.mark.parametrize("max_grad_norm", ["1.0", "null"], ids=["clipping", "no-clipping"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_gradient_with_finite_loss(tiny_world, small_data, tmp_path, monkeypatch, policy, max_grad_norm):
    """A NaN in one gradient (the loss finite) at step NAN_GRAD_STEP: `stop` names the step, `skip`
    drops that update (every later loss is finite, which a NaN in the weights would not allow).
    With clipping on, clipping's total norm is the check: no second pass over the gradients."""
    import math

    import dist_secvec.stage2 as stage2  # finetune's engine is built there
    from dist_secvec.stage2 import NonFiniteError

    passes = []

    class NaNGradEngine(stage2.PlainEngine):
        calls = 0

        def backward(self, loss):
            super().backward(loss)
            NaNGradEngine.calls += 1
            if NaNGradEngine.calls == NAN_GRAD_STEP:  # one micro-batch per step
                p = next(p for p in self.params if p.grad is not None)
                p.grad.view(-1)[0] = float("nan")

        def grads_finite(self):
            passes.append(1)
            return super().grads_finite()

    monkeypatch.setattr(stage2, "PlainEngine", NaNGradEngine)
    cfg = make_cfg(tiny_world, small_data, tmp_path / "run", "optim.max_steps=4", f"optim.nonfinite={policy}",
                   f"optim.max_grad_norm={max_grad_norm}")
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=f"not finite at step {NAN_GRAD_STEP};"):
            run_finetune(cfg)
        assert not (tmp_path / "run" / "final").exists()
    else:
        losses = run_finetune(cfg).losses
        assert len(losses) == 4 and math.isnan(losses[NAN_GRAD_STEP - 1])
        assert all(math.isfinite(x) for i, x in enumerate(losses) if i != NAN_GRAD_STEP - 1), losses
        log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [s for s in range(1, 5) if s != NAN_GRAD_STEP]
        assert all((r["grad_norm"] is not None) == (max_grad_norm == "1.0") for r in log)
    assert (len(passes) == 0) == (max_grad_norm == "1.0"), len(passes)
