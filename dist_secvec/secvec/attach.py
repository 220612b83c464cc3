"""Attaching a vector to a model for stage 2, and removing it."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch
from torch import nn

from dist_secvec.errors import SecurityVectorError
from dist_secvec.kernels.torch_ops import release_workspaces
from dist_secvec.secvec.compose import VectorSet
from dist_secvec.secvec.fingerprint import linear_shape
from dist_secvec.secvec.io import SecurityVector
from dist_secvec.secvec.layer import PathOptions, SecVecLinear, _find_secvec, _inner_linear, choose_path
from dist_secvec.secvec.lora import _register_external, make_fused, unmake_fused


def _target(base, sv: SecurityVector, mod: str, A: torch.Tensor, B: torch.Tensor) -> nn.Module:
    """The module `mod` of the model, checked against the vector: it exists, carries no vector
    yet, and its linear has the vector's (out, in) shape; otherwise the vector is for another base."""
    try:
        sub = base.get_submodule(mod)
    except AttributeError:
        raise SecurityVectorError(f"security vector '{sv.path}' targets module '{mod}', which this model "
                                  "does not have: it was made for another base model") from None
    if isinstance(_find_secvec(sub), SecVecLinear):
        raise SecurityVectorError(f"security vector already attached to '{mod}'")
    if getattr(_inner_linear(sub), "_secvec_folded", False):
        raise SecurityVectorError(f"security vector already folded into '{mod}'")
    want = [int(B.shape[0]), int(A.shape[1])]
    have = linear_shape(_inner_linear(sub))
    if have != want:
        raise SecurityVectorError(f"security vector '{sv.path}': module '{mod}' is {have} (out, in) in this model "
                                  f"but {want} in the vector: it was made for another base model")
    return sub


def _float_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (a quantized model's unquantized
    parts: embeddings, norms, biases), float32 if it has none."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def attach_security_vector(model, sv: SecurityVector, paths: Optional[PathOptions] = None,
                           dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None) -> list[SecVecLinear]:
    """Wrap each targeted linear of `model` (peft-wrapped or not) in a frozen SecVecLinear, its
    path chosen here once (`layer.choose_path`) from `paths` (`backend` overrides paths.backend).

    Where the target is a peft LoRA layer the SecVecLinear goes under it (its base_layer); on the
    fused_lora path that layer becomes a FusedLoraLayer (lora.make_fused). Under ZeRO-3 what the
    chosen paths read outside their owners' forwards is registered as external parameters (here if
    deepspeed is imported, else `register_zero3_external_params`). detach_security_vector undoes it.
    A composed VectorSet (several vectors) gives each layer one SecVecLinear holding all of them."""
    from dist_secvec.model import unwrap_base

    paths = paths or PathOptions()
    if backend is not None:
        paths = dataclasses.replace(paths, backend=backend)
    base = unwrap_base(model)
    wrapped = []
    for mod, (A, B) in sv.weights.items():
        sub = _target(base, sv, mod, A, B)
        lora = sub if hasattr(sub, "base_layer") else None  # a peft LoRA layer: the vector goes under it
        if lora is not None:
            holder, attr = sub, "base_layer"
        else:
            parent_name, _, attr = mod.rpartition(".")
            holder = base.get_submodule(parent_name) if parent_name else base
        inner = getattr(holder, attr)
        ref = _inner_linear(inner).weight
        # a 4-bit layer stores its weight in quant_storage; the vector belongs in the compute dtype
        # (an int8 layer names none: the model's floating dtype, i.e. what its output comes in)
        compute = getattr(_inner_linear(inner), "compute_dtype", None)
        target_dtype = dtype or compute or (ref.dtype if ref.dtype.is_floating_point else _float_dtype(base))
        path, why = choose_path(inner, lora, ref.device, paths)
        layer = SecVecLinear(inner, A.to(target_dtype).clone(), B.to(target_dtype).clone(), sv.scale, paths.backend,
                             path=path,
                             segments=sv.segments.get(mod) if isinstance(sv, VectorSet) else None)
        layer.path_reason = why
        layer.to(ref.device)
        setattr(holder, attr, layer)
        if "deepspeed" in sys.modules:  # imported by init_distributed before attach in DeepSpeed runs
            _register_external(layer)
        if path == "fused_lora":
            make_fused(sub, mod)
        wrapped.append(layer)
    return wrapped


def detach_security_vector(model) -> int:
    """Remove every SecVecLinear, putting the original linear back (and peft's own class on the
    LoRA layers that were fused); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SecVecLinear):
                if name == "base_layer":
                    unmake_fused(parent)
                setattr(parent, name, child.base_layer)
                n += 1
    release_workspaces()  # the weight delta's W' buffers
    return n

