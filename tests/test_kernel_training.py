"""A training step through the real tiny Llama with the security vector attached: the Triton
kernel (TRITON_INTERPRET=1 on CPU) gives the same loss and gradients as the torch path.

As in tests/test_kernels.py: TRITON_INTERPRET=1 must be set before anything imports triton. When
an earlier test module already imported it (peft and bitsandbytes do), the in-process test skips
and test_kernel_training_in_fresh_process reruns this file in a new interpreter process.
"""

import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
TRITON_IN_PROCESS = DEVICE == "cuda" or _OLD_INTERPRET == "1" or "triton" not in sys.modules
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

if TRITON_IN_PROCESS:
    import dist_secvec_kernels.secvec_delta  # noqa: E402,F401  (decorated under the interpreter)


def _restore_interpret():
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


_restore_interpret()


@pytest.fixture(autouse=True)
def _interpreter_env():
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()


needs_triton = pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before "
                                  "TRITON_INTERPRET=1; test_kernel_training_in_fresh_process runs this")


def _batch(tw):
    from dist_secvec.config import load_config
    from dist_secvec.data import collate, load_samples, tokenize_samples
    from dist_secvec.model import load_tokenizer

    cfg = load_config(None, [f"model.path={tw.model_dir}"])
    tok = load_tokenizer(cfg.model)
    examples = tokenize_samples(tok, load_samples([tw.data["finetune_mixed"]]), cfg.data).examples[:6]
    return {k: v.to(DEVICE) for k, v in collate(examples, tok.pad_token_id).items()}


def _step(tw, vector_dir, backend, mode):
    """Loss and {name: grad} of one forward/backward with the vector attached via `backend`."""
    from transformers import AutoModelForCausalLM

    from dist_secvec.config import AdapterConfig
    from dist_secvec.model import add_trainable_adapter
    from dist_secvec.secvec import attach_security_vector, load_security_vector

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tw.model_dir), dtype=torch.float32).to(DEVICE)
    model.requires_grad_(False)
    if mode == "full":
        model = add_trainable_adapter(model, AdapterConfig(type="none"))
    else:  # LoRA B starts at zero: randomize it so every gradient path is exercised
        model = add_trainable_adapter(model, AdapterConfig(type="lora", rank=4, alpha=8,
                                                           target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape) * 0.1)
    layers = attach_security_vector(model, load_security_vector(str(vector_dir)), backend=backend)
    assert layers and all(layer.backend == backend for layer in layers)
    model.train()
    loss = model(**_batch(tw)).loss
    loss.backward()
    for layer in layers:
        assert layer.secvec_A.grad is None and layer.secvec_B.grad is None
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), grads


@needs_triton
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_triton_training_step_matches_torch(tiny_world, random_vector, mode, monkeypatch):
    monkeypatch.delenv("DIST_SECVEC_BACKEND", raising=False)
    loss_t, grads_t = _step(tiny_world, random_vector, "torch", mode)
    from dist_secvec_kernels.secvec_delta import SecVecDeltaTriton

    real_apply, n_calls = SecVecDeltaTriton.apply, []

    def counting_apply(*args):
        n_calls.append(1)
        return real_apply(*args)

    monkeypatch.setattr(SecVecDeltaTriton, "apply", counting_apply)
    # a LoRA on the vector's layers takes the combined vector+LoRA kernel (dist_secvec.secvec fused path)
    from dist_secvec_kernels.secvec_lora_delta import SecVecLoraDeltaTriton

    real_lora = SecVecLoraDeltaTriton.apply
    monkeypatch.setattr(SecVecLoraDeltaTriton, "apply", lambda *a: n_calls.append(1) or real_lora(*a))
    loss_k, grads_k = _step(tiny_world, random_vector, "triton", mode)
    assert n_calls, "the Triton kernel never ran"
    assert abs(loss_k - loss_t) <= 1e-5 * abs(loss_t), (loss_k, loss_t)
    assert grads_k.keys() == grads_t.keys()
    n_nonzero = 0
    for name, gt in grads_t.items():
        gk = grads_k[name]
        scale = gt.abs().max().item()
        n_nonzero += scale > 0
        torch.testing.assert_close(gk, gt, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=name)
    assert n_nonzero > len(grads_t) // 2


def test_kernel_training_in_fresh_process():
    if TRITON_IN_PROCESS:
        pytest.skip("ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "not fresh_process"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
