"""Plain-torch path and reference for the frozen security-vector delta.

Forward:   y  = base_out + s * (x A^T) B^T           x: (..., K), A: (r, K), B: (N, r)
Backward:  dx = s * (dy B) A   (plus dy W, which flows through base_out's own graph)
           d(base_out) = dy;  A and B get no gradient.

Only A and B are saved for backward: x is not needed for dx, and nothing of size M x K or M x N
is kept for the delta. This is the CPU training path and the numerics contract the Triton
kernel (secvec_delta.py) is tested against. Both paths share the in-place rules below.
"""

import torch


def secvec_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * (x A^T) B^T in x's dtype (A and B are cast to it), differentiable in x only."""
    return ((x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()) * scale


def check_shapes(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """Raise one readable line when x (..., K), base_out (..., N), A (r, K), B (N, r) disagree."""
    ok = (A.dim() == 2 and B.dim() == 2 and x.dim() >= 1 and x.shape[-1] == A.shape[1]
          and B.shape[1] == A.shape[0] and base_out.shape[:-1] == x.shape[:-1]
          and base_out.shape[-1] == B.shape[0])
    if not ok:
        raise ValueError(f"security vector shapes disagree: x {tuple(x.shape)}, base_out "
                         f"{tuple(base_out.shape)}, A {tuple(A.shape)} (want r x K), B {tuple(B.shape)} "
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


class SecVecDeltaTorch(torch.autograd.Function):
    """base_out + s * (x A^T) B^T, saving only A and B for backward.

    addmm folds the delta into the output, so no M x N delta tensor is made when base_out has
    x's dtype; inplace=True writes into base_out itself where can_update_in_place allows.
    """

    @staticmethod
    def forward(ctx, x, base_out, A, B, scale, inplace=False):
        check_shapes(x, base_out, A, B)
        K, N = x.shape[-1], base_out.shape[-1]
        rows = rows_view(base_out) if inplace and can_update_in_place(x, base_out) else None
        t = x.reshape(-1, K) @ A.to(x.dtype).t()
        Bt = B.to(x.dtype).t()
        if base_out.dtype == x.dtype:
            if rows is not None:
                rows.addmm_(t, Bt, alpha=scale)
            else:
                out = torch.addmm(base_out.reshape(-1, N), t, Bt, alpha=scale).view(base_out.shape)
        else:
            delta = ((t @ Bt) * scale).to(base_out.dtype)
            if rows is not None:
                rows.add_(delta)
            else:
                out = base_out + delta.view(base_out.shape)
        if rows is not None:
            ctx.mark_dirty(base_out)
            out = base_out
        ctx.save_for_backward(A, B)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        A, B = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dy2d = dy.reshape(-1, B.shape[0])
            dx = ((dy2d @ B.to(dy.dtype)) @ A.to(dy.dtype)).mul_(ctx.scale)
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return dx, dy, None, None, None, None
