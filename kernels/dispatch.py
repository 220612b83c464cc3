"""Dispatch for the frozen security-vector delta: the Triton kernel on CUDA, plain torch elsewhere.

    y = base(x) + s * (x A^T) B^T        A: r x K, B: N x r (frozen), s = alpha / r
    dx = dy W + s * (dy B) A             no gradient for A or B

DIST_SECVEC_BACKEND=torch|triton (or the security_vector.backend config key) forces one.
"""

import os

import torch

from dist_secvec_kernels.reference import SecVecDeltaTorch, secvec_delta_reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> triton on CUDA, torch elsewhere; the environment variable wins over config."""
    backend = os.environ.get("DIST_SECVEC_BACKEND", backend) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"security vector backend {backend!r} is not one of {', '.join(BACKENDS)} "
                         "(check DIST_SECVEC_BACKEND / security_vector.backend)")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def apply_secvec_delta(x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scale: float, backend: str = "auto") -> torch.Tensor:
    """Return base_out + scale * (x A^T) B^T with the vector frozen (no grad for A, B)."""
    if resolve_backend(backend, x.device) == "triton":
        from dist_secvec_kernels.secvec_delta import SecVecDeltaTriton  # Triton is imported only when used

        return SecVecDeltaTriton.apply(x, base_out, A, B, scale)
    return SecVecDeltaTorch.apply(x, base_out, A, B, scale)


__all__ = ["apply_secvec_delta", "resolve_backend", "secvec_delta_reference", "SecVecDeltaTorch"]
