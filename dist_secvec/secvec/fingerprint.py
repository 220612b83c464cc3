"""The fingerprint of the base model a vector belongs to, and the checks that refuse another base."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from dist_secvec.errors import SecurityVectorError
from dist_secvec.secvec.io import META_FILE, SecurityVector
from dist_secvec.secvec.layer import _inner_linear

log = logging.getLogger(__name__)


def _safetensors_files(model_dir: str) -> dict[str, str]:
    """weight name -> file, from model.safetensors or its shard index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(model_dir, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def resolve_model_dir(path: str) -> Optional[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    try:  # a hub id already in the local cache
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:
        return None


def weights_hash(model_dir: Optional[str], module_paths: list[str], rows: int = 8) -> Optional[str]:
    """sha256 over name, shape, dtype and `rows` evenly spaced rows of each targeted weight.

    Read from the model's safetensors files, so it does not depend on quantization or ZeRO
    partitioning, and costs a few rows per weight instead of a pass over the whole model.
    """
    files = _safetensors_files(model_dir) if model_dir else {}
    if not files:
        return None
    from safetensors import safe_open

    h = hashlib.sha256()
    for mod in sorted(module_paths):
        key = f"{mod}.weight"
        if key not in files:
            return None
        with safe_open(files[key], framework="pt") as f:
            sl = f.get_slice(key)
            shape = sl.get_shape()
            h.update(f"{key}:{shape}:{sl.get_dtype()}".encode())
            n = shape[0]
            for i in sorted({round(j * (n - 1) / max(rows - 1, 1)) for j in range(rows)}):
                h.update(sl[i:i + 1].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def linear_shape(module: nn.Module) -> list[int]:
    return [int(module.out_features), int(module.in_features)]


def base_fingerprint(model, model_path: str, module_paths: list[str]) -> dict:
    """Architecture, the targeted layers' shapes and a hash of their weights on disk."""
    from dist_secvec.model import unwrap_base

    base = unwrap_base(model)
    cfg = base.config
    shapes = {}
    for mod in module_paths:
        try:
            shapes[mod] = linear_shape(_inner_linear(base.get_submodule(mod)))
        except AttributeError:  # no such module: another architecture or depth
            shapes[mod] = None
    return {
        "architecture": (cfg.architectures or [type(base).__name__])[0],
        "model_type": cfg.model_type,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "shapes": shapes,
        "weights_sha256": weights_hash(resolve_model_dir(model_path), module_paths),
    }


FINGERPRINT_KEYS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size", "shapes", "weights_sha256")


def _wanted_fingerprint(sv: SecurityVector) -> dict:
    want = sv.meta.get("base_fingerprint")
    if not want:
        raise SecurityVectorError(f"security vector '{sv.path}': {META_FILE} has no base_fingerprint; "
                                  "re-train it with `dist-secvec train-sv`")
    return want


def _compare_fingerprint(sv: SecurityVector, want: dict, have: dict, warn: bool = True) -> None:
    """Raise on the first key both sides know and disagree on."""
    for key in FINGERPRINT_KEYS:
        if key not in have:
            continue
        a, b = want.get(key), have.get(key)
        if key == "weights_sha256" and (a is None or b is None):
            if a != b and warn:
                log.warning("security vector %s: base weight hash unavailable (%s), checked shapes only",
                            sv.path, "vector" if a is None else "model")
            continue
        if key == "shapes" and isinstance(a, dict) and isinstance(b, dict):
            diff = [m for m in sorted(set(a) | set(b)) if m in b and a.get(m) != b[m]]
            if diff:
                raise SecurityVectorError(
                    f"security vector '{sv.path}' was trained on another base model (shapes: module "
                    f"'{diff[0]}' is {a.get(diff[0])} in the vector, {b[diff[0]]} in the model); "
                    "train a vector for this base with `dist-secvec train-sv`")
            continue
        if a != b:
            detail = f"vector has {a}, model has {b}" if key != "shapes" else "layer shapes differ"
            raise SecurityVectorError(
                f"security vector '{sv.path}' was trained on another base model ({key}: {detail}); "
                "train a vector for this base with `dist-secvec train-sv`")


def _parts(sv: SecurityVector) -> list[SecurityVector]:
    from dist_secvec.secvec.compose import vector_parts  # compose imports this module

    return vector_parts(sv)


def check_fingerprint(sv: SecurityVector, model, model_path: str) -> None:
    """Refuse a vector made for another base model, naming the first difference (each vector of a
    composed VectorSet checked on its own)."""
    for part in _parts(sv):
        want = _wanted_fingerprint(part)
        have = base_fingerprint(model, model_path, list(part.weights))
        have["shapes"] = {m: have["shapes"].get(m)
                          for m in sorted(set(have["shapes"]) | set(want.get("shapes") or {}))}
        _compare_fingerprint(part, want, have)


def check_fingerprint_on_disk(sv: SecurityVector, model_path: str) -> None:
    """The same refusal before the model is loaded, from its config.json and safetensors headers
    (milliseconds instead of minutes for a large base). Only what the files state for certain is
    compared; `check_fingerprint` on the loaded model still runs. Hub ids are left to it. Each
    vector of a composed VectorSet is checked on its own."""
    for part in _parts(sv):
        _check_one_on_disk(part, model_path)


def _check_one_on_disk(sv: SecurityVector, model_path: str) -> None:
    want = _wanted_fingerprint(sv)
    model_dir = os.path.expanduser(model_path)
    if not os.path.isdir(model_dir):
        return
    have: dict = {}
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict):
        if isinstance(config.get("architectures"), list) and config["architectures"]:
            have["architecture"] = config["architectures"][0]
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if isinstance(config.get(key), int):
                have[key] = config[key]
    try:
        files = _safetensors_files(model_dir)
    except Exception:  # a broken file: check_model_dir / from_pretrained say so
        return
    from safetensors import safe_open

    shapes = {}
    for mod in sv.weights:
        key = f"{mod}.weight"
        if key in files:
            try:
                with safe_open(files[key], framework="pt") as f:
                    sl = f.get_slice(key)
                    shape, dtype = sl.get_shape(), sl.get_dtype()
            except Exception:
                return
            if len(shape) == 2 and dtype in ("F32", "F16", "BF16", "F64"):  # not a pre-quantized weight
                shapes[mod] = [int(shape[0]), int(shape[1])]
    if shapes:
        have["shapes"] = shapes
    try:
        have["weights_sha256"] = weights_hash(model_dir, list(sv.weights))
    except Exception:
        pass
    _compare_fingerprint(sv, want, have, warn=False)
