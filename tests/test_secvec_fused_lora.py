"""The security vector under a trainable peft LoRA: the LoRA layer's fused forward adds both with
one shrink pass over x (dist_secvec.kernels apply_secvec_lora_delta) and must train exactly like
peft's own path (security_vector.fused_lora=false), fall back to it whenever fusing would change the result,
and leave nothing behind on detach."""

from __future__ import annotations

import copy

import pytest
import torch

import dist_secvec.secvec.lora as secvec_mod
from dist_secvec.model import lora_config
from dist_secvec.secvec import (PathOptions, SecVecLinear, attach_security_vector, detach_security_vector,
                                load_security_vector, register_zero3_external_params, security_vector_off)
from conftest import plain_base

TARGETS = ["q_proj", "v_proj", "down_proj"]  # the random vector's targets (tests/conftest.py)


def randomize_lora(model, seed: int = 1) -> None:
    """Nonzero lora_B (peft starts it at zero), so the LoRA changes the output and lora_A gets a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def peft_model(model_dir, dropout: float = 0.0, base=None):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(base if base is not None else plain_base(model_dir),
                           lora_config(rank=2, alpha=4, dropout=dropout, target_modules=TARGETS))
    randomize_lora(model)
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_fused(model, on: bool) -> None:
    """What attach picks with security_vector.fused_lora true / false, switched on an attached model."""
    for m in lora_layers(model):
        if on:
            secvec_mod.make_fused(m)
        else:
            secvec_mod.unmake_fused(m)
        m.base_layer.path = "fused_lora" if on else "delta"


class Calls:
    """Counts the fused kernel's calls (wraps the name secvec.py calls)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = secvec_mod.apply_secvec_lora_delta

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(secvec_mod, "apply_secvec_lora_delta", counted)


@pytest.fixture
def batch(tiny_world):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(tiny_world.model_dir)).vocab_size
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (3, 11), generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


@pytest.fixture
def fused_model(tiny_world, random_vector):
    model = peft_model(tiny_world.model_dir)
    layers = attach_security_vector(model, load_security_vector(str(random_vector)), backend="torch")
    return model, layers


def train_step(model, batch, lr: float = 0.5):
    """Loss, LoRA grads, d loss / d inputs_embeds, then one SGD step and the loss after it."""
    model.train()
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= lr * p.grad
        after = model(**batch).loss
    return loss.detach(), grads, emb.grad.clone(), after


def test_fused_step_equals_peft_path(fused_model, batch, monkeypatch):
    model, layers = fused_model
    assert len(layers) == 6 and sum(secvec_mod._is_fused(m) for m in lora_layers(model)) == 6
    unfused = copy.deepcopy(model)  # the fused forward is rebound to the copy's own layers
    assert all(m.forward.__self__ is m for m in lora_layers(unfused))
    calls = Calls(monkeypatch)
    loss_f, grads_f, dx_f, after_f = train_step(model, batch)
    assert calls.n == 6 * 2  # 6 fused layers, forward of the step and of the loss after it
    set_fused(unfused, False)
    loss_u, grads_u, dx_u, after_u = train_step(unfused, batch)
    assert calls.n == 6 * 2  # peft's path only
    assert grads_f.keys() == grads_u.keys() and all("lora_" in n for n in grads_f)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    for n in grads_f:
        assert grads_f[n].abs().max() > 0, n
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(dx_f, dx_u, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(after_f, after_u, rtol=1e-5, atol=1e-6)
    assert after_f < loss_f  # the step changed the LoRA, so the second comparison means something
    for layer in layers:
        assert layer.secvec_A.grad is None and layer.secvec_B.grad is None
        assert not layer.secvec_A.requires_grad and not layer.secvec_B.requires_grad


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_fallbacks_to_peft_forward(tiny_world, random_vector, fused_model, batch, monkeypatch):
    model, _ = fused_model
    calls = Calls(monkeypatch)
    model.eval()
    fused = logits(model, batch)
    assert calls.n == 6
    set_fused(model, False)
    torch.testing.assert_close(logits(model, batch), fused, rtol=1e-5, atol=1e-6)
    set_fused(model, True)
    assert calls.n == 6

    # the vector off: neither the fused kernel nor the vector
    ref = copy.deepcopy(model)
    detach_security_vector(ref)
    with security_vector_off(model):
        torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=0, atol=0)
    assert calls.n == 6

    # adapters disabled: the base with the vector only
    with model.disable_adapter():
        off = logits(model, batch)
    assert calls.n == 6
    assert not torch.allclose(off, fused)

    # a LoRA in another dtype than x: peft casts x, so fusing would change the numerics
    first = lora_layers(model)[0]
    first.lora_A["default"].to(torch.float64)
    first.lora_B["default"].to(torch.float64)
    before = calls.n
    torch.testing.assert_close(logits(model, batch), fused, rtol=1e-4, atol=1e-5)
    assert calls.n == before + 5
    first.lora_A["default"].to(torch.float32)
    first.lora_B["default"].to(torch.float32)

    # merged adapters (the vector stays in its SecVecLinear)
    model.merge_adapter()
    merged = logits(model, batch)
    assert calls.n == before + 5
    torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), fused, rtol=1e-4, atol=1e-5)
    assert calls.n == before + 11


