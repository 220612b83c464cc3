"""The security-vector delta, torch path and Triton kernel, against a float64 reference.

Without a GPU the Triton kernel runs in the interpreter; tests/triton_env.py (imported first)
sets it up and holds the tolerances and helpers shared with the other kernel tests. When another
test module imported triton first, the Triton tests here skip and test_triton_in_fresh_process
reruns them in a new interpreter process.
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

from dist_secvec.kernels.dispatch import apply_secvec_delta, resolve_backend
from dist_secvec.kernels.torch_ops import SecVecDeltaTorch, secvec_delta_reference

if TRITON_IN_PROCESS:
    import dist_secvec.kernels.secvec_delta as sv

__all__ = ["interpreter_env", "nan_empty"]  # fixtures from triton_env, used by pytest


# (leading dims, K, N, r, (x dtype, base_out dtype, vector dtype), non-contiguous inputs)
CASES = [
    ((37,), 100, 70, 1, (f32, f32, f32), False),
    ((37,), 100, 70, 8, (f16, f16, f16), False),
    ((2, 19), 100, 70, 64, (f32, f32, f32), False),
    ((3, 7), 33, 129, 8, (f16, f16, f16), True),
    ((37,), 100, 70, 8, (bf16, bf16, bf16), False),  # interpreter: the kernel's fp32 upcast path
    ((150,), 300, 520, 128, (f32, f32, f32), True),  # several M, K and N blocks in the interpreter
    ((5, 8), 64, 48, 16, (f16, f32, f32), False),  # mixed: fp16 activations, fp32 output and vector
]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,K,N,r,dtypes,noncontig", CASES)
def test_forward_and_grads_match_float64(lead, K, N, r, dtypes, noncontig, backend, inplace, nan_empty):
    xdt, odt, vdt = dtypes
    scale = 2.0
    x = _rand(*lead, K, dtype=xdt, noncontig=noncontig).requires_grad_()
    base_leaf = _rand(*lead, N, dtype=odt, noncontig=noncontig).requires_grad_()
    A = (torch.randn(r, K, device=DEVICE) / K**0.5).to(vdt)
    B = (torch.randn(N, r, device=DEVICE) / r**0.5).to(vdt)
    dy = _rand(*lead, N, dtype=odt, noncontig=noncontig)
    ref = base_leaf.double() + secvec_delta_reference(x.double(), A.double(), B.double(), scale)
    ref_dx = (dy.double() @ B.double()) @ A.double() * scale

    # In place needs a non-leaf (as a linear layer's output is); out of place reads the strided leaf.
    base = base_leaf * 1 if inplace else base_leaf
    base_ptr = base.data_ptr()
    y = apply_secvec_delta(x, base, A, B, scale, backend=backend, inplace=inplace)
    assert y.dtype == odt and y.shape == ref.shape
    assert (y.data_ptr() == base_ptr) == inplace
    _close(y, ref, xdt, odt)
    y.backward(dy)
    assert x.grad.dtype == xdt
    _close(x.grad, ref_dx, xdt, odt)
    torch.testing.assert_close(base_leaf.grad, dy)  # d(base_out) = dy


@needs_triton
@pytest.mark.parametrize("split_n", [1, 2])
def test_triton_kernel_writes_exactly_its_rows_and_columns(split_n):
    M, K, N, r, scale = 37, 100, 600, 8, 0.5  # 600 columns: 3 N blocks even in the interpreter
    inp_buf = torch.full((M + 5, K + 7), float("nan"), device=DEVICE)
    inp_buf[:M, :K] = torch.randn(M, K, device=DEVICE)
    inp = inp_buf[:M, :K]  # an unmasked read past K or M would pull nan into the result
    P, Q = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    out_buf = torch.full((M + 4, N + 6), float("nan"), device=DEVICE)
    out = out_buf[:M, :N]
    ref = (inp.double() @ P.double().t()) @ Q.double().t() * scale
    sv.lowrank_update(inp, P, Q, None, out, scale, split_n=split_n)
    _close(out, ref, f32)
    assert out_buf[M:].isnan().all() and out_buf[:, N:].isnan().all()
    sv.lowrank_update(inp, P, Q, out, out, scale, split_n=split_n)  # base aliasing out adds in place
    _close(out, 2 * ref, f32)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradcheck_torch_function(inplace):
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    A, B = torch.randn(3, 7, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    # In place needs a fresh non-leaf each call: gradcheck evaluates the function many times.
    fn = lambda x, b: SecVecDeltaTorch.apply(x, b * 1 if inplace else b, A, B, 0.7, inplace)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, base))


@pytest.mark.parametrize("vector_requires_grad", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_stays_frozen_and_base_graph_trains(backend, vector_requires_grad):
    K, N, r, scale = 24, 40, 4, 1.5
    x = torch.randn(3, 5, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE, requires_grad=True)
    A = torch.randn(r, K, device=DEVICE, requires_grad=vector_requires_grad)
    B = torch.randn(N, r, device=DEVICE, requires_grad=vector_requires_grad)
    probe = torch.randn(3, 5, N, device=DEVICE)
    (apply_secvec_delta(x, F.linear(x, W), A, B, scale, backend=backend, inplace=True) * probe).sum().backward()
    assert A.grad is None and B.grad is None

    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    y64 = x64 @ W64.t() + secvec_delta_reference(x64, A.detach().double(), B.detach().double(), scale)
    (y64 * probe.double()).sum().backward()
    _close(x.grad, x64.grad, f32)
    _close(W.grad, W64.grad, f32)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_only_A_and_B_are_saved(backend, inplace):
    K, N, r = 48, 36, 8
    x = torch.randn(3, 11, K, device=DEVICE, requires_grad=True)
    base = torch.randn(3, 11, N, device=DEVICE, requires_grad=True) * 1
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = apply_secvec_delta(x, base, A, B, 1.0, backend=backend, inplace=inplace)
    assert sorted(shapes) == sorted([(r, K), (N, r)])
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_falls_back_or_autograd_objects_where_unsafe(backend):
    K = N = 20
    x = torch.randn(6, K, device=DEVICE)
    A, B = torch.randn(4, K, device=DEVICE), torch.randn(N, 4, device=DEVICE)
    expect = lambda b: b.double() + secvec_delta_reference(x.double(), A.double(), B.double(), 1.0)  # noqa: E731

    leaf = torch.randn(6, N, device=DEVICE, requires_grad=True)  # autograd forbids in-place on it
    big = torch.randn(6, N + 5, device=DEVICE)  # a view into big: writing would change big
    for base in (leaf, big[:, :N], x.clone()):
        before = base.detach().clone()
        xin = base if base.shape == x.shape and base.data_ptr() != leaf.data_ptr() else x
        if xin is base:  # base aliases x: the kernel would read x while overwriting it
            x_ref = base.detach().clone()
            y = apply_secvec_delta(base, base, A, B, 1.0, backend=backend, inplace=True)
            _close(y, x_ref.double() + secvec_delta_reference(x_ref.double(), A.double(), B.double(), 1.0), f32)
        else:
            y = apply_secvec_delta(x, base, A, B, 1.0, backend=backend, inplace=True)
            _close(y, expect(before), f32)
        assert y.data_ptr() != base.data_ptr() and torch.equal(base.detach(), before)

    # exp saves its output for backward; the version counter must catch the in-place update.
    z = torch.randn(6, K, device=DEVICE, requires_grad=True)
    y = apply_secvec_delta(z, z.exp(), A, B, 1.0, backend=backend, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_raise_one_line(backend):
    x, base = torch.randn(4, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"A \(3, 7\) \(want r x K\)"):
        apply_secvec_delta(x, base, torch.randn(3, 7, device=DEVICE), torch.randn(6, 3, device=DEVICE), 1.0,
                           backend=backend)


@needs_triton
def test_triton_rejects_rank_over_128():
    x, base = torch.randn(4, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="rank 129"):
        sv.SecVecDeltaTriton.apply(x, base, torch.randn(129, 8, device=DEVICE), torch.randn(6, 129, device=DEVICE),
                                   1.0, False)


def test_backend_resolution(monkeypatch):
    monkeypatch.setenv("DIST_SECVEC_BACKEND", "triton")  # no longer read: the config key alone decides
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="security_vector.backend"):
        resolve_backend("cuda", torch.device("cpu"))


@needs_triton
def test_dot_precision_follows_the_given_or_torchs_matmul_precision():
    """fp32 dots are IEEE at "highest", TF32 otherwise; the precision comes from the argument
    (kernels/aot.py compiles for one without touching torch's global setting) or from torch."""
    from dist_secvec.kernels import host

    assert host.dot_config(torch.float32, False, "highest") == (True, "ieee")
    assert host.dot_config(torch.float32, False, "high") == (True, "tf32")
    assert host.dot_config(torch.bfloat16, False, "high") == (False, None)  # 16-bit dots: native
    assert host.dot_config(torch.bfloat16, True, "highest") == (True, "ieee")  # the interpreter's bf16 dot is wrong
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert host.dot_config(torch.float32, False) == (True, "tf32")
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU fallback without the interpreter")
def test_cpu_never_imports_triton_and_refuses_it_without_interpreter():
    code = """
import sys, torch
from dist_secvec.kernels.dispatch import apply_secvec_delta
x, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(5, 2)
apply_secvec_delta(x, torch.zeros(3, 5), A, B, 1.0)
assert "triton" not in sys.modules, "the torch path imported triton"
try:
    apply_secvec_delta(x, torch.zeros(3, 5), A, B, 1.0, backend="triton")
except RuntimeError as e:
    assert "needs a CUDA tensor" in str(e), e
else:
    raise AssertionError("the triton backend ran on CPU without the interpreter")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_triton_in_fresh_process():
    rerun_in_fresh_process(__file__, "triton and not fresh_process and not never_imports")
