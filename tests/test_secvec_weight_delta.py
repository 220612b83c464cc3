"""The vector on a trainable dense linear as one weight delta: y = x (W + s B A)^T + b
(kernels/torch_ops.py SecVecWeightDeltaTorch), the full fine-tuning path on the torch backend.

Against plain autograd in float64 (x W^T + b + s (x A^T) B^T): same output, same gradients for
x, W and b, none for A and B, and nothing saved for backward beyond what a plain linear saves.
SecVecLinear takes it exactly when `choose_path` picked it at attach and `uses_weight_delta` lets
the call take it, and then gives what the base-then-delta path gives.
"""

import pytest
import torch

from dist_secvec.kernels import torch_ops
from dist_secvec.secvec import (PathOptions, SecurityVector, attach_security_vector, choose_path,
                                detach_security_vector, path_calls, security_vector_off)
from dist_secvec.secvec.layer import uses_weight_delta
from dist_secvec.kernels.dispatch import apply_secvec_weight_delta
from dist_secvec.kernels.torch_ops import weight_delta_pays


def _layer_tensors(lead, K, N, r, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g, dtype=dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g, dtype=dtype) / K**0.5).requires_grad_()
    b = torch.randn(N, generator=g, dtype=dtype).requires_grad_() if bias else None
    A = (torch.randn(r, K, generator=g, dtype=dtype) / K**0.5).requires_grad_()  # frozen by the op anyway
    B = (torch.randn(N, r, generator=g, dtype=dtype) / r**0.5).requires_grad_()
    return x, W, b, A, B


def _plain(x, W, b, A, B, s):
    """The math written out, plain autograd: the oracle."""
    y = x @ W.t() + s * (x @ A.detach().t()) @ B.detach().t()
    return y + b if b is not None else y


@pytest.mark.parametrize("lead,K,N,r,bias", [((37,), 40, 56, 8, True), ((3, 11), 64, 24, 1, False),
                                             ((2, 5, 7), 33, 33, 16, True)])