def test_an_adapter_switched_after_attach_runs_peft_forward(tiny_world, random_vector, fused_model, batch,
                                                            monkeypatch):
    """The fused forward holds the adapter it was attached with: with another adapter active it
    runs peft's forward (that adapter's LoRA, the vector under it), and fuses again once the first
    adapter is back."""
    model, _ = fused_model
    model.add_adapter("other", lora_config(rank=2, alpha=4, dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.other" in n:
                p.normal_(0, 0.5)  # peft starts B at zero: give the other adapter an effect
    ref = copy.deepcopy(model)
    set_fused(ref, False)
    model.eval(), ref.eval()
    calls = Calls(monkeypatch)
    fused = logits(model, batch)
    assert calls.n == 6
    model.set_adapter("other"), ref.set_adapter("other")
    other = logits(model, batch)
    assert calls.n == 6  # peft's forward on every layer
    torch.testing.assert_close(other, logits(ref, batch), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, fused, atol=1e-3)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), fused, rtol=1e-5, atol=1e-6)
    assert calls.n == 12


def test_dropout_falls_back_in_training_only(tiny_world, random_vector, batch, monkeypatch):
    model = peft_model(tiny_world.model_dir, dropout=0.1)
    attach_security_vector(model, load_security_vector(str(random_vector)), backend="torch")
    calls = Calls(monkeypatch)
    model.train()
    model(**batch).loss.backward()
    assert calls.n == 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_A" in n)
    model.eval()
    logits(model, batch)
    assert calls.n == 6


def test_detach_restores_peft_forward(tiny_world, random_vector, batch):
    model = peft_model(tiny_world.model_dir)
    never = copy.deepcopy(model)  # the same LoRA, never had the vector
    attach_security_vector(model, load_security_vector(str(random_vector)), backend="torch")
    assert not torch.equal(logits(model.eval(), batch), logits(never.eval(), batch))
    assert detach_security_vector(model) == 6
    for m in lora_layers(model):
        assert "forward" not in m.__dict__ and not isinstance(m.base_layer, SecVecLinear)
        assert not getattr(m, "_external_params", {})
    assert torch.equal(logits(model, batch), logits(never, batch))
    assert register_zero3_external_params(model) == 0


