"""A training step through the real tiny Llama with the security vector attached: the Triton
kernel (TRITON_INTERPRET=1 on CPU) gives the same loss and gradients as the torch path, on a
float32 base (full fine-tuning or a LoRA) and on a bitsandbytes int8 base (Linear8bitLt) under a
LoRA, where the torch path also matches the plain-autograd reference.

TRITON_INTERPRET=1 set-up: tests/triton_env.py (imported first). When an earlier test module
already imported triton (peft and bitsandbytes do), the in-process tests skip and
test_kernel_training_in_fresh_process reruns this file in a new interpreter process.
"""

# first: sets TRITON_INTERPRET=1 (on CPU) before triton is imported
from triton_env import DEVICE, interpreter_env, needs_triton, rerun_in_fresh_process

import pytest
import torch

__all__ = ["interpreter_env"]  # fixture from triton_env, used by pytest


def _batch(tw):
    from dist_secvec.config import load_config
    from dist_secvec.data import collate, load_samples, tokenize_samples
    from dist_secvec.model import load_tokenizer

    cfg = load_config(None, [f"model.path={tw.model_dir}"])
    tok = load_tokenizer(cfg.model)
    examples = tokenize_samples(tok, load_samples([tw.data["finetune_mixed"]]), cfg.data).examples[:6]
    return {k: v.to(DEVICE) for k, v in collate(examples, tok.pad_token_id).items()}


VECTOR_TARGETS = ["q_proj", "v_proj", "down_proj"]  # the random vector's (tests/conftest.py)
# mode -> (model.quantization, LoRA targets; None = full fine-tuning)
MODES = {
    "full": ("none", None),
    "lora": ("none", VECTOR_TARGETS),  # the vector's layers take the fused vector+LoRA kernel
    # bitsandbytes int8 (Linear8bitLt, LLM.int8 matmul on CPU in bnb 0.50) under the vector:
    "int8_plain": ("int8", ["k_proj", "o_proj", "up_proj"]),  # SecVecLinear's own kernel over the int8 base
    "int8_fused": ("int8", VECTOR_TARGETS),  # the fused vector+LoRA kernel over the int8 base
}


def _reference_ops(monkeypatch):
    """Replace the delta ops dist_secvec.secvec calls by plain autograd on the same math (the torch reference):
    the bitsandbytes base output plus s (x A^T) B^T (+ the LoRA's), the vector detached."""
    import dist_secvec.secvec.layer as layer_mod
    import dist_secvec.secvec.lora as lora_mod
    from dist_secvec.kernels.torch_ops import secvec_delta_reference, secvec_lora_delta_reference

    def delta(x, out, A, B, s, backend="auto", **_):
        return out + secvec_delta_reference(x, A.detach(), B.detach(), s).to(out.dtype)

    def lora_delta(x, out, A_v, B_v, s_v, A_l, B_l, s_l, backend="auto", **_):
        return out + secvec_lora_delta_reference(x, A_v.detach(), B_v.detach(), s_v, A_l, B_l, s_l).to(out.dtype)

    monkeypatch.setattr(layer_mod, "apply_secvec_delta", delta)
    monkeypatch.setattr(lora_mod, "apply_secvec_lora_delta", lora_delta)


def _step(tw, vector_dir, backend, mode):
    """Loss and {name: grad} of one forward/backward with the vector attached via `backend`."""
    from dist_secvec.config import AdapterConfig, load_config
    from dist_secvec.model import add_trainable_adapter, load_model
    from dist_secvec.secvec import attach_security_vector, load_security_vector

    quant, lora_targets = MODES[mode]
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.path={tw.model_dir}", f"model.quantization={quant}", "model.dtype=float32"])
    model = load_model(cfg.model).to(DEVICE)
    model.requires_grad_(False)
    if lora_targets is None:
        model = add_trainable_adapter(model, AdapterConfig(type="none"))
    else:  # LoRA B starts at zero: randomize it so every gradient path is exercised
        model = add_trainable_adapter(model, AdapterConfig(type="lora", rank=4, alpha=8, target_modules=lora_targets))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape) * 0.1)
    layers = attach_security_vector(model, load_security_vector(str(vector_dir)),
                                    backend="torch" if backend == "reference" else backend)
    assert layers and all(layer.backend in (backend, "torch") for layer in layers)
    if quant == "int8":
        import bitsandbytes as bnb

        assert all(isinstance(layer.base_layer, bnb.nn.Linear8bitLt) for layer in layers)
    model.train()
    loss = model(**_batch(tw)).loss
    loss.backward()
    for layer in layers:
        assert layer.secvec_A.grad is None and layer.secvec_B.grad is None
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), grads