def test_forward_and_grads_match_float64(lead, K, N, r, bias):
    s = 1.75
    x, W, b, A, B = _layer_tensors(lead, K, N, r, bias=bias)
    dy = torch.randn(*lead, N, dtype=torch.float64)
    y = apply_secvec_weight_delta(x, W, b, A, B, s)
    y.backward(dy)
    got = [x.grad, W.grad] + ([b.grad] if bias else [])
    assert A.grad is None and B.grad is None  # the vector never gets a gradient
    leaves = [t.detach().clone().requires_grad_() for t in (x, W) + ((b,) if bias else ())]
    want_y = _plain(leaves[0], leaves[1], leaves[2] if bias else None, A, B, s)
    want_y.backward(dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g_got, leaf in zip(got, leaves):
        torch.testing.assert_close(g_got, leaf.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, W, b, A, B = _layer_tensors((4, 3), 6, 5, 2)
    assert torch.autograd.gradcheck(lambda x, W, b: apply_secvec_weight_delta(x, W, b, A, B, 0.5), (x, W, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_within_its_rounding(dtype):
    """W' = W + s B A is rounded to the 16-bit dtype (as folding the vector into the weight is):
    the output and gradients stay within that dtype's tolerance of float64."""
    s = 2.0
    x, W, b, A, B = _layer_tensors((48,), 64, 80, 8)
    lo = [t.detach().to(dtype).requires_grad_() for t in (x, W, b)]
    dy = torch.randn(48, 80, dtype=torch.float64)
    y = apply_secvec_weight_delta(lo[0], lo[1], lo[2], A.detach().to(dtype), B.detach().to(dtype), s)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype and all(t.grad.dtype == dtype for t in lo)
    want = _plain(x, W, b, A, B, s)
    want.backward(dy)
    tol = dict(rtol=0.05, atol=0.05 * float(want.detach().abs().max()))
    torch.testing.assert_close(y.double(), want, **tol)
    for t, ref in zip(lo, (x, W, b)):
        torch.testing.assert_close(t.grad.double(), ref.grad, rtol=0.05, atol=0.05 * float(ref.grad.abs().max()))


def test_saves_only_what_a_plain_linear_saves():
    """Saved for backward: x and W (a plain nn.Linear saves the same), plus the small A and B;
    no M x N or M x K tensor for the vector."""
    x, W, b, A, B = _layer_tensors((64,), 32, 48, 4, dtype=torch.float32)
    A, B = A.detach(), B.detach()

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())
    plain = saved_bytes(lambda: torch.nn.functional.linear(x, W, b))
    fused = saved_bytes(lambda: apply_secvec_weight_delta(x, W, b, A, B, 1.0))
    assert fused == plain + (A.numel() + B.numel()) * 4, (fused, plain)


def test_workspace_serves_layers_of_one_shape_and_inference_mode():
    """W' goes into one CPU buffer per shape: two layers of that shape in a row each get their own
    W' (the buffer is dead once the matmul returns), also across inference mode and back."""
    x, W1, b, A, B = _layer_tensors((20,), 16, 16, 3, dtype=torch.float32, seed=1)
    _, W2, _, A2, B2 = _layer_tensors((20,), 16, 16, 3, dtype=torch.float32, seed=2)
    A, B, A2, B2 = A.detach(), B.detach(), A2.detach(), B2.detach()
    with torch.inference_mode():
        y_inf = apply_secvec_weight_delta(x.detach(), W1.detach(), b.detach(), A, B, 1.5)
    h = apply_secvec_weight_delta(x, W1, b, A, B, 1.5)
    y = apply_secvec_weight_delta(h, W2, None, A2, B2, 0.5)
    y.square().sum().backward()
    want_h = _plain(x.detach(), W1.detach(), b.detach(), A, B, 1.5)
    torch.testing.assert_close(h.detach(), want_h)
    torch.testing.assert_close(y_inf, want_h)
    torch.testing.assert_close(y.detach(), _plain(want_h, W2.detach(), None, A2, B2, 0.5))
    leaves = [t.detach().clone().requires_grad_() for t in (x, W1, b, W2)]
    _plain(_plain(leaves[0], leaves[1], leaves[2], A, B, 1.5), leaves[3], None, A2, B2, 0.5).square().sum().backward()
    for got, leaf in zip((x.grad, W1.grad, b.grad, W2.grad), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-5 * float(leaf.grad.abs().max()))


def test_shape_mismatch_is_one_line():
    x, W, b, A, B = _layer_tensors((5,), 8, 6, 2)
    with pytest.raises(ValueError, match=r"layer weight \(6, 7\) does not take x \(5, 8\)"):
        apply_secvec_weight_delta(x, W[:, :7], b, A, B, 1.0)
    with pytest.raises(ValueError, match="was the vector trained for this model"):
        apply_secvec_weight_delta(x, W, b, A, B[:5], 1.0)


def test_pays_rule():
    assert weight_delta_pays(1024, 512, 1344)  # the profile benchmark's MLP layer
    assert not weight_delta_pays(1, 512, 1344)  # one decoded token
    assert weight_delta_pays(372, 512, 1344) and not weight_delta_pays(370, 512, 1344)  # N K / (K + N) = 370.9


# ---------------------------------------------------------------------------------------------
# SecVecLinear: which path, and the same result either way


class Net(torch.nn.Module):
    def __init__(self, K=24, N=20, bias=True):
        super().__init__()
        self.proj = torch.nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _attached(bias=True, backend="torch", r=6, rows=16, **options):
    torch.manual_seed(0)
    net = Net(bias=bias)
    sv = SecurityVector(path="mem", rank=r, alpha=2.0 * r, target_modules=["proj"],
                        weights={"proj": (torch.randn(r, 24), torch.randn(20, r))})
    (layer,) = attach_security_vector(net, sv, PathOptions(backend=backend, rows_per_call=rows, **options))
    return net, layer


def _step(net, x0):
    x = x0.clone().requires_grad_(True)
    y = net(x)
    y.square().sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_layer_takes_the_weight_delta_and_matches_the_delta_path(bias):
    net, layer = _attached(bias=bias, rows=15)
    x0 = torch.randn(3, 5, 24)  # 15 rows x (24 + 20) >= 20 x 24: the weight delta pays
    assert layer.path == "weight_delta"
    y_wd, g_wd = _step(net, x0)
    assert layer.path_calls == {"weight_delta": 1, "delta": 0, "fused_lora": 0}
    layer.path = "delta"  # what attach picks with security_vector.weight_delta=false
    y_d, g_d = _step(net, x0)
    assert layer.path_calls == {"weight_delta": 1, "delta": 1, "fused_lora": 0}
    # float32, the same math rounded differently (x W'^T vs x W^T + s (x A^T) B^T)
    torch.testing.assert_close(y_wd, y_d, rtol=1e-5, atol=1e-5 * float(y_d.abs().max()))
    for a, b in zip(g_wd, g_d):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert layer.secvec_A.grad is None and layer.secvec_B.grad is None
    with security_vector_off(net):  # off: the plain layer, no path counted
        torch.testing.assert_close(net(x0), torch.nn.functional.linear(x0, layer.weight, layer.bias))
    assert path_calls([layer, layer]) == {"weight_delta": 2, "delta": 2, "fused_lora": 0}
    assert torch_ops._WORKSPACES  # the W' buffer of this shape, kept between calls ...
    assert detach_security_vector(net) == 1 and not torch_ops._WORKSPACES  # ... until the vector goes


def test_layer_keeps_the_delta_path_where_the_weight_delta_does_not_fit():
    net, layer = _attached(rows=2)  # 2 rows per call: forming W' would cost more than the delta
    assert layer.path == "delta" and "too few" in layer.path_reason
    _, layer16 = _attached(rows=16)
    assert layer16.path == "weight_delta" and uses_weight_delta(layer16, torch.randn(16, 24))
    assert not uses_weight_delta(layer16, torch.randn(16, 24, dtype=torch.float64))  # x not in W's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_weight_delta(layer16, torch.randn(16, 24))
    _, tri = _attached(backend="triton")  # the Triton kernel keeps the delta path (decided before any launch)
    assert tri.path == "delta"
    _, off = _attached(weight_delta=False)
    assert off.path == "delta" and off.path_reason == "security_vector.weight_delta=false"
    _, gated = _attached(gated=True)
    assert gated.path == "delta"
    net(torch.randn(2, 24))
    assert layer.path_calls["delta"] == 1 and layer.path_calls["weight_delta"] == 0


def test_quantized_base_keeps_the_delta_path():
    """A bitsandbytes 4-bit linear subclasses nn.Linear but has its own forward: never the weight delta."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    net = Net(K=64, N=64, bias=False)
    q = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(net.proj.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    net.proj = q
    sv = SecurityVector(path="mem", rank=4, alpha=8.0, target_modules=["proj"],
                        weights={"proj": (torch.randn(4, 64), torch.randn(64, 4))})
    (layer,) = attach_security_vector(net, sv, PathOptions(backend="torch", rows_per_call=32))
    assert layer.path == "delta" and "own forward" in layer.path_reason
    assert choose_path(net.proj.base_layer, None, torch.device("cpu"), PathOptions(rows_per_call=32))[0] == "delta"
    x = torch.randn(32, 64)
    net(x)
    assert layer.path_calls["delta"] == 1
