"""Fused Triton kernel for the frozen security-vector delta.

    forward:   y  = base_out + s * (x A^T) B^T        x: (..., K), A: (r, K), B: (N, r), s = alpha / r
    backward:  dx = s * (dy B) A                      d(base_out) = dy; no gradient for A or B

Both directions are one low-rank update  out = base + s * (inp @ P^T) @ Q^T  with
(P, Q) = (A, B) forward and (B^T, A^T) backward, so one kernel serves both. Each program owns a
BLOCK_M row block: it accumulates t = inp_blk @ P^T (BLOCK_M x r_pad, fp32) over K, keeps it in
registers, then walks its share of the N blocks writing base + s * t @ Q_blk^T straight into the
output. No M x r or M x N intermediate ever reaches memory; the only M x N / M x K tensors are
the output itself (base_out, when updated in place) and dx.

Numerics follow the torch path (kernels/torch_ops.py): fp32 accumulation, t rounded to the input
dtype before the expand matmul (as (x @ A^T) @ B^T does in torch), s applied in fp32, and fp32
inputs use IEEE fp32 dot unless torch allows TF32 (torch.set_float32_matmul_precision).
r is padded to a power of two >= 16 (tl.dot's minimum) with masked loads; r <= 128 keeps the
BLOCK_M x r_pad accumulator in registers.

Only A and B are saved for backward. With inplace=True the output is base_out itself
(ctx.mark_dirty), when torch_ops.can_update_in_place allows it; see that function for the cases
that fall back to a fresh output and for the one autograd catches at backward.
"""

import torch
import triton
import triton.language as tl

from dist_secvec.kernels import host
from dist_secvec.kernels.torch_ops import check_shapes


@triton.jit
def _lowrank_update_kernel(
    INP, P, Q, BASE, OUT,
    M, K, N, R, scale,
    stride_im, stride_ik, stride_pr, stride_pk, stride_qn, stride_qr,
    stride_bm, stride_bn, stride_om, stride_on,
    HAS_BASE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rm64 = rm.to(tl.int64)  # M x K and M x N offsets pass 2**31 at long sequences x wide layers
    rr = tl.arange(0, R_PAD)
    mask_r = rr < R
    dot_ty = tl.float32 if DOT_FP32 else INP.dtype.element_ty

    t = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        inp = tl.load(INP + rm64[:, None] * stride_im + rk[None, :] * stride_ik,
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        p_t = tl.load(P + rr[None, :] * stride_pr + rk[:, None] * stride_pk,
                      mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        t = tl.dot(inp.to(dot_ty), p_t.to(dot_ty), t, input_precision=PRECISION)
    t_in = t.to(INP.dtype.element_ty).to(dot_ty)

    # Programs sharing a row block split its N blocks round-robin; each recomputes t, which costs
    # 2*r*K per row against the 2*r*N it saves from serialising N on one program.
    for nb in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        q_t = tl.load(Q + rn[None, :] * stride_qn + rr[:, None] * stride_qr,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(t_in, q_t.to(dot_ty), input_precision=PRECISION) * scale
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_BASE:
            base = tl.load(BASE + rm64[:, None] * stride_bm + rn[None, :] * stride_bn, mask=mask, other=0.0)
            acc += base.to(tl.float32)
        tl.store(OUT + rm64[:, None] * stride_om + rn[None, :] * stride_on,
                 acc.to(OUT.dtype.element_ty), mask=mask)


INTERPRETED = host.is_interpreted(_lowrank_update_kernel)


def lowrank_update(inp: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, base: torch.Tensor | None,
                   out: torch.Tensor, scale: float, split_n: int | None = None) -> torch.Tensor:
    """out = base + scale * (inp @ P^T) @ Q^T on 2-D operands of any strides; out may alias base.

    inp: (M, K), P: (r, K), Q: (N, r), base/out: (M, N). split_n: programs per row block
    (default: enough to fill the GPU; 1 in the interpreter).
    """
    M, K = inp.shape
    R, N = P.shape[0], Q.shape[0]
    host.check_launch(inp, INTERPRETED, {"security vector": R})
    if M == 0 or N == 0:
        return out
    r_pad = host.pad_rank(R)
    dot_fp32, precision = host.dot_config(inp.dtype, INTERPRETED)
    block_m, block_k, block_n, warps = host.blocks(M, K, N, (r_pad,), INTERPRETED, dot_fp32)
    bsrc = base if base is not None else out  # never read when HAS_BASE is False
    _lowrank_update_kernel[host.grid(inp, M, N, block_m, block_n, split_n)](
        inp, P, Q, bsrc, out, M, K, N, R, float(scale),
        inp.stride(0), inp.stride(1), P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        bsrc.stride(0), bsrc.stride(1), out.stride(0), out.stride(1),
        HAS_BASE=base is not None, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, R_PAD=r_pad,
        num_warps=warps,
    )
    return out


class SecVecDeltaTriton(torch.autograd.Function):
    """base_out + s * (x A^T) B^T through the fused kernel, saving only A and B for backward."""

    @staticmethod
    def forward(ctx, x, base_out, A, B, scale, inplace=False):
        check_shapes(x, base_out, A, B)
        K = x.shape[-1]
        out, out2d, base2d, in_place = host.output_buffers(x, base_out, inplace)
        lowrank_update(x.reshape(-1, K), A, B, base2d, out2d, scale)
        if in_place:
            ctx.mark_dirty(base_out)
        ctx.save_for_backward(A, B)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            A, B = ctx.saved_tensors
            K, N = A.shape[1], B.shape[0]
            # dx is written whole by the kernel, so torch.empty (not zeros) is safe.
            dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=dy.device)
            lowrank_update(dy.reshape(-1, N), B.t(), A.t(), None, dx.view(-1, K), ctx.scale)
        return dx, dy, None, None, None, None