def _assert_same_step(got, want, rtol):
    (loss_k, grads_k), (loss_t, grads_t) = got, want
    assert abs(loss_k - loss_t) <= rtol * abs(loss_t), (loss_k, loss_t)
    assert grads_k.keys() == grads_t.keys()
    n_nonzero = 0
    for name, gt in grads_t.items():
        gk = grads_k[name]
        scale = gt.abs().max().item()
        n_nonzero += scale > 0
        torch.testing.assert_close(gk, gt, rtol=rtol, atol=rtol * max(scale, 1e-12), msg=name)
    assert n_nonzero > len(grads_t) // 2


def _count_triton(monkeypatch):
    """{"plain": calls of SecVecDeltaTriton, "lora": calls of the combined vector+LoRA kernel}."""
    from dist_secvec.kernels.secvec_delta import SecVecDeltaTriton
    from dist_secvec.kernels.secvec_lora_delta import SecVecLoraDeltaTriton

    calls = {"plain": 0, "lora": 0}
    for key, fn in (("plain", SecVecDeltaTriton), ("lora", SecVecLoraDeltaTriton)):
        real = fn.apply

        def counting(*args, _real=real, _key=key):
            calls[_key] += 1
            return _real(*args)

        monkeypatch.setattr(fn, "apply", counting)
    return calls


@needs_triton
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_training_step_matches_torch(tiny_world, random_vector, mode, monkeypatch):
    torch_step = _step(tiny_world, random_vector, "torch", mode)
    calls = _count_triton(monkeypatch)
    triton_step = _step(tiny_world, random_vector, "triton", mode)
    # 6 vector layers (3 targets x 2 blocks), one forward: the plain kernel where no LoRA sits on
    # the layer, the combined vector+LoRA kernel (dist_secvec.secvec fused path) where one does
    fused = MODES[mode][1] == VECTOR_TARGETS
    assert calls == {"plain": 0 if fused else 6, "lora": 6 if fused else 0}, calls
    _assert_same_step(triton_step, torch_step, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8_plain", "int8_fused"])
def test_int8_base_torch_path_matches_reference(tiny_world, random_vector, mode, monkeypatch):
    """bitsandbytes int8 base (its own matmul; the delta adds into its output): the torch path's
    autograd Functions give the plain-autograd reference's loss and grads (the Triton path is held
    to the torch path above)."""
    got = _step(tiny_world, random_vector, "torch", mode)
    _reference_ops(monkeypatch)
    _assert_same_step(got, _step(tiny_world, random_vector, "reference", mode), rtol=1e-5)


def test_int8_base_vector_in_the_models_float_dtype(tiny_world, random_vector):
    """An int8 layer names no compute dtype: the vector takes the model's floating dtype (that of
    its embeddings and of the layer's output), not float32."""
    from dist_secvec.config import load_config
    from dist_secvec.model import load_model
    from dist_secvec.secvec import attach_security_vector, load_security_vector

    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", "model.quantization=int8", "model.dtype=bfloat16"])
    model = load_model(cfg.model)
    layers = attach_security_vector(model, load_security_vector(str(random_vector)))
    assert layers and {(layer.secvec_A.dtype, layer.secvec_B.dtype) for layer in layers} == {(torch.bfloat16,) * 2}


def test_kernel_training_in_fresh_process():
    rerun_in_fresh_process(__file__, "not fresh_process")
