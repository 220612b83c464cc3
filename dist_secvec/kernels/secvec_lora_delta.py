"""Fused Triton kernel for a frozen security vector and a trainable LoRA on the same layer (QLoRA).

    forward:   h_v = x A_v^T,  h_l = x A_l^T                    one pass over x for both shrinks
               y   = base_out + s_v h_v B_v^T + s_l h_l B_l^T
    backward:  g_v = dy B_v,   g_l = dy B_l                     one pass over dy for both shrinks
               dx   = s_v g_v A_v + s_l g_l A_l                 (dy W flows through base_out's graph)
               dA_l = s_l g_l^T x       dB_l = s_l dy^T h_l     d(base_out) = dy; none for A_v, B_v

    x: (..., K), A_v: (r_v, K), B_v: (N, r_v), A_l: (r_l, K), B_l: (N, r_l)

Both directions are one double low-rank update
    out = base + s_v (inp P_v^T) Q_v^T + s_l (inp P_l^T) Q_l^T,   t_l = inp P_l^T written out
with (P, Q) = (A, B) forward (t_l = h_l, saved for dB_l) and (B^T, A^T) backward (t_l = g_l, used
for dA_l). Each program owns a BLOCK_M row block: every x (dy) tile it loads feeds two dots, into
the BLOCK_M x rv_pad and BLOCK_M x rl_pad fp32 accumulators, so x is read once for both shrinks;
then it walks its share of the N blocks writing base + both expands straight into the output.
Only the LoRA intermediate t_l (M x r_l, what peft's lora_B saves anyway) reaches memory; the
vector's stays in registers. dA_l and dB_l are reductions over M, left to torch's matmul
(torch_ops.lora_grads): g_l^T x reads x once, dy^T h_l reads dy a second time.

Numerics follow the torch path (torch_ops.SecVecLoraDeltaTorch) and secvec_delta.py: fp32
accumulation, t rounded to the input dtype before the expand, s applied in fp32 to each expand's
fp32 result, IEEE fp32 dot unless torch allows TF32. Each rank is padded on its own to a power of
two >= 16 (tl.dot's minimum); r_v, r_l <= 128.

Dtypes: the math runs in x's dtype (dy's in backward). All four weights are rounded to it first
(on the host, r x K / N x r copies, so the interpreter's fp32 upcast of bf16 sees the same
rounded weights as a GPU's bf16 dot); the usual case is a float32 LoRA (peft keeps adapters in
float32 on a 16-bit base) on bf16/fp16 x. dA_l and dB_l are computed in x's dtype with fp32
accumulation and come back in A_l's / B_l's own dtype: the backward of that rounding cast, so a
float32 LoRA parameter gets a float32 gradient (of bf16/fp16 precision). peft would instead cast x
up to float32 for the LoRA product; the two agree within the 16-bit dtype's tolerance.

Saved for backward: A_v, B_v, A_l, B_l, and x (only if A_l needs a gradient) and h_l (only if B_l
does). x is what peft's lora_A saves anyway. inplace=True writes into base_out under the rules of
torch_ops.can_update_in_place.
"""

import torch
import triton
import triton.language as tl

from dist_secvec.kernels import host
from dist_secvec.kernels.torch_ops import check_lora_shapes, lora_grads, save_for_lora_backward, unpack_lora_saved


