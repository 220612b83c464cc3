"""Dispatch for the frozen security-vector delta: the Triton kernel on CUDA, plain torch elsewhere.

    y = base(x) + s * (x A^T) B^T        A: r x K, B: N x r (frozen), s = alpha / r
    dx = dy W + s * (dy B) A             no gradient for A or B
    (dy W flows through base_out's own graph; only A and B are saved for the delta)
On a trainable dense linear (full fine-tuning, torch backend) the layer and the vector run as one
Function instead: y = x (W + s B A)^T + b (apply_secvec_weight_delta).

The security_vector.backend config key (torch | triton) forces one.
"""

import torch

from dist_secvec.kernels.torch_ops import (SecVecDeltaTorch, SecVecLoraDeltaTorch, SecVecWeightDeltaTorch,
                                           secvec_delta_reference, secvec_lora_delta_reference)

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA, torch elsewhere."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"security vector backend {backend!r} is not one of {', '.join(BACKENDS)} "
                         "(security_vector.backend)")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def apply_secvec_delta(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scale: float, backend: str = "auto", *, inplace: bool = False) -> torch.Tensor:
    """Return base_out + scale * (x A^T) B^T with the vector frozen (no grad for A, B).

    x: (..., K), base_out: (..., N), A: (r, K), B: (N, r); any dtypes (A and B are cast to x's,
    the result has base_out's). inplace=True lets the result reuse base_out's storage (saves one
    M x N buffer); the caller must not read base_out afterwards, and nothing else may have saved
    it for backward (autograd then raises at backward). See torch_ops.can_update_in_place.
    """
    if resolve_backend(backend, x.device) == "triton":
        # Imported here: without a GPU or TRITON_INTERPRET=1, importing triton fails ("0 active drivers").
        from dist_secvec.kernels.secvec_delta import SecVecDeltaTriton

        return SecVecDeltaTriton.apply(x, base_out, A, B, scale, inplace)
    return SecVecDeltaTorch.apply(x, base_out, A, B, scale, inplace)


def apply_secvec_lora_delta(x: torch.Tensor, base_out: torch.Tensor, A_v: torch.Tensor, B_v: torch.Tensor,
                            s_v: float, A_l: torch.Tensor, B_l: torch.Tensor, s_l: float, backend: str = "auto",
                            *, inplace: bool = False) -> torch.Tensor:
    """Return base_out + s_v (x A_v^T) B_v^T + s_l (x A_l^T) B_l^T, both shrinks in one pass over x.

    The QLoRA case: a frozen security vector (A_v: r_v x K, B_v: N x r_v) and a trainable LoRA
    (A_l: r_l x K, B_l: N x r_l) on the same layer. Gradients: x, base_out, A_l and B_l get exact
    ones (dx = s_v (dy B_v) A_v + s_l (dy B_l) A_l, dA_l = s_l (dy B_l)^T x, dB_l = s_l dy^T h_l);
    A_v and B_v never get one, whatever their requires_grad. The LoRA sees x itself (no dropout).
    Dtypes and inplace as apply_secvec_delta: the math runs in x's dtype with fp32 accumulation,
    all four weights rounded to it; dA_l / dB_l come back in A_l's / B_l's own dtype, so a float32
    LoRA on bf16/fp16 x (peft's default on a 16-bit base) trains float32 parameters with gradients
    of the 16-bit dtype's precision (see secvec_lora_delta.py, "Dtypes").
    """
    if resolve_backend(backend, x.device) == "triton":
        from dist_secvec.kernels.secvec_lora_delta import SecVecLoraDeltaTriton

        return SecVecLoraDeltaTriton.apply(x, base_out, A_v, B_v, s_v, A_l, B_l, s_l, inplace)
    return SecVecLoraDeltaTorch.apply(x, base_out, A_v, B_v, s_v, A_l, B_l, s_l, inplace)


def apply_secvec_weight_delta(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                              B: torch.Tensor, scale: float) -> torch.Tensor:
    """Return x (W + scale * B A)^T + bias: a dense linear layer and its frozen vector in one
    Function, with exact gradients for x, W and bias and none for A and B, saving only x and W
    (torch_ops.SecVecWeightDeltaTorch; the full fine-tuning path on the torch backend). x and W in
    one dtype; A and B are cast to it."""
    return SecVecWeightDeltaTorch.apply(x, W, bias, A, B, scale)


__all__ = ["apply_secvec_delta", "apply_secvec_lora_delta", "apply_secvec_weight_delta", "resolve_backend",
           "secvec_delta_reference", "secvec_lora_delta_reference", "SecVecDeltaTorch", "SecVecLoraDeltaTorch",
           "SecVecWeightDeltaTorch"]