def test_zero3_external_params_registered(fused_model):
    """The fused forward reads lora A/B and the vector's A/B without calling their modules, so
    ZeRO-3 must gather them for the LoRA layer (registered at attach when deepspeed is imported)."""
    pytest.importorskip("deepspeed")
    model, layers = fused_model
    assert register_zero3_external_params(model) == 6  # the 6 fused LoRA layers
    for m in lora_layers(model):
        want = {id(p) for p in (m.base_layer.secvec_A, m.base_layer.secvec_B, m.lora_A["default"].weight,
                                m.lora_B["default"].weight)}
        assert set(m._external_params) == want
        # on the fused path the SecVecLinear never reads its base weight itself: nothing registered
        assert not getattr(m.base_layer, "_external_params", None)
    detach_security_vector(model)
    assert all(not m._external_params for m in lora_layers(model))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_quantized_fused_equals_unfused(tiny_world, random_vector, batch, monkeypatch, quant):
    """NF4 and int8 (bitsandbytes Linear8bitLt, which runs on CPU in bnb 0.50) bases under the LoRA."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    from dist_secvec.config import load_config
    from dist_secvec.model import load_model

    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", f"model.quantization={quant}",
                             "model.compute_dtype=float32", "model.quant_storage=bfloat16"])
    model = peft_model(tiny_world.model_dir, base=load_model(cfg.model))
    layers = attach_security_vector(model, load_security_vector(str(random_vector)))
    lora_cls, base_cls = ((LoraLinear4bit, bnb.nn.Linear4bit) if quant == "nf4"
                          else (LoraLinear8bitLt, bnb.nn.Linear8bitLt))
    fused = [m for m in lora_layers(model) if secvec_mod._is_fused(m)]
    assert len(fused) == 6 and all(isinstance(m, lora_cls) for m in fused)
    assert all(isinstance(layer.base_layer, base_cls) for layer in layers)
    unfused = copy.deepcopy(model)
    calls = Calls(monkeypatch)
    loss_f, grads_f, dx_f, _ = train_step(model, batch)
    assert calls.n == 12
    set_fused(unfused, False)
    loss_u, grads_u, dx_u, _ = train_step(unfused, batch)
    assert calls.n == 12
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-6)
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_u[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(dx_f, dx_u, rtol=1e-4, atol=1e-7)
    for layer in layers:
        assert layer.secvec_A.grad is None and layer.secvec_B.grad is None


# ---------------------------------------------------------------------------------------------
# 16-bit bases: peft keeps the LoRA in float32 (autocast_adapter_dtype) and casts x up for it; the
# fused path runs in x's dtype with the LoRA rounded to it (dispatch.apply_secvec_lora_delta) and
# must still be taken, within bf16 tolerance of peft's path


def bf16_base(tw, kind):
    if kind == "bf16":
        return plain_base(tw.model_dir).to(torch.bfloat16)
    from dist_secvec.config import load_config
    from dist_secvec.model import load_model

    return load_model(load_config(None, [f"model.path={tw.model_dir}", f"model.quantization={kind}",
                                         "model.dtype=bfloat16", "model.compute_dtype=bfloat16",
                                         "model.quant_storage=bfloat16"]).model)


def _close_bf16(got, want, msg=""):
    """bf16 tolerance relative to the largest element: the LoRA product rounds its weights and x A^T
    to bf16 on one path and not on the other (peft upcasts x), 2**-8 relative per rounding, and the
    bf16 model carries each difference on. Measured on CPU: loss 3e-6 (bf16) / 2e-5 (nf4) relative,
    LoRA grads 2.1% / 1.5% and dx 1.6% / 1.3% of their largest element."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2 * scale, msg=msg)


