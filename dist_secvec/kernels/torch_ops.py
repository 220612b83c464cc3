"""Plain-torch path and reference for the frozen security-vector delta.

Forward:   y  = base_out + s * (x A^T) B^T           x: (..., K), A: (r, K), B: (N, r)
Backward:  dx = s * (dy B) A   (plus dy W, which flows through base_out's own graph)
           d(base_out) = dy;  A and B get no gradient.

Only A and B are saved for backward: x is not needed for dx, and nothing of size M x K or M x N
is kept for the delta. This is the CPU training path and the numerics contract the Triton
kernel (secvec_delta.py) is tested against. Both paths share the in-place rules below.
"""

import threading

import torch


def secvec_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * (x A^T) B^T in x's dtype (A and B are cast to it), differentiable in x only."""
    return ((x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()) * scale


def check_shapes(x: torch.Tensor, base_out, A: torch.Tensor, B: torch.Tensor) -> None:
    """Raise one readable line when x (..., K), base_out (..., N), A (r, K), B (N, r) disagree
    (base_out: the output tensor or its shape)."""
    out_shape = base_out if isinstance(base_out, torch.Size) else base_out.shape
    ok = (A.dim() == 2 and B.dim() == 2 and x.dim() >= 1 and x.shape[-1] == A.shape[1]
          and B.shape[1] == A.shape[0] and out_shape[:-1] == x.shape[:-1]
          and out_shape[-1] == B.shape[0])
    if not ok:
        raise ValueError(f"security vector shapes disagree: x {tuple(x.shape)}, base_out "
                         f"{tuple(out_shape)}, A {tuple(A.shape)} (want r x K), B {tuple(B.shape)} "
                         "(want N x r); was the vector trained for this model?")


def rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """t as a (rows, last dim) view sharing its storage, or None when its strides forbid one."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def can_update_in_place(x: torch.Tensor, base_out: torch.Tensor) -> bool:
    """Whether base_out may be overwritten with the result (the caller asked for inplace=True).

    Falls back to a fresh output, which costs one extra M x N buffer, when autograd forbids or
    complicates the in-place write: base_out is a leaf that requires grad, or a view (writing
    through it would rewrite its base's history, and views of leaves or of split/unbind outputs
    refuse that), or an inference tensor outside inference mode; or when it shares storage with
    x, which the kernel still reads while writing. One case cannot be seen from here: another op
    that saved base_out for its own backward (e.g. torch.exp saves its output). Autograd's
    version counter catches that at backward ("modified by an inplace operation"); such callers
    must pass inplace=False.
    """
    if base_out.is_leaf and base_out.requires_grad:
        return False
    if base_out._base is not None:
        return False
    if base_out.is_inference() and not torch.is_inference_mode_enabled():
        return False
    if base_out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return False
    return True


def shrink(rows: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """rows @ P^T, the rank-r projection of M long rows (rows: M x K, P: r x K), computed as
    (P rows^T)^T: the same products, with the long M dimension last, which CPU BLAS runs
    several times faster than the tall-skinny form (benchmarks/bench_secvec_delta.py);
    the result is a transposed view, which the following matmuls take as it is."""
    return (P @ rows.t()).t()


def add_expand(ctx, base_out: torch.Tensor, rows, t: torch.Tensor, Bt: torch.Tensor, scale: float) -> torch.Tensor:
    """base_out + scale * t @ Bt: one addmm into the output when the dtypes agree (no M x N delta
    tensor), into `rows` (base_out's own rows, marked dirty) when updating in place."""
    N = base_out.shape[-1]
    if base_out.dtype == t.dtype:
        if rows is not None:
            rows.addmm_(t, Bt, alpha=scale)
        else:
            return torch.addmm(base_out.reshape(-1, N), t, Bt, alpha=scale).view(base_out.shape)
    else:
        delta = ((t @ Bt) * scale).to(base_out.dtype)
        if rows is not None:
            rows.add_(delta)
        else:
            return base_out + delta.view(base_out.shape)
    ctx.mark_dirty(base_out)
    return base_out


class SecVecDeltaTorch(torch.autograd.Function):
    """base_out + s * (x A^T) B^T, saving only A and B for backward.

    addmm folds the delta into the output, so no M x N delta tensor is made when base_out has
    x's dtype; inplace=True writes into base_out itself where can_update_in_place allows.
    """

    @staticmethod
    def forward(ctx, x, base_out, A, B, scale, inplace=False):
        check_shapes(x, base_out, A, B)
        K = x.shape[-1]
        rows = rows_view(base_out) if inplace and can_update_in_place(x, base_out) else None
        t = shrink(x.reshape(-1, K), A.to(x.dtype))
        out = add_expand(ctx, base_out, rows, t, B.to(x.dtype).t(), scale)
        ctx.save_for_backward(A, B)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        A, B = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dy2d = dy.reshape(-1, B.shape[0])
            dx = (shrink(dy2d, B.to(dy.dtype).t()) @ A.to(dy.dtype)).mul_(ctx.scale)
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return dx, dy, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Frozen vector + trainable LoRA on the same layer (QLoRA): one shrink over x for both.
#
#   h = x [A_v; A_l]^T = [h_v, h_l]                    (M, r_v + r_l), one pass over x
#   y = base_out + s_v h_v B_v^T + s_l h_l B_l^T
#   g = dy [B_v, B_l] = [g_v, g_l]                     (M, r_v + r_l), one pass over dy
#   dx = s_v g_v A_v + s_l g_l A_l      dA_l = s_l g_l^T x      dB_l = s_l dy^T h_l
#   d(base_out) = dy;  A_v and B_v get no gradient.
# Saved for backward: A_v, B_v, A_l, B_l, and x / h_l only when A_l / B_l need gradients.
# ---------------------------------------------------------------------------------------------


def secvec_lora_delta_reference(x: torch.Tensor, A_v: torch.Tensor, B_v: torch.Tensor, s_v: float,
                                A_l: torch.Tensor, B_l: torch.Tensor, s_l: float) -> torch.Tensor:
    """s_v (x A_v^T) B_v^T + s_l (x A_l^T) B_l^T in x's dtype, plain autograd (the float64 oracle)."""
    return (secvec_delta_reference(x, A_v, B_v, s_v)
            + ((x @ A_l.to(x.dtype).t()) @ B_l.to(x.dtype).t()) * s_l)


def check_lora_shapes(x: torch.Tensor, base_out: torch.Tensor, A_v: torch.Tensor, B_v: torch.Tensor,
                      A_l: torch.Tensor, B_l: torch.Tensor) -> None:
    """check_shapes for the vector, then the same one-line check for the LoRA pair."""
    check_shapes(x, base_out, A_v, B_v)
    ok = (A_l.dim() == 2 and B_l.dim() == 2 and A_l.shape[1] == x.shape[-1]
          and B_l.shape[1] == A_l.shape[0] and B_l.shape[0] == base_out.shape[-1])
    if not ok:
        raise ValueError(f"LoRA shapes disagree with the layer: x {tuple(x.shape)}, base_out "
                         f"{tuple(base_out.shape)}, lora A {tuple(A_l.shape)} (want r x K), lora B "
                         f"{tuple(B_l.shape)} (want N x r)")


def lora_grads(ctx, dy2d: torch.Tensor, g_l: torch.Tensor | None):
    """dA_l = s_l g_l^T x and dB_l = s_l dy^T h_l, each only when needed; ctx holds x2d / h_l as
    saved by the forward. The products run in x's dtype (fp32 accumulation); the result is cast to
    the LoRA weight's own dtype before s_l is applied (a float32 LoRA on a bf16 x: the backward of
    the forward's rounding cast, then one fp32 multiply). Shared by the torch and Triton paths."""
    need_a, need_b = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    dA = dB = None
    if need_a:
        dA = (g_l.t() @ ctx.x2d).to(ctx.a_l_dtype).mul_(ctx.s_l)
    if need_b:
        dB = (dy2d.t() @ ctx.h_l.to(dy2d.dtype)).to(ctx.b_l_dtype).mul_(ctx.s_l)
    return dA, dB


def save_for_lora_backward(ctx, x2d, h_l, A_v, B_v, A_l, B_l, s_v, s_l, x_shape, x_dtype):
    """Save A_v, B_v, A_l, B_l always; x only if A_l needs a gradient, h_l only if B_l does."""
    need_a, need_b = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    ctx.save_for_backward(A_v, B_v, A_l, B_l, x2d if need_a else None, h_l if need_b else None)
    ctx.s_v, ctx.s_l, ctx.x_shape, ctx.x_dtype = s_v, s_l, x_shape, x_dtype
    ctx.a_l_dtype, ctx.b_l_dtype = A_l.dtype, B_l.dtype


def unpack_lora_saved(ctx):
    A_v, B_v, A_l, B_l, x2d, h_l = ctx.saved_tensors
    ctx.x2d, ctx.h_l = x2d, h_l
    return A_v, B_v, A_l, B_l


class SecVecLoraDeltaTorch(torch.autograd.Function):
    """base_out + s_v (x A_v^T) B_v^T + s_l (x A_l^T) B_l^T with one shrink matmul over x.

    Exact gradients for x, base_out, A_l and B_l; none for A_v, B_v. All four weights are cast to
    x's dtype for the matmuls (as secvec_delta does); dA_l / dB_l come back in A_l's / B_l's dtype
    (the dtype rule of a float32 LoRA on a 16-bit x: kernels/secvec_lora_delta.py, "Dtypes").
    The expand is one addmm of [s_v h_v, s_l h_l] with [B_v, B_l] into base_out (one pass over
    the output); inplace follows SecVecDeltaTorch.
    """

    @staticmethod
    def forward(ctx, x, base_out, A_v, B_v, s_v, A_l, B_l, s_l, inplace=False):
        check_lora_shapes(x, base_out, A_v, B_v, A_l, B_l)
        K, r_v = x.shape[-1], A_v.shape[0]
        dt = x.dtype
        rows = rows_view(base_out) if inplace and can_update_in_place(x, base_out) else None
        x2d = x.reshape(-1, K)
        h = shrink(x2d, torch.cat([A_v.to(dt), A_l.to(dt)]))  # the one pass over x
        h_l = h[:, r_v:]
        hs = torch.cat([h[:, :r_v] * s_v, h_l * s_l], dim=1)
        out = add_expand(ctx, base_out, rows, hs, torch.cat([B_v.to(dt), B_l.to(dt)], dim=1).t(), 1.0)
        save_for_lora_backward(ctx, x2d, h_l, A_v, B_v, A_l, B_l, s_v, s_l, x.shape, dt)
        return out

    @staticmethod
    def backward(ctx, dy):
        A_v, B_v, A_l, B_l = unpack_lora_saved(ctx)
        N, r_v, dt = B_v.shape[0], A_v.shape[0], dy.dtype
        dy2d = dy.reshape(-1, N)
        g = shrink(dy2d, torch.cat([B_v.to(dt), B_l.to(dt)], dim=1).t())  # the one pass over dy for dx and dA_l
        g_l = g[:, r_v:]
        dx = None
        if ctx.needs_input_grad[0]:
            gs = torch.cat([g[:, :r_v] * ctx.s_v, g_l * ctx.s_l], dim=1)
            dx = (gs @ torch.cat([A_v.to(dt), A_l.to(dt)])).view(ctx.x_shape).to(ctx.x_dtype)
        dA, dB = lora_grads(ctx, dy2d, g_l.to(ctx.x2d.dtype) if ctx.x2d is not None else None)
        return dx, dy, None, None, None, dA, dB, None, None


# ---------------------------------------------------------------------------------------------
# Frozen vector on a trainable dense linear (full fine-tuning): the vector as a weight delta.
#
#   W' = W + s B A                                      (N, K), formed per call, never kept
#   y  = x W'^T + b                                     = x W^T + b + s (x A^T) B^T
#   dx = dy W'  (W' formed again)     dW = dy^T x     db = sum over rows of dy
#   A and B get no gradient. Saved for backward: x and W, what a plain linear saves.
# The same math as base_out + delta, computed differently: the delta path reads and writes the
# M x N output once more, reads dy once more for dy B, and autograd adds two M x K input
# gradients; here two N x K passes (forming W' in forward and backward) replace all of that,
# which is cheaper once the rows per call M reach N K / (K + N) (weight_delta_pays).
# ---------------------------------------------------------------------------------------------


def weight_delta_pays(rows: int, K: int, N: int) -> bool:
    """Whether forming W' = W + s B A (N x K, twice a step) costs less than the delta's own passes
    over M = rows rows (M x N output and dy, M x K input gradient): M (K + N) >= N K. Both FLOP
    counts (2 N K r vs 2 M r (K + N) per pass) and memory traffic follow the same ratio."""
    return rows * (K + N) >= N * K


#: one reusable N x K buffer per (shape, dtype, thread, inference mode) for W' on CPU (merged_weight)
_WORKSPACES: dict = {}


def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A in W's dtype (A and B cast to it), one addmm.

    On CPU it is written into a workspace kept per shape, dtype and thread and shared by all layers
    of that shape: W' is dead once the matmul that reads it returns, and torch's CPU allocator gives
    a fresh tensor of this size back to the OS on free, so a new one page-faults on every call.
    The memory: one N x K tensor per distinct layer shape.
    On other devices (CUDA's caching allocator has no such cost) a fresh tensor."""
    A, B = A.to(W.dtype), B.to(W.dtype)
    if W.device.type != "cpu":
        return torch.addmm(W, B, A, alpha=scale)
    # an inference-mode buffer cannot be written outside inference mode (nor a normal one inside
    # it without being an inference tensor): one per mode
    key = (tuple(W.shape), W.dtype, threading.get_ident(), torch.is_inference_mode_enabled())
    buf = _WORKSPACES.get(key)
    if buf is None:
        buf = _WORKSPACES[key] = torch.empty_like(W, memory_format=torch.contiguous_format)
    return torch.addmm(W, B, A, alpha=scale, out=buf)


def release_workspaces() -> None:
    """Drop merged_weight's CPU buffers (detach_security_vector calls it)."""
    _WORKSPACES.clear()


def check_weight_shapes(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """check_shapes for a layer given by its weight W (N x K) instead of its output."""
    if W.dim() != 2 or W.shape[1] != x.shape[-1]:
        raise ValueError(f"security vector: layer weight {tuple(W.shape)} does not take x {tuple(x.shape)}")
    check_shapes(x, torch.Size((*x.shape[:-1], W.shape[0])), A, B)


class SecVecWeightDeltaTorch(torch.autograd.Function):
    """x (W + s B A)^T + b with W (and b) trainable and A, B frozen: a dense linear layer and its
    vector in one Function, for full fine-tuning (see the block comment above for the math).

    Gradients for x, W and b are those of the plain layer with the delta: dW and db are exactly
    dy^T x and the row sum of dy, dx = dy W + s (dy B) A formed as dy W'. A and B never get one.
    In a 16-bit dtype W' is rounded to it (as folding the vector into the weight is).
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scale):
        check_weight_shapes(x, W, A, B)
        ctx.save_for_backward(x, W, A, B)
        ctx.scale = scale
        return torch.nn.functional.linear(x, merged_weight(W, A, B, scale), bias)

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B = ctx.saved_tensors
        N, K = W.shape
        dy2d = dy.reshape(-1, N)
        dx = dW = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2d @ merged_weight(W, A, B, ctx.scale)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dW = dy2d.t() @ x.reshape(-1, K)
        if ctx.needs_input_grad[2]:
            db = dy2d.sum(0)
        return dx, dW, db, None, None, None
