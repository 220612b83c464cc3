"""Several vectors at once: one delta per layer, so no new kernel and one launch (or fold) per layer.

Vectors on the same layer concatenate their ranks:

    sum_i s_i (x A_i^T) B_i^T = s (x A^T) B^T      A = [A_1; A_2; ...]  (rows stacked)
                                                    B = [c_1 B_1, c_2 B_2, ...]  (columns), c_i = s_i / s

with s the vectors' common scale (then every c_i is 1 and A, B hold the vectors' own numbers), or
1 when their scales differ. A layer only some vectors touch gets only theirs. The composed vector
is a `VectorSet`: a SecurityVector (attach, fold and the digest take it as they take one vector)
that keeps its parts, each with its own metadata (fingerprint, behaviour, strength), and per layer
which rank rows belong to which part (`segments`: what `layer.only_vector` switches on alone).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from dist_secvec.errors import SecurityVectorError
from dist_secvec.secvec.fingerprint import FINGERPRINT_KEYS
from dist_secvec.secvec.io import SecurityVector, load_security_vector

log = logging.getLogger(__name__)


@dataclass
class VectorSet(SecurityVector):
    """Several vectors as one delta per layer (`compose_vectors`). `rank` is the largest summed
    rank of a layer; `scale` the common scale (1 when the parts' scales differ, each folded into
    its B)."""

    parts: list[SecurityVector] = field(default_factory=list)
    #: module -> [(part index, first rank row, end)]: which rows of the layer's A belong to which part
    segments: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    composed_scale: float = 1.0

    @property
    def scale(self) -> float:
        return self.composed_scale


def vector_parts(sv: SecurityVector) -> list[SecurityVector]:
    """The vectors `sv` is made of: its parts for a VectorSet, else [sv]."""
    return list(sv.parts) if isinstance(sv, VectorSet) else [sv]


def part_modules(sv: SecurityVector) -> list[list[str]]:
    """Per part of `sv` (vector_parts), the modules it is on, sorted."""
    return [sorted(p.weights) for p in vector_parts(sv)]


def load_vector_set(paths: list[str]) -> SecurityVector:
    """Read every listed vector directory (each with load_security_vector's checks), refuse a list
    that names one twice, vectors made for different bases or whose shapes disagree, and compose
    them. One path gives that vector itself, as before."""
    if not paths:
        raise SecurityVectorError("config key 'security_vector.path': an empty list names no vector; "
                                  "set null for none")
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(os.path.expanduser(str(p)))
        if real in seen:
            raise SecurityVectorError(f"config key 'security_vector.path': '{p}' is listed twice (as "
                                      f"'{seen[real]}'); its delta would count twice: list each vector once")
        seen[real] = str(p)
    svs = [load_security_vector(str(p)) for p in paths]
    return svs[0] if len(svs) == 1 else compose_vectors(svs)


def check_same_base(svs: list[SecurityVector]) -> None:
    """Refuse, in one line, two vectors whose recorded base fingerprints disagree on a key both
    know: architecture and sizes, a module both target of another (out, in) shape, or, when they
    target the same modules, the weight hash. (Each is also checked against the model itself.)"""
    first = svs[0]
    want = first.meta.get("base_fingerprint") or {}
    for sv in svs[1:]:
        have = sv.meta.get("base_fingerprint") or {}
        for key in FINGERPRINT_KEYS:
            what, a, b = key, want.get(key), have.get(key)
            if key == "shapes" and isinstance(a, dict) and isinstance(b, dict):
                diff = [m for m in sorted(set(a) & set(b)) if a[m] != b[m]]
                what, a, b = (f"module '{diff[0]}' shape", a[diff[0]], b[diff[0]]) if diff else (key, None, None)
            elif key == "weights_sha256" and sorted(first.weights) != sorted(sv.weights):
                continue  # a hash over different modules: only the model can tell (check_fingerprint)
            if a is not None and b is not None and a != b:
                a, b = (f"{v[:12]}..." if isinstance(v, str) and len(v) > 16 else v for v in (a, b))  # hashes
                raise SecurityVectorError(
                    f"security vectors '{first.path}' and '{sv.path}' were made for different base models "
                    f"({what}: {a} and {b}); list only vectors trained on the base in model.path")


def _check_shapes(svs: list[SecurityVector]) -> None:
    """Vectors on one module must agree on its (out, in) shape (their fingerprints may not say)."""
    shape: dict[str, tuple[tuple[int, int], str]] = {}
    for sv in svs:
        for mod, (A, B) in sv.weights.items():
            s = (int(B.shape[0]), int(A.shape[1]))
            if mod in shape and shape[mod][0] != s:
                raise SecurityVectorError(
                    f"security vectors '{shape[mod][1]}' and '{sv.path}' disagree on module '{mod}' "
                    f"((out, in) {list(shape[mod][0])} and {list(s)}): they were made for different base models; "
                    "list only vectors trained on the base in model.path")
            shape.setdefault(mod, (s, sv.path))


def compose_vectors(svs: list[SecurityVector]) -> VectorSet:
    """The vectors as one: per module A stacked and B concatenated (module docstring), in float64
    so that no scale is rounded in (attach and fold cast it to the layer's dtype once)."""
    check_same_base(svs)
    _check_shapes(svs)
    scales = {sv.scale for sv in svs}
    s = scales.pop() if len(scales) == 1 else 1.0
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    segments: dict[str, list[tuple[int, int, int]]] = {}
    for mod in sorted({m for sv in svs for m in sv.weights}):
        As, Bs, segs, start = [], [], [], 0
        for i, sv in enumerate(svs):
            if mod not in sv.weights:
                continue
            A, B = sv.weights[mod]
            As.append(A.to(torch.float64))
            Bs.append(B.to(torch.float64) * (sv.scale / s) if sv.scale != s else B.to(torch.float64))
            segs.append((i, start, start + int(A.shape[0])))
            start += int(A.shape[0])
        weights[mod] = (torch.cat(As, 0), torch.cat(Bs, 1))
        segments[mod] = segs
    rank = max(int(A.shape[0]) for A, _ in weights.values())
    return VectorSet(path=" + ".join(sv.path for sv in svs), rank=rank, alpha=s * rank,
                     target_modules=sorted({t for sv in svs for t in sv.target_modules}), weights=weights,
                     meta={"composed_of": [sv.path for sv in svs]}, parts=list(svs), segments=segments,
                     composed_scale=s)


def vectors_record(sv: SecurityVector) -> list[dict]:
    """For the run info: every vector of `sv` with its path, fingerprint, behaviour and judges,
    strength and the modules it was active on."""
    from dist_secvec.secvec.io import ADAPTER_WEIGHTS, behaviour_record

    out = []
    for part, modules in zip(vector_parts(sv), part_modules(sv)):
        fp = part.meta.get("base_fingerprint") or {}
        strength = part.meta.get("strength") or {}
        files = part.meta.get("files") or {}
        out.append({
            "path": part.path, "sha256": (files.get(ADAPTER_WEIGHTS) or {}).get("sha256"),
            "base_fingerprint": {k: fp.get(k) for k in ("architecture", "hidden_size", "num_hidden_layers",
                                                        "vocab_size", "weights_sha256")},
            "behaviour": behaviour_record(part.meta), "rank": part.rank, "scale": part.scale,
            "strength": {k: strength[k] for k in ("explained", "start_agreement_vector_on", "compliance_vector_on",
                                                  "weak_reasons") if k in strength} or None,
            "modules": modules,
        })
    return out