@pytest.mark.parametrize("kind", ["bf16", "nf4", "int8"])
def test_bf16_base_fp32_lora_takes_fused_path(tiny_world, random_vector, batch, monkeypatch, kind, caplog):
    model = peft_model(tiny_world.model_dir, base=bf16_base(tiny_world, kind))
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params.values())  # peft's default
    layers = attach_security_vector(model, load_security_vector(str(random_vector)))
    # (int8: the weight names no compute dtype; the vector takes the model's floating dtype)
    assert all(layer.secvec_A.dtype == torch.bfloat16 for layer in layers)
    unfused = copy.deepcopy(model)
    calls = Calls(monkeypatch)
    with caplog.at_level("INFO", logger="dist_secvec.secvec"):
        loss_f, grads_f, dx_f, after_f = train_step(model, batch, lr=0.2)
    assert calls.n == 6 * 2, "the fused path was not taken on a bf16 base with float32 LoRA weights"
    assert not [r for r in caplog.records if "unfused" in r.getMessage()]
    set_fused(unfused, False)
    loss_u, grads_u, dx_u, after_u = train_step(unfused, batch, lr=0.2)
    assert calls.n == 6 * 2
    assert grads_f.keys() == grads_u.keys() == lora_params.keys()
    _close_bf16(loss_f, loss_u)
    _close_bf16(after_f, after_u)
    assert after_f < loss_f
    for n in grads_f:
        assert grads_f[n].dtype == torch.float32 and grads_f[n].abs().max() > 0, n  # fp32 grads on fp32 params
        _close_bf16(grads_f[n], grads_u[n], msg=n)
    _close_bf16(dx_f, dx_u)
    for layer in layers:
        assert layer.secvec_A.grad is None and layer.secvec_B.grad is None


def test_fallback_logged_once_per_layer(tiny_world, random_vector, batch, monkeypatch, caplog):
    """A LoRA dtype the rule refuses (float64 on float32 x): peft's path, said once per layer at INFO."""
    model, _ = fused_model_of(tiny_world, random_vector)
    first = lora_layers(model)[0]
    first.lora_A["default"].to(torch.float64)
    first.lora_B["default"].to(torch.float64)
    calls = Calls(monkeypatch)
    with caplog.at_level("INFO", logger="dist_secvec.secvec"):
        logits(model.eval(), batch)
        logits(model, batch)
    assert calls.n == 2 * 5
    msgs = [r.getMessage() for r in caplog.records if "unfused" in r.getMessage()]
    assert len(msgs) == 1 and "torch.float64" in msgs[0] and "q_proj" in msgs[0], msgs
    # intended fallbacks (the vector switched off) are not logged
    caplog.clear()
    with caplog.at_level("INFO", logger="dist_secvec.secvec"), security_vector_off(model):
        logits(model, batch)
    assert not [r for r in caplog.records if "unfused" in r.getMessage()]


def fused_model_of(tw, vector):
    model = peft_model(tw.model_dir)
    return model, attach_security_vector(model, load_security_vector(str(vector)), backend="torch")


# ---------------------------------------------------------------------------------------------
# ZeRO-3 on one CPU rank (a subprocess: its own process group), every parameter partitioned


ZERO3_SCRIPT = r'''
import json, os, sys
import torch
import deepspeed  # imported before attach, as init_distributed does in DeepSpeed runs

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from dist_secvec.distributed import unlink_shm_buffer
unlink_shm_buffer()  # DeepSpeed's CPU all-reduce buffer in /dev/shm would outlive the process
sys.path.insert(0, sys.argv[1])
import test_secvec_fused_lora as t
from dist_secvec.secvec import attach_security_vector, load_security_vector, security_vector_layers

model_dir, vector, batch_file = sys.argv[2:5]
batch = torch.load(batch_file)
result = {}
for mode in ("registered", "unregistered"):
    model = t.peft_model(model_dir)
    attach_security_vector(model, load_security_vector(vector), backend="torch")
    if mode == "unregistered":  # DeepSpeed's parameter getter then gathers them on first access
        for m in t.lora_layers(model):
            m._external_params.clear()
    registered = all(len(m._external_params) == 4 for m in t.lora_layers(model))
    calls = []
    real = t.secvec_mod.apply_secvec_lora_delta
    t.secvec_mod.apply_secvec_lora_delta = lambda *a, **k: calls.append(1) or real(*a, **k)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch.optim.SGD(params, lr=0.5),
                                      config={"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
                                              "zero_allow_untested_optimizer": True,
                                              "zero_optimization": {"stage": 3,
                                                                    "stage3_param_persistence_threshold": 0}})
    engine.train()
    losses = []
    for _ in range(3):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    t.secvec_mod.apply_secvec_lora_delta = real
    sv = security_vector_layers(model)
    result[mode] = {"losses": losses, "calls": len(calls), "registered": registered,
                    "partitioned": all(p.ds_tensor is not None and p.numel() == 0
                                       for l in sv for p in (l.secvec_A, l.secvec_B))
                                   and all(m.lora_A["default"].weight.numel() == 0 for m in t.lora_layers(model)),
                    "vector_grads": [l.secvec_A.grad is None and l.secvec_B.grad is None for l in sv]}
print("RESULT " + json.dumps(result))
'''


