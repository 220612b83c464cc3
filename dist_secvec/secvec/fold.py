"""Folding: a frozen 16/32-bit base weight absorbs the vector once (no per-step cost)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_secvec.errors import SecurityVectorError
from dist_secvec.secvec.attach import _target
from dist_secvec.secvec.layer import _inner_linear
from dist_secvec.secvec.io import SecurityVector


@dataclass
class FoldedLayer:
    """One base linear whose weight holds W + s * B @ A; `original` restores W bit-exactly.

    secvec_A / secvec_B are the vector's tensors as read from the file (plain tensors, not
    parameters: nothing of the vector can reach an optimizer), so `vector_digest` works on these
    as on SecVecLinear layers.
    """

    name: str
    linear: nn.Module  # the innermost linear (under any peft wrapper)
    secvec_A: torch.Tensor
    secvec_B: torch.Tensor
    scale: float
    original: torch.Tensor  # CPU copy of the weight before folding


FOLDABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fold_security_vector(model, sv: SecurityVector) -> list[FoldedLayer]:
    """Add s * B @ A (computed in float32, or float64 for a float64 weight, rounded once to the
    weight's dtype) into each targeted base weight. Only for frozen, unquantized weights (e.g. the
    base under a trainable LoRA): a trained weight would mix the vector into what is learned, and a
    quantized one cannot hold it. Several vectors composed (a VectorSet) fold as one: s B A of the
    concatenated ranks is their sum. Undo with `unfold_security_vector`."""
    from dist_secvec.model import unwrap_base

    base = unwrap_base(model)
    targets = []
    for mod, (A, B) in sv.weights.items():
        lin = _inner_linear(_target(base, sv, mod, A, B))
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dtype not in FOLDABLE_DTYPES or type(w) not in (
                torch.Tensor, nn.Parameter):
            raise SecurityVectorError(f"cannot fold the security vector into '{mod}': its weight is not a plain "
                                      "floating-point tensor (quantized?); attach it instead")
        if w.requires_grad:
            raise SecurityVectorError(f"cannot fold the security vector into '{mod}': its weight is trained "
                                      "(full fine-tuning); attach it instead")
        if any(t.name == mod for t in targets):
            raise SecurityVectorError(f"security vector already folded into '{mod}'")
        targets.append(FoldedLayer(mod, lin, A.detach().clone(), B.detach().clone(), sv.scale,
                                   w.detach().to("cpu", copy=True)))
    for t in targets:
        fold_weight(t)
    return targets


def fold_weight(t: FoldedLayer) -> None:
    """W <- W + s * B @ A in float32 (float64 for a float64 W), rounded once: from the original W
    always the same bits, so a weight unfolded for a moment (stage 2's vector-off probe) is folded
    back exactly."""
    with torch.no_grad():
        w = t.linear.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = (t.secvec_B.to(w.device, acc) @ t.secvec_A.to(w.device, acc)) * t.scale
        w.copy_((w.to(acc) + delta).to(w.dtype))
    t.linear._secvec_folded = True


def unfold_security_vector(model, folded: list[FoldedLayer]) -> int:
    """Put every folded weight back to its original bits; returns how many."""
    with torch.no_grad():
        for t in folded:
            w = t.linear.weight
            w.copy_(t.original.to(w.device))
            t.linear._secvec_folded = False
    return len(folded)


def fold_partitioned(model, sv) -> list:
    """Fold under ZeRO-3, where the base weights are already partitioned: one layer at a time, the
    weight whole on every rank only while it changes (rank 0's result is partitioned again). No
    copy of the original is kept (a whole model's worth per rank): `unfold_from_disk` reads it back
    from the base's safetensors."""
    import dataclasses

    from dist_secvec.distributed import gathered
    from dist_secvec.model import unwrap_base

    base = unwrap_base(model)
    folded = []
    for mod, AB in sv.weights.items():
        weight = _inner_linear(base.get_submodule(mod)).weight
        with gathered([weight], modifier_rank=0):
            layer = fold_security_vector(model, dataclasses.replace(sv, weights={mod: AB}))[0]
        layer.original = None
        folded.append(layer)
    return folded


def unfold_from_disk(folded: list, model_path: str) -> None:
    """Put the original base weights back under ZeRO-3, read from the model's safetensors and cast
    as from_pretrained casts them (bit for bit the loaded weights)."""
    from safetensors import safe_open

    from dist_secvec.distributed import gathered
    from dist_secvec.secvec.fingerprint import _safetensors_files, resolve_model_dir

    files = _safetensors_files(resolve_model_dir(model_path) or "")
    for t in folded:
        key = f"{t.name}.weight"
        if key not in files:
            raise SecurityVectorError(f"cannot restore the original weight '{key}' from '{model_path}' after "
                                      "folding; set security_vector.fold=false for this base")
        with safe_open(files[key], framework="pt") as f:
            original = f.get_tensor(key)
        w = t.linear.weight
        with gathered([w], modifier_rank=0):
            with torch.no_grad():
                w.copy_(original.to(w.dtype))
        t.linear._secvec_folded = False