@triton.jit
def _two_lowrank_update_kernel(
    INP, PV, QV, PL, QL, TL, BASE, OUT,
    M, K, N, RV, RL, scale_v, scale_l,
    stride_im, stride_ik, stride_pvr, stride_pvk, stride_qvn, stride_qvr,
    stride_plr, stride_plk, stride_qln, stride_qlr, stride_tm, stride_tr,
    stride_bm, stride_bn, stride_om, stride_on,
    HAS_BASE: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    RV_PAD: tl.constexpr, RL_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < M
    rm64 = rm.to(tl.int64)  # M x K and M x N offsets pass 2**31 at long sequences x wide layers
    rv = tl.arange(0, RV_PAD)
    mask_v = rv < RV
    rl = tl.arange(0, RL_PAD)
    mask_l = rl < RL
    dot_ty = tl.float32 if DOT_FP32 else INP.dtype.element_ty

    t_v = tl.zeros((BLOCK_M, RV_PAD), dtype=tl.float32)
    t_l = tl.zeros((BLOCK_M, RL_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        inp = tl.load(INP + rm64[:, None] * stride_im + rk[None, :] * stride_ik,
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(dot_ty)
        pv_t = tl.load(PV + rv[None, :] * stride_pvr + rk[:, None] * stride_pvk,
                       mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        pl_t = tl.load(PL + rl[None, :] * stride_plr + rk[:, None] * stride_plk,
                       mask=mask_k[:, None] & mask_l[None, :], other=0.0)
        t_v = tl.dot(inp, pv_t.to(dot_ty), t_v, input_precision=PRECISION)
        t_l = tl.dot(inp, pl_t.to(dot_ty), t_l, input_precision=PRECISION)
    t_v_in = t_v.to(INP.dtype.element_ty)
    t_l_in = t_l.to(INP.dtype.element_ty)
    if tl.program_id(1) == 0:  # the LoRA intermediate: h_l forward (for dB_l), g_l backward (for dA_l)
        tl.store(TL + rm64[:, None] * stride_tm + rl[None, :] * stride_tr, t_l_in,
                 mask=mask_m[:, None] & mask_l[None, :])
    t_v_in = t_v_in.to(dot_ty)
    t_l_in = t_l_in.to(dot_ty)

    # Programs sharing a row block split its N blocks round-robin, each recomputing t (as in
    # secvec_delta.py); only the first stores t_l.
    for nb in range(tl.program_id(1), tl.cdiv(N, BLOCK_N), tl.num_programs(1)):
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        qv_t = tl.load(QV + rn[None, :] * stride_qvn + rv[:, None] * stride_qvr,
                       mask=mask_v[:, None] & mask_n[None, :], other=0.0)
        ql_t = tl.load(QL + rn[None, :] * stride_qln + rl[:, None] * stride_qlr,
                       mask=mask_l[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(t_v_in, qv_t.to(dot_ty), input_precision=PRECISION) * scale_v
        acc += tl.dot(t_l_in, ql_t.to(dot_ty), input_precision=PRECISION) * scale_l
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_BASE:
            base = tl.load(BASE + rm64[:, None] * stride_bm + rn[None, :] * stride_bn, mask=mask, other=0.0)
            acc += base.to(tl.float32)
        tl.store(OUT + rm64[:, None] * stride_om + rn[None, :] * stride_on,
                 acc.to(OUT.dtype.element_ty), mask=mask)


INTERPRETED = host.is_interpreted(_two_lowrank_update_kernel)


def two_lowrank_update(inp: torch.Tensor, Pv: torch.Tensor, Qv: torch.Tensor, scale_v: float,
                       Pl: torch.Tensor, Ql: torch.Tensor, scale_l: float, t_l: torch.Tensor,
                       base: torch.Tensor | None, out: torch.Tensor, split_n: int | None = None) -> torch.Tensor:
    """out = base + scale_v (inp Pv^T) Qv^T + scale_l (inp Pl^T) Ql^T and t_l = inp Pl^T (in
    inp's dtype), on 2-D operands of any strides; out may alias base.

    inp: (M, K), Pv: (r_v, K), Qv: (N, r_v), Pl: (r_l, K), Ql: (N, r_l), t_l: (M, r_l),
    base/out: (M, N). split_n: programs per row block (default: enough to fill the GPU).
    """
    M, K = inp.shape
    RV, RL, N = Pv.shape[0], Pl.shape[0], Qv.shape[0]
    host.check_launch(inp, INTERPRETED, {"security vector": RV, "LoRA": RL})
    if M == 0:
        return out
    rv_pad, rl_pad = host.pad_rank(RV), host.pad_rank(RL)
    dot_fp32, precision = host.dot_config(inp.dtype, INTERPRETED)
    block_m, block_k, block_n, warps = host.blocks(M, K, N, (rv_pad, rl_pad), INTERPRETED, dot_fp32)
    bsrc = base if base is not None else out  # never read when HAS_BASE is False
    _two_lowrank_update_kernel[host.grid(inp, M, N, block_m, block_n, split_n)](
        inp, Pv, Qv, Pl, Ql, t_l, bsrc, out, M, K, N, RV, RL, float(scale_v), float(scale_l),
        inp.stride(0), inp.stride(1), Pv.stride(0), Pv.stride(1), Qv.stride(0), Qv.stride(1),
        Pl.stride(0), Pl.stride(1), Ql.stride(0), Ql.stride(1), t_l.stride(0), t_l.stride(1),
        bsrc.stride(0), bsrc.stride(1), out.stride(0), out.stride(1),
        HAS_BASE=base is not None, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, RV_PAD=rv_pad, RL_PAD=rl_pad,
        num_warps=warps,
    )
    return out


class SecVecLoraDeltaTriton(torch.autograd.Function):
    """base_out + s_v (x A_v^T) B_v^T + s_l (x A_l^T) B_l^T through the fused kernel.

    Gradients for x, base_out, A_l, B_l (exact); None for A_v, B_v and the scales.
    """

    @staticmethod
    def forward(ctx, x, base_out, A_v, B_v, s_v, A_l, B_l, s_l, inplace=False):
        check_lora_shapes(x, base_out, A_v, B_v, A_l, B_l)
        K = x.shape[-1]
        out, out2d, base2d, in_place = host.output_buffers(x, base_out, inplace)
        x2d = x.reshape(-1, K)
        h_l = torch.empty(x2d.shape[0], A_l.shape[0], dtype=x.dtype, device=x.device)
        Av, Bv, Al, Bl = (w.to(x.dtype) for w in (A_v, B_v, A_l, B_l))  # no copy when already x's dtype
        two_lowrank_update(x2d, Av, Bv, s_v, Al, Bl, s_l, h_l, base2d, out2d)
        if in_place:
            ctx.mark_dirty(base_out)
        save_for_lora_backward(ctx, x2d, h_l, A_v, B_v, A_l, B_l, s_v, s_l, x.shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        A_v, B_v, A_l, B_l = (w.to(dy.dtype) for w in unpack_lora_saved(ctx))
        K, N = A_v.shape[1], B_v.shape[0]
        dy2d = dy.reshape(-1, N)
        # dx and g_l are written whole by the kernel, so torch.empty (not zeros) is safe.
        g_l = torch.empty(dy2d.shape[0], A_l.shape[0], dtype=dy.dtype, device=dy.device)
        dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=dy.device)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[5]:
            two_lowrank_update(dy2d, B_v.t(), A_v.t(), ctx.s_v, B_l.t(), A_l.t(), ctx.s_l, g_l, None,
                               dx.view(-1, K))
        dA, dB = lora_grads(ctx, dy2d, g_l.to(ctx.x2d.dtype) if ctx.x2d is not None else None)
        return (dx if ctx.needs_input_grad[0] else None), dy, None, None, None, dA, dB, None, None
