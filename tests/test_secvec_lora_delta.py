"""Frozen security vector + trainable LoRA on one layer (one shrink over x for both), torch path
and Triton kernel, against a float64 autograd reference.

TRITON_INTERPRET=1 set-up, tolerances and helpers: tests/triton_env.py (imported first). When
another test module imported triton first, the Triton tests here skip and
test_triton_in_fresh_process reruns them in a new interpreter process.
"""

import os
import subprocess
import sys

# first: sets TRITON_INTERPRET=1 (on CPU) before triton is imported
from triton_env import (BACKENDS, DEVICE, TRITON_IN_PROCESS, _close, _rand, bf16, f16, f32,
                        interpreter_env, nan_empty, needs_triton, rerun_in_fresh_process)

import pytest
import torch
import torch.nn.functional as F

from dist_secvec.kernels.dispatch import apply_secvec_lora_delta
from dist_secvec.kernels.torch_ops import SecVecLoraDeltaTorch, secvec_lora_delta_reference

if TRITON_IN_PROCESS:
    import dist_secvec.kernels.secvec_lora_delta as svl

__all__ = ["interpreter_env", "nan_empty"]  # fixtures from triton_env, used by pytest


def _pair(r, K, N, dtype, requires_grad=False):
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_(requires_grad)
    B = (torch.randn(N, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_(requires_grad)
    return A, B


# (leading dims, K, N, r_v, r_l, (x dtype, base_out dtype, weights dtype), non-contiguous x/base/dy)
CASES = [
    ((37,), 100, 70, 1, 8, (f32, f32, f32), False),
    ((37,), 100, 70, 8, 1, (f16, f16, f16), False),
    ((37,), 100, 70, 8, 8, (f32, f32, f32), True),
    ((2, 19), 100, 70, 8, 8, (f16, f16, f16), True),
    ((3, 7), 33, 129, 1, 1, (f32, f32, f32), False),
    ((2, 19), 100, 70, 8, 16, (bf16, bf16, bf16), False),  # interpreter: the kernel's fp32 upcast path
    ((150,), 300, 520, 64, 16, (f32, f32, f32), False),  # several M, K and N blocks in the interpreter
    ((5, 8), 64, 48, 8, 8, (f16, f32, f32), False),  # fp16 activations, fp32 output and weights
    # a float32 LoRA on a 16-bit base (peft's default): math in x's dtype, fp32 dA_l / dB_l
    ((2, 19), 100, 70, 8, 16, (bf16, bf16, f32), False),
    ((37,), 100, 70, 8, 8, (f16, f16, f32), True),
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,K,N,r_v,r_l,dtypes,noncontig", CASES)
def test_forward_and_grads_match_float64(lead, K, N, r_v, r_l, dtypes, noncontig, backend, inplace, nan_empty):
    xdt, odt, wdt = dtypes
    s_v, s_l = 2.0, 0.75
    x = _rand(*lead, K, dtype=xdt, noncontig=noncontig).requires_grad_()
    base_leaf = _rand(*lead, N, dtype=odt, noncontig=noncontig).requires_grad_()
    A_v, B_v = _pair(r_v, K, N, wdt, requires_grad=True)  # frozen by the op, whatever requires_grad says
    A_l, B_l = _pair(r_l, K, N, wdt, requires_grad=True)
    dy = _rand(*lead, N, dtype=odt, noncontig=noncontig)

    x64 = x.detach().double().requires_grad_()
    A_l64, B_l64 = A_l.detach().double().requires_grad_(), B_l.detach().double().requires_grad_()
    ref = base_leaf.detach().double() + secvec_lora_delta_reference(
        x64, A_v.detach().double(), B_v.detach().double(), s_v, A_l64, B_l64, s_l)
    ref.backward(dy.double())

    base = base_leaf * 1 if inplace else base_leaf  # in place needs a non-leaf, as a linear's output
    base_ptr = base.data_ptr()
    y = apply_secvec_lora_delta(x, base, A_v, B_v, s_v, A_l, B_l, s_l, backend=backend, inplace=inplace)
    assert y.dtype == odt and y.shape == ref.shape
    assert (y.data_ptr() == base_ptr) == inplace
    _close(y, ref, xdt, odt, wdt)
    y.backward(dy)
    assert x.grad.dtype == xdt and A_l.grad.dtype == wdt and B_l.grad.dtype == wdt
    _close(x.grad, x64.grad, xdt, odt, wdt)
    _close(A_l.grad, A_l64.grad, xdt, odt, wdt)
    _close(B_l.grad, B_l64.grad, xdt, odt, wdt)
    torch.testing.assert_close(base_leaf.grad, dy)  # d(base_out) = dy
    assert A_v.grad is None and B_v.grad is None


@needs_triton
@pytest.mark.parametrize("split_n", [1, 2])
def test_triton_kernel_writes_exactly_its_rows_and_columns(split_n):
    M, K, N, r_v, r_l = 37, 100, 600, 8, 4  # 600 columns: 3 N blocks even in the interpreter
    inp_buf = torch.full((M + 5, K + 7), float("nan"), device=DEVICE)
    inp_buf[:M, :K] = torch.randn(M, K, device=DEVICE)
    inp = inp_buf[:M, :K]  # an unmasked read past K or M would pull nan into the result
    Pv, Qv = torch.randn(r_v, K, device=DEVICE), torch.randn(N, r_v, device=DEVICE)
    Pl, Ql = torch.randn(r_l, K, device=DEVICE), torch.randn(N, r_l, device=DEVICE)
    out_buf = torch.full((M + 4, N + 6), float("nan"), device=DEVICE)
    out = out_buf[:M, :N]
    t_buf = torch.full((M + 3, r_l + 2), float("nan"), device=DEVICE)
    t_l = t_buf[:M, :r_l]
    i64 = inp.double()
    ref_t = i64 @ Pl.double().t()
    ref = 0.5 * (i64 @ Pv.double().t()) @ Qv.double().t() + 1.5 * ref_t @ Ql.double().t()
    svl.two_lowrank_update(inp, Pv, Qv, 0.5, Pl, Ql, 1.5, t_l, None, out, split_n=split_n)
    _close(out, ref, f32)
    _close(t_l, ref_t, f32)
    assert out_buf[M:].isnan().all() and out_buf[:, N:].isnan().all()
    assert t_buf[M:].isnan().all() and t_buf[:, r_l:].isnan().all()
    svl.two_lowrank_update(inp, Pv, Qv, 0.5, Pl, Ql, 1.5, t_l, out, out, split_n=split_n)  # base aliasing out
    _close(out, 2 * ref, f32)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradcheck_torch_function(inplace):
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 7, **d, requires_grad=True)
    base = torch.randn(2, 5, 6, **d, requires_grad=True)
    A_v, B_v = torch.randn(3, 7, **d), torch.randn(6, 3, **d)
    A_l = torch.randn(2, 7, **d, requires_grad=True)
    B_l = torch.randn(6, 2, **d, requires_grad=True)
    fn = lambda x, b, a, bl: SecVecLoraDeltaTorch.apply(  # noqa: E731
        x, b * 1 if inplace else b, A_v, B_v, 0.7, a, bl, 1.3, inplace)
    assert torch.autograd.gradcheck(fn, (x, base, A_l, B_l))


@pytest.mark.parametrize("backend", BACKENDS)
def test_trains_with_a_real_base_and_vector_stays_frozen(backend):
    """Inside a linear layer's graph: W, x, A_l, B_l get the float64 gradients; A_v, B_v none."""
    K, N, r_v, r_l, s_v, s_l = 24, 40, 4, 2, 1.5, 2.0
    x = torch.randn(3, 5, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE, requires_grad=True)
    A_v, B_v = _pair(r_v, K, N, f32, requires_grad=True)
    A_l, B_l = _pair(r_l, K, N, f32, requires_grad=True)
    probe = torch.randn(3, 5, N, device=DEVICE)
    y = apply_secvec_lora_delta(x, F.linear(x, W), A_v, B_v, s_v, A_l, B_l, s_l, backend=backend, inplace=True)
    (y * probe).sum().backward()
    assert A_v.grad is None and B_v.grad is None

    leaves = [t.detach().double().requires_grad_() for t in (x, W, A_l, B_l)]
    x64, W64, A_l64, B_l64 = leaves
    y64 = x64 @ W64.t() + secvec_lora_delta_reference(x64, A_v.detach().double(), B_v.detach().double(), s_v,
                                                      A_l64, B_l64, s_l)
    (y64 * probe.double()).sum().backward()
    for got, ref in zip((x, W, A_l, B_l), leaves):
        _close(got.grad, ref.grad, f32)


@pytest.mark.parametrize("lora_trains", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_weights_x_and_h_l(backend, lora_trains):
    K, N, r_v, r_l, M = 48, 36, 8, 4, 33
    x = torch.randn(3, 11, K, device=DEVICE, requires_grad=True)
    base = torch.randn(3, 11, N, device=DEVICE, requires_grad=True) * 1
    A_v, B_v = _pair(r_v, K, N, f32)
    A_l, B_l = _pair(r_l, K, N, f32, requires_grad=lora_trains)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = apply_secvec_lora_delta(x, base, A_v, B_v, 1.0, A_l, B_l, 2.0, backend=backend)
    want = [(r_v, K), (N, r_v), (r_l, K), (N, r_l)] + ([(M, K), (M, r_l)] if lora_trains else [])
    assert sorted(shapes) == sorted(want)
    y.sum().backward()
    assert x.grad is not None and (A_l.grad is not None) == lora_trains


@pytest.mark.parametrize("x_grad,lora_grad", [(False, True), (True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend, x_grad, lora_grad, nan_empty):
    """x without grad (LoRA trains) or a frozen LoRA (x needs grad): the rest still exact."""
    K, N, s_v, s_l = 100, 70, 2.0, 0.5
    x = torch.randn(37, K, device=DEVICE, requires_grad=x_grad)
    base = torch.randn(37, N, device=DEVICE, requires_grad=True)
    A_v, B_v = _pair(8, K, N, f32)
    A_l, B_l = _pair(4, K, N, f32, requires_grad=lora_grad)
    dy = torch.randn(37, N, device=DEVICE)
    apply_secvec_lora_delta(x, base, A_v, B_v, s_v, A_l, B_l, s_l, backend=backend).backward(dy)
    x64, A_l64, B_l64 = (t.detach().double().requires_grad_() for t in (x, A_l, B_l))
    secvec_lora_delta_reference(x64, A_v.double(), B_v.double(), s_v, A_l64, B_l64, s_l).backward(dy.double())
    for t, ref, want in ((x, x64, x_grad), (A_l, A_l64, lora_grad), (B_l, B_l64, lora_grad)):
        if want:
            _close(t.grad, ref.grad, f32)
        else:
            assert t.grad is None
    torch.testing.assert_close(base.grad, dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_two_separate_deltas(backend):
    """Same result as the unfused way: peft's LoRA expression plus the vector's delta."""
    from dist_secvec.kernels.dispatch import apply_secvec_delta

    K, N = 40, 56
    x = torch.randn(4, 9, K, device=DEVICE)
    base = torch.randn(4, 9, N, device=DEVICE)
    A_v, B_v = _pair(8, K, N, f32)
    A_l, B_l = _pair(8, K, N, f32)
    want = apply_secvec_delta(x, base + (x @ A_l.t()) @ B_l.t() * 0.5, A_v, B_v, 2.0, backend="torch")
    got = apply_secvec_lora_delta(x, base, A_v, B_v, 2.0, A_l, B_l, 0.5, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lora_shapes_raise_one_line(backend):
    x, base = torch.randn(4, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    A_v, B_v = torch.randn(3, 8, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"lora A \(2, 7\) \(want r x K\)"):
        apply_secvec_lora_delta(x, base, A_v, B_v, 1.0, torch.randn(2, 7, device=DEVICE),
                                torch.randn(6, 2, device=DEVICE), 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"A \(3, 7\) \(want r x K\)"):  # the vector's own check
        apply_secvec_lora_delta(x, base, torch.randn(3, 7, device=DEVICE), B_v, 1.0,
                                torch.randn(2, 8, device=DEVICE), torch.randn(6, 2, device=DEVICE), 1.0,
                                backend=backend)


@needs_triton
def test_triton_rejects_rank_over_128():
    x, base = torch.randn(4, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    A_v, B_v = torch.randn(3, 8, device=DEVICE), torch.randn(6, 3, device=DEVICE)
    with pytest.raises(ValueError, match="LoRA rank 129"):
        svl.SecVecLoraDeltaTriton.apply(x, base, A_v, B_v, 1.0, torch.randn(129, 8, device=DEVICE),
                                        torch.randn(6, 129, device=DEVICE), 1.0, False)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU fallback without the interpreter")
def test_cpu_default_is_torch_and_never_imports_triton():
    code = """
import sys, torch
from dist_secvec.kernels.dispatch import apply_secvec_lora_delta
x = torch.randn(3, 8)
y = apply_secvec_lora_delta(x, torch.zeros(3, 5), torch.randn(2, 8), torch.randn(5, 2), 1.0,
                            torch.randn(4, 8), torch.randn(5, 4), 1.0)
assert "triton" not in sys.modules, "the torch path imported triton"
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_triton_in_fresh_process():
    rerun_in_fresh_process(__file__, "triton and not fresh_process and not never_imports")
