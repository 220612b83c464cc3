"""Plain-torch path and reference for the frozen security-vector delta.

Forward:   y  = base_out + s * (x A^T) B^T           x: (..., K), A: (r, K), B: (N, r)
Backward:  dx = s * (dy B) A   (plus dy W, which flows through base_out's own graph)
           d(base_out) = dy;  A and B get no gradient.

Only A and B are saved for backward: x is not needed for dx, and nothing of size M x K or M x N
is kept for the delta. This is the CPU training path and the numerics contract the Triton
kernel is tested against.
"""

import torch


def secvec_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * (x A^T) B^T in x's dtype (A and B are cast to it), differentiable in x only."""
    return ((x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()) * scale


class SecVecDeltaTorch(torch.autograd.Function):
    """base_out + s * (x A^T) B^T, saving only A and B for backward."""

    @staticmethod
    def forward(ctx, x, base_out, A, B, scale):
        ctx.save_for_backward(A, B)
        ctx.scale = scale
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            delta = secvec_delta_reference(x, A, B, scale)
        return base_out + delta.to(base_out.dtype)

    @staticmethod
    def backward(ctx, dy):
        A, B = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (((dy @ B.to(dy.dtype)) @ A.to(dy.dtype)) * ctx.scale).to(ctx.x_dtype)
        return dx, dy, None, None, None
