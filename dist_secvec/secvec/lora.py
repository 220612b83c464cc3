"""The vector and a trainable peft LoRA on the same layer: one shrink pass over x for both.

The vector goes under the peft LoRA layer (its base_layer is the SecVecLinear). On the "fused_lora"
path the LoRA layer becomes a `FusedLoraLayer`: a subclass of its own peft class (so peft saves,
merges and switches it as before) whose forward computes the inner base layer, then the vector's
and the LoRA's deltas in one kernel (`apply_secvec_lora_delta`), and runs peft's forward for a call
where that would not give what peft computes (`fused_lora_choice`), saying once per layer why.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

import torch
from torch import nn

from dist_secvec.kernels.dispatch import apply_secvec_lora_delta
from dist_secvec.secvec.layer import SecVecLinear, _autocast_on, _zero_available, writes_fresh_output

log = logging.getLogger(__name__)

#: x dtypes on which a LoRA kept in float32 (peft's default on a 16-bit base: autocast_adapter_dtype)
#: is fused anyway: the kernel runs in x's dtype with fp32 accumulation on the LoRA weights rounded
#: to it, and dA / dB flow back to the fp32 parameters in fp32 (see dispatch.apply_secvec_lora_delta).
FUSED_UPCAST_X_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _variant_kwarg_keys() -> tuple[str, ...]:
    try:  # the keys peft's forward pops for LoRA variants (aLoRA); not passed to the base layer
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

        return tuple(VARIANT_KWARG_KEYS)
    except ImportError:
        return ("alora_offsets",)


def fused_lora_dtypes_ok(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> bool:
    """The fused path's dtype rule: the LoRA in x's dtype, or in float32 on a 16-bit x. (peft instead
    casts x up to the LoRA's float32 for the LoRA product; the fused kernel keeps the 16-bit compute
    of the rest of the layer, with fp32 accumulation. Any other pair, e.g. a float64 LoRA on float32
    x, runs peft's forward.)"""
    return lora_dtype == x_dtype or (lora_dtype == torch.float32 and x_dtype in FUSED_UPCAST_X_DTYPES)


def fusable_lora(sub: nn.Module) -> str:
    """Why peft LoRA layer `sub` cannot take the fused path ("" when it can), from what is fixed
    when the vector is attached: no instance forward; exactly one active adapter, a plain LoRA (no
    DoRA or other variant, no LoRA bias, bias-free nn.Linear A and B of one dtype). (A LoRA
    dropout with p > 0 is fused outside training only: `fused_lora_choice`.)"""
    if "forward" in sub.__dict__:
        return "an instance forward (e.g. accelerate's hooks) would bypass the fused one"
    lora_A, lora_B = getattr(sub, "lora_A", {}), getattr(sub, "lora_B", {})
    active = [a for a in getattr(sub, "active_adapters", []) if a in lora_A]
    if len(active) != 1:
        return f"{len(active)} active LoRA adapters (fused: exactly one)"
    n = active[0]
    if n not in lora_B or n in getattr(sub, "lora_variant", {}) or getattr(sub, "use_dora", {}).get(n, False):
        return f"adapter {n!r} is a LoRA variant (DoRA, ...)"
    a, b = lora_A[n], lora_B[n]
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a.bias is not None or b.bias is not None:
        return f"adapter {n!r} is not a plain bias-free nn.Linear pair"
    if a.weight.dtype != b.weight.dtype:
        return f"adapter {n!r}: lora A in {a.weight.dtype}, lora B in {b.weight.dtype}"
    return ""


def _has_dropout(sub: nn.Module, n: str) -> bool:
    """Whether adapter n's dropout drops anything in training (the fused kernel does not)."""
    drop = sub.lora_dropout[n] if n in getattr(sub, "lora_dropout", {}) else None
    return not (drop is None or isinstance(drop, nn.Identity) or getattr(drop, "p", 1) == 0)


def fused_lora_choice(sub: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[Optional[str], str]:
    """(adapter, "") when this call of fused LoRA layer `sub` may compute its adapter together with
    the vector under it, else (None, why peft's own forward must run). What attach fixed
    (`fusable_lora`, for the adapter `sub._secvec_adapter`) is not checked again; only what a call
    changes: the vector on, not gated and not one of several alone; that adapter still the one
    active, not disabled or merged; no adapter_names / variant kwargs; its dropout not in training;
    x in a dtype the LoRA fuses with (`fused_lora_dtypes_ok`), autocast off; the four weights
    gathered (ZeRO-3)."""
    sv = sub.base_layer
    if not sv.active:
        return None, "vector off"
    if sv.row_gate is not None:
        return None, "vector gated per row"
    if sv.only is not None:
        return None, "one vector of several on alone"
    n = sub.__dict__.get("_secvec_adapter")
    if sub.disable_adapters or sub.merged or list(sub.active_adapters) != [n]:
        return None, "adapters disabled, merged or switched since attach"
    if kwargs.get("adapter_names") is not None or any(kwargs.get(k) is not None for k in _variant_kwarg_keys()):
        return None, "adapter_names / LoRA variant arguments in the call"
    if sub.__dict__.get("_secvec_dropout") and sub.lora_dropout[n].training:
        return None, f"LoRA dropout active in training ({sub.lora_dropout[n]})"
    a, b = sub.lora_A[n], sub.lora_B[n]
    if not fused_lora_dtypes_ok(x.dtype, a.weight.dtype):
        return None, (f"dtypes: x {x.dtype}, LoRA {a.weight.dtype} "
                      "(fused: the LoRA in x's dtype, or float32 on a 16-bit x)")
    if _autocast_on(x):
        return None, "autocast on"
    if not all(_zero_available(p) for p in (a.weight, b.weight, sv.secvec_A, sv.secvec_B)):
        return None, "a weight is partitioned away by ZeRO-3"
    return n, ""


#: fallback reasons that are the caller's intent, not a missed fused path: never logged
_QUIET_FALLBACKS = ("vector off", "vector gated per row", "one vector of several on alone",
                    "adapters disabled, merged or switched since attach")


def _log_fallback(sub: nn.Module, reason: str) -> None:
    """Say once per layer and reason (rank 0, INFO) that a LoRA layer runs peft's unfused path."""
    if reason in _QUIET_FALLBACKS:
        return
    seen = sub.__dict__.setdefault("_secvec_fallbacks_logged", set())
    if reason in seen:
        return
    seen.add(reason)
    from dist_secvec.runtime import is_main

    if is_main():
        name = sub.__dict__.get("_secvec_name", type(sub).__name__)
        log.info("security vector + LoRA on %s: peft's unfused forward (the vector in its SecVecLinear), "
                 "not the fused kernel: %s", name, reason)


class FusedLoraLayer:
    """Mixed into a peft LoRA layer's own class (`_fused_class`) when its vector takes the
    "fused_lora" path: y = base(x) + s_v (x A_v^T) B_v^T + s_l (x A_l^T) B_l^T in one kernel that
    reads x once (exact LoRA gradients, none for the vector); peft's forward otherwise."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n, why = fused_lora_choice(self, x, kwargs)
        if n is None:
            _log_fallback(self, why)
            return super().forward(x, *args, **kwargs)
        for k in ("adapter_names", *_variant_kwarg_keys()):
            kwargs.pop(k, None)
        sv = self.base_layer
        sv.path_calls["fused_lora"] += 1
        out = sv.base_layer(x, *args, **kwargs)  # the inner base: the vector is added below, not twice
        return apply_secvec_lora_delta(x, out, sv.secvec_A, sv.secvec_B, sv.scale, self.lora_A[n].weight,
                                       self.lora_B[n].weight, self.scaling[n], sv.backend,
                                       inplace=writes_fresh_output(sv.base_layer))


@functools.lru_cache(maxsize=None)
def _fused_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (FusedLoraLayer, cls), {"__module__": cls.__module__})


def _is_fused(sub: nn.Module) -> bool:
    return isinstance(sub, FusedLoraLayer)


def _external_params(m: nn.Module) -> list[nn.Parameter]:
    """What a forward of `m` reads outside its owners' forwards: on a LoRA layer with the fused
    forward, the vector's A and B and every adapter's lora A / B weight; on a SecVecLinear over a
    plain nn.Linear, that linear's weight and bias (the weight-delta path)."""
    if isinstance(m, SecVecLinear):
        base = m.base_layer
        return [p for p in (base.weight, base.bias) if isinstance(p, nn.Parameter)] if m.path == "weight_delta" else []
    if not _is_fused(m):
        return []
    ps = [m.base_layer.secvec_A, m.base_layer.secvec_B] if isinstance(m.base_layer, SecVecLinear) else []
    for n in getattr(m, "lora_A", {}):
        for lin in (m.lora_A[n], m.lora_B[n] if n in m.lora_B else None):
            if isinstance(getattr(lin, "weight", None), nn.Parameter):
                ps.append(lin.weight)
    return ps


def _register_external(m: nn.Module) -> int:
    """Tell ZeRO-3 to gather `_external_params(m)` when `m` runs (its pre-forward and pre-backward
    hooks fetch a module's external parameters); returns how many. Works before deepspeed.initialize
    converts them: the registration is keyed by the parameter objects, which ZeRO converts in place;
    without ZeRO-3 it is an unused dict."""
    import deepspeed  # deepspeed.zero is an attribute, not an importable submodule

    ps = _external_params(m)
    for p in ps:
        deepspeed.zero.register_external_parameter(m, p)
    return len(ps)


def make_fused(sub: nn.Module, name: str = "") -> None:
    """Turn peft LoRA layer `sub` (its base_layer a SecVecLinear on the fused_lora path) into a
    FusedLoraLayer, and register what its forward reads with ZeRO-3 when deepspeed is in use."""
    if not _is_fused(sub):
        sub.__class__ = _fused_class(type(sub))
    sub._secvec_name = name
    sub._secvec_adapter = next(a for a in sub.active_adapters if a in sub.lora_A)  # fusable_lora: exactly one
    sub._secvec_dropout = _has_dropout(sub, sub._secvec_adapter)
    if "deepspeed" in sys.modules:  # imported by init_distributed before attach in DeepSpeed runs
        _register_external(sub)


def unmake_fused(sub: nn.Module) -> None:
    """Back to peft's own class and forward, the ZeRO-3 registration removed."""
    ext = getattr(sub, "_external_params", None)
    if isinstance(ext, dict):
        for p in _external_params(sub):
            ext.pop(id(p), None)
    if _is_fused(sub):
        sub.__class__ = type(sub).__mro__[2]  # (Fused<cls>, FusedLoraLayer, cls, ...)
    for k in ("_secvec_name", "_secvec_adapter", "_secvec_dropout", "_secvec_fallbacks_logged"):
        sub.__dict__.pop(k, None)


def register_zero3_external_params(model) -> int:
    """Register with ZeRO-3 what the vector's paths read outside their owners' forwards: on every
    fused LoRA layer and every SecVecLinear over a plain nn.Linear of `model` (idempotent; imports
    deepspeed). attach_security_vector already does this when deepspeed is imported at that point
    (as in DeepSpeed runs); call this before deepspeed.initialize when attaching before deepspeed
    is imported. Returns the number of modules."""
    return sum(1 for m in model.modules() if _register_external(m))

