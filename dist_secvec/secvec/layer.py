"""The layer that applies a frozen security vector: SecVecLinear, and the one rule for its path.

On a linear layer with weight W (N x K) the vector adds
    y = x W^T + s * (x A^T) B^T          A: r x K, B: N x r, s = alpha / r
A and B are frozen parameters (requires_grad False: no .grad, no optimizer state), applied inside
the layer's own forward, where ZeRO-3 has gathered them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager, Iterator, Optional

import torch
from torch import nn

from dist_secvec.kernels.dispatch import apply_secvec_delta, apply_secvec_weight_delta, resolve_backend
from dist_secvec.kernels.torch_ops import weight_delta_pays

log = logging.getLogger(__name__)


PATHS = ("delta", "weight_delta", "fused_lora")


@dataclass(frozen=True)
class PathOptions:
    """What a run allows the vector's forward to take (security_vector.* keys, resolved once)."""

    backend: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | torch | triton
    fused_lora: bool = True  # the vector and a trainable LoRA above it in one kernel
    weight_delta: bool = True  # a dense linear and its vector as x (W + s B A)^T
    gated: bool = False  # every call weights the vector per row (the audit's doubled batch)
    rows_per_call: Optional[int] = None  # tokens per forward (micro-batch x max_length); None = unknown


def choose_path(base_layer: nn.Module, lora_layer: Optional[nn.Module], device: torch.device,
                opts: PathOptions) -> tuple[str, str]:
    """The one rule for how a vectored layer computes y = base(x) + s (x A^T) B^T: (path, why).

    1. gated (every call weights its rows, as the audit's doubled batch does): "delta" (the base
       layer, then the delta on the gated x). Stage 2's gate does not set it: its micro-batches are
       grouped so that most have the vector all on or all off, and only the mixed calls gate.
    2. under a trainable peft LoRA layer: "fused_lora" (the vector's and the LoRA's shrinks in one
       pass over x) when allowed and the LoRA is a plain one (lora.fusable_lora; a call in training
       with LoRA dropout runs peft's forward); else "delta", through peft's own forward.
    3. a plain nn.Linear on the torch backend, with enough rows per call that forming
       W' = W + s B A costs less than the delta's passes over the output (weight_delta_pays):
       "weight_delta" (one Function, one input gradient; the CPU path for full fine-tuning).
    4. otherwise "delta" (Triton on CUDA, torch elsewhere).
    The choice is fixed when the vector is attached; a call that cannot take it (the vector off,
    another dtype, autocast) runs the base layer and the delta, counted in path_calls.
    """
    if opts.gated:
        return "delta", "the vector is gated per row"
    if lora_layer is not None:
        if not opts.fused_lora:
            return "delta", "security_vector.fused_lora=false"
        from dist_secvec.secvec.lora import fusable_lora

        why = fusable_lora(lora_layer)
        return ("fused_lora", "") if not why else ("delta", why)
    if not _plain_linear(base_layer):
        return "delta", f"{type(base_layer).__name__} has its own forward"
    if not opts.weight_delta:
        return "delta", "security_vector.weight_delta=false"
    if resolve_backend(opts.backend, device) != "torch":
        return "delta", "the Triton kernel computes the delta"
    w = base_layer.weight
    N, K = getattr(w, "ds_shape", None) or w.shape  # a ZeRO-3 partitioned weight keeps its shape there
    if opts.rows_per_call is None or not weight_delta_pays(opts.rows_per_call, K, N):
        return "delta", f"{opts.rows_per_call} rows per call are too few to form W + s B A"
    return "weight_delta", ""


def writes_fresh_output(base_layer: nn.Module) -> bool:
    """Whether the delta may be added into the base layer's output in place (saves an M x N copy).
    True for linear layers (torch's, bitsandbytes' 4- and 8-bit ones subclass it), whose backward
    saves x and W but never the output; the kernels still fall back to a fresh output for views,
    leaves and inference tensors (torch_ops.can_update_in_place)."""
    return isinstance(base_layer, nn.Linear)