@pytest.mark.slow
def test_zero3_fused_path_trains_like_peft(tiny_world, random_vector, batch, tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    torch.save(batch, tmp_path / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(Path(__file__).parent), str(tiny_world.model_dir),
                        str(random_vector), str(tmp_path / "batch.pt")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])

    # the same three SGD steps in one plain process through peft's path
    model = peft_model(tiny_world.model_dir)
    attach_security_vector(model, load_security_vector(str(random_vector)),
                           PathOptions(backend="torch", fused_lora=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    ref = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    assert ref[-1] < ref[0]
    assert res["registered"]["registered"] and not res["unregistered"]["registered"]
    # Registered at attach (deepspeed was imported), every forward of every LoRA layer took the fused
    # kernel on gathered weights. Unregistered, DeepSpeed's ZeROOrderedDict getter gathers a partitioned
    # parameter read in a forward and registers it itself: same result, one lazy gather per parameter.
    for mode in ("registered", "unregistered"):
        r_ = res[mode]
        assert r_["calls"] == 3 * 6, mode
        assert r_["partitioned"] and all(r_["vector_grads"]), mode
        assert r_["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6), mode


# ---------------------------------------------------------------------------------------------
# the Triton kernel (interpreted on CPU: TRITON_INTERPRET=1 before triton is imported, so a fresh
# process) in a real training step equals peft's path on the torch backend


TRITON_SCRIPT = r'''
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import test_secvec_fused_lora as t
from dist_secvec.secvec import PathOptions, attach_security_vector, load_security_vector
from dist_secvec.kernels.secvec_lora_delta import SecVecLoraDeltaTriton

model_dir, vector, batch_file = sys.argv[2:5]
batch = torch.load(batch_file)
calls = []
real = SecVecLoraDeltaTriton.apply
SecVecLoraDeltaTriton.apply = lambda *a: calls.append(1) or real(*a)
out = {}
for backend, fuse in (("triton", True), ("torch", False)):
    model = t.peft_model(model_dir)
    attach_security_vector(model, load_security_vector(vector), PathOptions(backend=backend, fused_lora=fuse))
    loss, grads, dx, after = t.train_step(model, batch)
    out[backend] = (loss, grads, dx, after)
lt, gt, dxt, at = out["triton"]
lr, gr, dxr, ar = out["torch"]
torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(at, ar, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(dxt, dxr, rtol=1e-4, atol=1e-7)
for n in gr:
    torch.testing.assert_close(gt[n], gr[n], rtol=1e-4, atol=1e-6, msg=n)
print("RESULT " + json.dumps({"calls": len(calls), "grads": len(gr)}))
'''


@pytest.mark.slow
def test_triton_fused_step_equals_peft_path(tiny_world, random_vector, batch, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    torch.save(batch, tmp_path / "batch.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent), str(tiny_world.model_dir),
                        str(random_vector), str(tmp_path / "batch.pt")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["calls"] == 2 * 6 and res["grads"] == 12  # 6 fused layers x 2 forwards; lora A and B of each