class SecVecLinear(nn.Module):
    """y = base_layer(x) + s * (x A^T) B^T with A and B frozen; the delta is skipped when inactive.

    Args:
        base_layer: the wrapped linear (nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt).
        A: (r, in_features) shrink, B: (out_features, r) expand.
        scale: alpha / r.
        backend: "auto" | "torch" | "triton" (see dist_secvec.kernels.dispatch).

        path: the computation, chosen once by `choose_path` when the vector is attached.
        segments: several vectors composed into A and B (secvec.compose): [(vector, first row,
            end)] of A's rank rows per vector on this layer; None = one vector.

    On the "fused_lora" path this forward runs only when the LoRA layer above cannot compute both
    (the vector off, adapters disabled): that layer calls `base_layer.base_layer` and adds the
    vector and the LoRA in one kernel (dist_secvec.secvec.lora).
    """

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float,
                 backend: str = "auto", path: str = "delta", segments: Optional[list] = None):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"security vector path {path!r} is not one of {', '.join(PATHS)}")
        self.base_layer = base_layer
        self.secvec_A = nn.Parameter(A, requires_grad=False)
        self.secvec_B = nn.Parameter(B, requires_grad=False)
        self.scale = float(scale)
        self.backend = backend
        self.active = True
        #: the computation chosen at attach (choose_path): "delta", "weight_delta" or "fused_lora"
        #: (the LoRA layer above computes the vector; this forward runs only when it cannot)
        self.path = path
        self.path_reason = ""  # why choose_path did not take a faster path ("" when it did)
        #: per-row weights of the delta for the batch in flight (None = every row 1): 0 trains that
        #: row with the vector off (security_vector.gate); set by `row_gate` around forward + backward
        self.row_gate: Optional[torch.Tensor] = None
        #: forwards per path since attach (run info and profile report them): "weight_delta",
        #: "delta" (base layer, then the delta), "fused_lora" (the LoRA layer above computed both)
        self.path_calls = {"weight_delta": 0, "delta": 0, "fused_lora": 0}
        self.segments = [tuple(g) for g in segments] if segments else [(0, 0, int(A.shape[0]))]
        #: the one vector of several left on (`only_vector`, scoring rows per vector); None = all
        self.only: Optional[int] = None

    # read by peft/transformers code that expects a linear layer here
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.path == "weight_delta" and not args and not kwargs and uses_weight_delta(self, x):
            self.path_calls["weight_delta"] += 1
            base = self.base_layer
            return apply_secvec_weight_delta(x, base.weight, base.bias, self.secvec_A, self.secvec_B, self.scale)
        out = self.base_layer(x, *args, **kwargs)
        if not self.active:
            return out
        A, B = self.secvec_A, self.secvec_B
        if self.only is not None:  # one vector's rank rows alone (scoring: no gradient is taken here)
            rows = [(a, b) for v, a, b in self.segments if v == self.only]
            if not rows:
                return out
            a, b = rows[0]
            A, B = A[a:b], B[:, a:b].contiguous()
        self.path_calls["delta"] += 1
        if self.row_gate is not None:  # the delta is linear in x: gating x gates it, and its dx
            x = x * self.row_gate.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return apply_secvec_delta(x, out, A, B, self.scale, self.backend,
                                  inplace=writes_fresh_output(self.base_layer))

    def extra_repr(self) -> str:
        r, k = self.secvec_A.shape
        several = f", vectors={len(self.segments)}" if len(self.segments) > 1 else ""
        return (f"rank={r}, scale={self.scale:g}, active={self.active}, path={self.path}, "
                f"backend={self.backend}{several}")


def _plain_linear(module: nn.Module) -> bool:
    """A torch nn.Linear itself, not a subclass with its own forward (bitsandbytes' 4/8-bit layers):
    the weight delta reads its weight and bias directly (and registers them with ZeRO-3)."""
    return type(module) is nn.Linear


def uses_weight_delta(layer: SecVecLinear, x: torch.Tensor) -> bool:
    """Whether this call of a layer on the weight-delta path can take it: the vector on, not gated
    and not one of several alone, x in W's dtype, autocast off, W and b present (gathered, under ZeRO-3)."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    return (layer.active and layer.row_gate is None and layer.only is None and x.dtype == W.dtype
            and not _autocast_on(x) and _zero_available(W) and (b is None or _zero_available(b)))


def _autocast_on(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) or torch.is_autocast_enabled()


def _zero_available(p: torch.Tensor) -> bool:
    """False for a ZeRO-3 parameter that is partitioned away right now (not gathered): the fused
    path would read an empty tensor, peft's path gathers it through its module's hooks. (A safety
    net: in eager forwards DeepSpeed's parameter getter already gathers and registers a partitioned
    parameter read as `module.weight`; the registration at attach makes it gathered up front.)"""
    status = getattr(p, "ds_status", None)
    return status is None or getattr(status, "name", "AVAILABLE") == "AVAILABLE"


def security_vector_layers(model) -> list[SecVecLinear]:
    return [m for m in model.modules() if isinstance(m, SecVecLinear)]


def path_calls(layers: list[SecVecLinear]) -> dict[str, int]:
    """Forwards per path (SecVecLinear.path_calls) summed over `layers`: which code computed the
    vector (this process's layers only)."""
    total = dict.fromkeys(layers[0].path_calls, 0) if layers else {}
    for layer in layers:
        for k, v in layer.path_calls.items():
            total[k] += v
    return total


def describe_paths(layers: list[SecVecLinear]) -> str:
    """One line: how many layers took each path and why not a faster one, e.g.
    "6 delta (the vector is gated per row)"."""
    groups: dict[tuple[str, str], int] = {}
    for layer in layers:
        key = (layer.path, layer.path_reason)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{n} {p}" + (f" ({why})" if why else "") for (p, why), n in sorted(groups.items()))


@contextlib.contextmanager
def row_gate(layers: list, gate: Optional[torch.Tensor]) -> Iterator[None]:
    """Weight the vector's delta per row of the batch (1 on, 0 off) for a forward and its backward
    (activation checkpointing recomputes the forward there)."""
    for layer in layers:
        layer.row_gate = gate
    try:
        yield
    finally:
        for layer in layers:
            layer.row_gate = None


@contextlib.contextmanager
def only_vector(layers: list, index: int) -> Iterator[None]:
    """Run with one vector of several composed ones on (`index` into the VectorSet's parts) and the
    others off: a layer that vector is not on adds nothing. For scoring rows per vector."""
    for layer in layers:
        layer.only = index
    try:
        yield
    finally:
        for layer in layers:
            layer.only = None


@contextlib.contextmanager
def layers_off(layers: list) -> Iterator[None]:
    """Run with these vectored layers inactive: their base layers alone."""
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = False
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.active = was


def security_vector_off(model) -> ContextManager[None]:
    """Run with every attached vector inactive (inference and evaluation)."""
    return layers_off(security_vector_layers(model))


def _inner_linear(module: nn.Module) -> nn.Module:
    """The real linear under peft's and our wrappers."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _find_secvec(module: nn.Module):
    while module is not None and not isinstance(module, SecVecLinear):
        module = getattr(module, "base_layer", None)
    return module
