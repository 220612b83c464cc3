"""The security vector: a frozen low-rank delta on chosen linear layers.

On a linear layer with weight W (N x K) the vector adds
    y = x W^T + s * (x A^T) B^T          A: r x K, B: N x r, s = alpha / r
It is stored in PEFT's LoRA adapter format (adapter_config.json + adapter_model.safetensors,
so `peft.PeftModel.from_pretrained` loads it as an ordinary adapter) plus `secvec.json`: the base
model's fingerprint, the number of training samples, rank, alpha and targets.

In stage 2 each targeted linear is wrapped in a `SecVecLinear` that owns A and B as frozen
parameters (requires_grad False, so no .grad, no optimizer state) and applies the delta inside
its own forward, where ZeRO-3 has gathered them. A trainable peft LoRA on the same layer sits
outside the wrapper: peft's lora.Linear calls `base_layer(x)`, which is the SecVecLinear. There
the peft layer's forward is replaced (per instance) by one that computes the vector's and the
LoRA's shrinks in one pass over x (`apply_secvec_lora_delta`) whenever that gives what peft would
(one plain LoRA adapter, no dropout in training, no autocast, ...; a float32 LoRA on a 16-bit x,
peft's default, runs the kernel in x's dtype) and calls peft's own forward otherwise, logging
once per layer why; DIST_SECVEC_FUSE_LORA=0 turns the fused path off.
Over a plain nn.Linear (full fine-tuning, torch backend) the SecVecLinear computes the layer and
the vector in one Function instead, y = x (W + s B A)^T + b (`uses_weight_delta` says when;
DIST_SECVEC_WEIGHT_DELTA=0 turns it off), reading W and b itself (registered with ZeRO-3).
When the base weights are frozen and unquantized (a LoRA on a 16/32-bit base), stage 2 folds
s * B @ A into them once instead (`fold_security_vector`), and `unfold_security_vector` restores
the original weights bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from dist_secvec.errors import SecurityVectorError
from dist_secvec_kernels.dispatch import (apply_secvec_delta, apply_secvec_lora_delta, apply_secvec_weight_delta,
                                          resolve_backend)
from dist_secvec_kernels.reference import release_workspaces, weight_delta_pays

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FILE = "secvec.json"
PROBE_FILE = "probe.jsonl"  # stage 1's held-out harmful rows: stage 2's default harmful probe
PEFT_PREFIX = "base_model.model."
FUSE_LORA_ENV = "DIST_SECVEC_FUSE_LORA"


WEIGHT_DELTA_ENV = "DIST_SECVEC_WEIGHT_DELTA"
INPLACE_ENV = "DIST_SECVEC_INPLACE"


def switched_off(env: str) -> bool:
    """Whether the on-by-default switch `env` is set to 0 / false / no / off (read per call, so a
    test or a profile can flip it between steps)."""
    return os.environ.get(env, "").strip().lower() in ("0", "false", "no", "off")


def writes_fresh_output(base_layer: nn.Module) -> bool:
    """Whether the delta may be added into the base layer's output in place (saving a copy of it,
    an M x N read and write: measured on CPU, 1024 x 512 -> 1344, it was half the vector's cost).
    True for linear layers (torch's, bitsandbytes' 4- and 8-bit ones subclass it), whose backward
    saves x and W but never the output; the kernels still fall back to a fresh output for views,
    leaves and inference tensors (reference.can_update_in_place). DIST_SECVEC_INPLACE=0 turns it off."""
    return not switched_off(INPLACE_ENV) and isinstance(base_layer, nn.Linear)


class SecVecLinear(nn.Module):
    """y = base_layer(x) + s * (x A^T) B^T with A and B frozen; the delta is skipped when inactive.

    Args:
        base_layer: the wrapped linear (nn.Linear or a bitsandbytes Linear4bit/Linear8bitLt).
        A: (r, in_features) shrink, B: (out_features, r) expand.
        scale: alpha / r.
        backend: "auto" | "torch" | "triton" (see dist_secvec_kernels.dispatch).

    Under a peft LoRA layer (attach_security_vector puts it there) this forward usually does not
    run: the LoRA layer's fused forward calls `base_layer.base_layer` and adds the vector and the
    LoRA in one kernel (`fused_lora_choice` lists when). `active` and `backend` apply to both
    paths; DIST_SECVEC_FUSE_LORA=0 (or false/no/off) sends every call through peft's forward and
    this one instead.
    """

    def __init__(self, base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float,
                 backend: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.secvec_A = nn.Parameter(A, requires_grad=False)
        self.secvec_B = nn.Parameter(B, requires_grad=False)
        self.scale = float(scale)
        self.backend = backend
        self.active = True
        #: per-row weights of the delta for the batch in flight (None = every row 1): 0 trains that
        #: row with the vector off (security_vector.gate); set by `row_gate` around forward + backward
        self.row_gate: Optional[torch.Tensor] = None
        #: forwards per path since attach (run info and profile report them): "weight_delta",
        #: "delta" (base layer, then the delta), "fused_lora" (the LoRA layer above computed both)
        self.path_calls = {"weight_delta": 0, "delta": 0, "fused_lora": 0}

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
        if self.active and self.row_gate is None and not args and not kwargs and uses_weight_delta(self, x):
            self.path_calls["weight_delta"] += 1
            base = self.base_layer
            return apply_secvec_weight_delta(x, base.weight, base.bias, self.secvec_A, self.secvec_B, self.scale)
        out = self.base_layer(x, *args, **kwargs)
        if not self.active:
            return out
        self.path_calls["delta"] += 1
        if self.row_gate is not None:  # the delta is linear in x: gating x gates it, and its dx
            x = x * self.row_gate.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return apply_secvec_delta(x, out, self.secvec_A, self.secvec_B, self.scale, self.backend,
                                  inplace=writes_fresh_output(self.base_layer))

    def extra_repr(self) -> str:
        r, k = self.secvec_A.shape
        return f"rank={r}, scale={self.scale:g}, active={self.active}, backend={self.backend}"


def _plain_linear(module: nn.Module) -> bool:
    """A torch nn.Linear itself, not a subclass with its own forward (bitsandbytes' 4/8-bit layers):
    the weight delta reads its weight and bias directly (and registers them with ZeRO-3)."""
    return type(module) is nn.Linear


def uses_weight_delta(layer: SecVecLinear, x: torch.Tensor) -> bool:
    """Whether `layer` computes x (W + s B A)^T + b in one Function (dispatch.apply_secvec_weight_delta:
    no pass of the delta over the M x N output or dy, one input gradient) instead of its base layer
    and then the delta. Yes when: the base is a plain nn.Linear (not a bitsandbytes or other subclass
    with its own forward); the torch backend (on CUDA the Triton kernel keeps the delta path); x in
    W's dtype and autocast off; W and b present (gathered, under ZeRO-3); enough rows per call that
    forming W' costs less than the delta's passes (reference.weight_delta_pays); and
    DIST_SECVEC_WEIGHT_DELTA not off. Full fine-tuning takes it; a LoRA's frozen base is folded or
    runs the fused LoRA path instead."""
    base = layer.base_layer
    if not _plain_linear(base) or switched_off(WEIGHT_DELTA_ENV):
        return False
    W, b = base.weight, base.bias
    if resolve_backend(layer.backend, x.device) != "torch" or x.dtype != W.dtype or _autocast_on(x):
        return False
    if not (_zero_available(W) and (b is None or _zero_available(b))):
        return False
    N, K = W.shape
    return weight_delta_pays(x.numel() // K, K, N)


@dataclass
class SecurityVector:
    """A vector read from disk: per-module (A, B), its peft config and its metadata."""

    path: str
    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B)
    meta: dict = field(default_factory=dict)
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


# ---------------------------------------------------------------------------------------------
# fingerprint of the base model a vector belongs to


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


def check_fingerprint(sv: SecurityVector, model, model_path: str) -> None:
    """Refuse a vector made for another base model, naming the first difference."""
    want = _wanted_fingerprint(sv)
    have = base_fingerprint(model, model_path, list(sv.weights))
    have["shapes"] = {m: have["shapes"].get(m) for m in sorted(set(have["shapes"]) | set(want.get("shapes") or {}))}
    _compare_fingerprint(sv, want, have)


def check_fingerprint_on_disk(sv: SecurityVector, model_path: str) -> None:
    """The same refusal before the model is loaded, from its config.json and safetensors headers
    (milliseconds instead of minutes for a large base). Only what the files state for certain is
    compared; `check_fingerprint` on the loaded model still runs. Hub ids are left to it."""
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


# ---------------------------------------------------------------------------------------------
# reading


def load_security_vector(path: str) -> SecurityVector:
    """Read a vector directory, with one-line errors for missing, pickled or corrupted files."""
    d = Path(os.path.expanduser(path))
    if not d.is_dir():
        raise SecurityVectorError(f"security vector '{path}' not found: set security_vector.path to a "
                                  "directory written by `dist-secvec train-sv`")
    if not (d / ADAPTER_WEIGHTS).exists():
        if (d / "adapter_model.bin").exists():
            raise SecurityVectorError(f"security vector '{path}': adapter_model.bin is a pickle file; only "
                                      "safetensors are loaded (re-save it with safe_serialization=True)")
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_WEIGHTS} is missing")
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_CONFIG} is missing or not JSON ({e})")
    if not isinstance(cfg, dict):
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_CONFIG} must hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_CONFIG} is not a LoRA adapter "
                                  f"(peft_type={cfg.get('peft_type')})")
    meta = {}
    if (d / META_FILE).exists():
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SecurityVectorError(f"security vector '{path}': {META_FILE} is not valid JSON ({e})")
        if not isinstance(meta, dict):
            raise SecurityVectorError(f"security vector '{path}': {META_FILE} must hold a JSON object")
    _check_file_hashes(path, d, meta)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(d / ADAPTER_WEIGHTS))
    except Exception as e:
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_WEIGHTS} is corrupted or truncated "
                                  f"({str(e).splitlines()[0][:120]}); re-train or re-copy it") from e
    weights: dict[str, list] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                weights.setdefault(name[: -len(part)], [None, None])[idx] = t
                break
        else:
            raise SecurityVectorError(f"security vector '{path}': unexpected tensor '{key}' (a vector holds "
                                      "only lora_A/lora_B weights, no bias or modules_to_save)")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_CONFIG} lacks a numeric 'r' or "
                                  "'lora_alpha'; re-copy the vector directory") from None
    for mod, (A, B) in weights.items():
        if A is None or B is None:
            raise SecurityVectorError(f"security vector '{path}': module '{mod}' lacks lora_A or lora_B; "
                                      "the file is incomplete")
        if A.shape[0] != B.shape[1]:
            raise SecurityVectorError(f"security vector '{path}': module '{mod}' has lora_A of rank {A.shape[0]} "
                                      f"but lora_B of rank {B.shape[1]}; the file is inconsistent")
        if A.shape[0] != rank:
            raise SecurityVectorError(f"security vector '{path}': {ADAPTER_CONFIG} says rank r={rank} but "
                                      f"{ADAPTER_WEIGHTS} holds rank {A.shape[0]} (module '{mod}'); the files "
                                      "do not belong together: re-copy the vector directory")
    if not weights:
        raise SecurityVectorError(f"security vector '{path}': {ADAPTER_WEIGHTS} holds no LoRA weights")
    targets = cfg.get("target_modules") or []
    _check_consistent(path, rank, targets, weights, meta)
    return SecurityVector(path=str(d), rank=rank, alpha=alpha,
                          target_modules=sorted(targets) if isinstance(targets, list) else [targets],
                          weights={k: (v[0], v[1]) for k, v in sorted(weights.items())}, meta=meta,
                          use_rslora=bool(cfg.get("use_rslora", False)))


def _check_file_hashes(path: str, d: Path, meta: dict) -> None:
    """The weights file against secvec.json's manifest (`record_file_hashes`): a truncated,
    corrupted or edited file is refused before it is read. A vector saved before the manifest
    existed is accepted with a warning."""
    files = meta.get("files")
    if not files:
        if meta:
            log.warning("security vector %s: %s records no file hashes (an older vector); its integrity is "
                        "not checked", path, META_FILE)
        return
    if not isinstance(files, dict):
        raise SecurityVectorError(f"security vector '{path}': {META_FILE} 'files' must map file names to "
                                  "{size, sha256}; re-train or re-copy the vector")
    for name, want in sorted(files.items()):
        f = d / name
        if not f.is_file():
            raise SecurityVectorError(f"security vector '{path}': {name} (listed in {META_FILE}) is missing; "
                                      "re-copy the whole vector directory")
        have = file_record(f)
        if not isinstance(want, dict) or have["size"] != want.get("size"):
            raise SecurityVectorError(f"security vector '{path}': {name} is corrupted or truncated "
                                      f"({have['size']} bytes, {META_FILE} records "
                                      f"{want.get('size') if isinstance(want, dict) else want}); re-train or re-copy it")
        if have["sha256"] != want.get("sha256"):
            raise SecurityVectorError(f"security vector '{path}': {name} does not match the sha256 in {META_FILE} "
                                      "(changed since it was saved: tampered or corrupted); refusing it: re-train "
                                      "or re-copy the vector")


def _check_consistent(path: str, rank: int, targets, weights: dict, meta: dict) -> None:
    """adapter_config.json, the tensors and secvec.json must describe the same vector."""
    names = sorted(targets) if isinstance(targets, list) else None
    if names is not None:
        stray = sorted(m.rsplit(".", 1)[-1] for m in weights
                       if not any(m == t or m.endswith("." + t) for t in names))
        if stray:
            raise SecurityVectorError(f"security vector '{path}': {ADAPTER_WEIGHTS} holds weights for "
                                      f"'{stray[0]}', which {ADAPTER_CONFIG} target_modules {names} does not "
                                      "name; the files do not belong together: re-copy the vector directory")
    if "rank" in meta and meta["rank"] != rank:
        raise SecurityVectorError(f"security vector '{path}': {META_FILE} says rank {meta['rank']} but "
                                  f"{ADAPTER_CONFIG} says r={rank}; the files do not belong together: re-copy "
                                  "the vector directory")
    if names is not None and isinstance(meta.get("target_modules"), list) and sorted(meta["target_modules"]) != names:
        raise SecurityVectorError(f"security vector '{path}': {META_FILE} says target_modules "
                                  f"{sorted(meta['target_modules'])} but {ADAPTER_CONFIG} says {names}; the files "
                                  "do not belong together: re-copy the vector directory")


# ---------------------------------------------------------------------------------------------
# attaching to a model for stage 2, switching off, removing


def _inner_linear(module: nn.Module) -> nn.Module:
    """The real linear under peft's and our wrappers."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


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


# ---------------------------------------------------------------------------------------------
# the vector and a trainable peft LoRA on the same layer: one shrink pass over x for both


def fuse_lora_enabled() -> bool:
    """DIST_SECVEC_FUSE_LORA=0 / false / no / off turns the fused vector+LoRA path off (default on)."""
    return not switched_off(FUSE_LORA_ENV)


@functools.lru_cache(maxsize=None)
def _variant_kwarg_keys() -> tuple[str, ...]:
    try:  # the keys peft's forward pops for LoRA variants (aLoRA); not passed to the base layer
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

        return tuple(VARIANT_KWARG_KEYS)
    except ImportError:
        return ("alora_offsets",)


def _autocast_on(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) or torch.is_autocast_enabled()


def _zero_available(p: torch.Tensor) -> bool:
    """False for a ZeRO-3 parameter that is partitioned away right now (not gathered): the fused
    path would read an empty tensor, peft's path gathers it through its module's hooks. (A safety
    net: in eager forwards DeepSpeed's parameter getter already gathers and registers a partitioned
    parameter read as `module.weight`; the registration at attach makes it gathered up front.)"""
    status = getattr(p, "ds_status", None)
    return status is None or getattr(status, "name", "AVAILABLE") == "AVAILABLE"


#: x dtypes on which a LoRA kept in float32 (peft's default on a 16-bit base: autocast_adapter_dtype)
#: is fused anyway: the kernel runs in x's dtype with fp32 accumulation on the LoRA weights rounded
#: to it, and dA / dB flow back to the fp32 parameters in fp32 (see dispatch.apply_secvec_lora_delta).
FUSED_UPCAST_X_DTYPES = (torch.float16, torch.bfloat16)


def fused_lora_dtypes_ok(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> bool:
    """The fused path's dtype rule: the LoRA in x's dtype, or in float32 on a 16-bit x. (peft instead
    casts x up to the LoRA's float32 for the LoRA product; the fused kernel keeps the 16-bit compute
    of the rest of the layer, with fp32 accumulation. Any other pair, e.g. a float64 LoRA on float32
    x, runs peft's forward.)"""
    return lora_dtype == x_dtype or (lora_dtype == torch.float32 and x_dtype in FUSED_UPCAST_X_DTYPES)


def fused_lora_choice(sub: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[Optional[str], str]:
    """(adapter, "") when the fused path may compute the one active adapter of peft LoRA layer `sub`
    together with the vector under it, else (None, why peft's own forward must run). Fused only when
    it gives what peft would, up to the dtype rule of `fused_lora_dtypes_ok`: a SecVecLinear under
    `sub` and active; DIST_SECVEC_FUSE_LORA not off; adapters enabled and not merged; no adapter_names /
    variant kwargs; exactly one active adapter with a plain LoRA (no DoRA or other variant, no LoRA
    bias, nn.Linear A and B); its dropout an identity (nn.Identity, p=0 or not training); lora A and
    B of one dtype that `fused_lora_dtypes_ok` accepts for x, and autocast off; all four weights
    present (not partitioned away by ZeRO-3)."""
    sv = getattr(sub, "base_layer", None)
    if not isinstance(sv, SecVecLinear):
        return None, "no security vector under this layer"
    if not sv.active:
        return None, "vector off"
    if sv.row_gate is not None:
        return None, "vector gated per row"
    if not fuse_lora_enabled():
        return None, f"{FUSE_LORA_ENV}=0"
    if getattr(sub, "disable_adapters", True) or getattr(sub, "merged", True):
        return None, "adapters disabled or merged"
    if kwargs.get("adapter_names") is not None or any(kwargs.get(k) is not None for k in _variant_kwarg_keys()):
        return None, "adapter_names / LoRA variant arguments in the call"
    lora_A, lora_B = getattr(sub, "lora_A", {}), getattr(sub, "lora_B", {})
    active = [a for a in sub.active_adapters if a in lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active LoRA adapters (fused: exactly one)"
    n = active[0]
    if n not in lora_B or n in getattr(sub, "lora_variant", {}) or getattr(sub, "use_dora", {}).get(n, False):
        return None, f"adapter {n!r} is a LoRA variant (DoRA, ...)"
    a, b = lora_A[n], lora_B[n]
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a.bias is not None or b.bias is not None:
        return None, f"adapter {n!r} is not a plain bias-free nn.Linear pair"
    drop = sub.lora_dropout[n]
    if not (isinstance(drop, nn.Identity) or not drop.training or (isinstance(drop, nn.Dropout) and drop.p == 0)):
        return None, f"LoRA dropout active in training ({drop})"
    if a.weight.dtype != b.weight.dtype or not fused_lora_dtypes_ok(x.dtype, a.weight.dtype):
        return None, (f"dtypes: x {x.dtype}, lora A {a.weight.dtype}, lora B {b.weight.dtype} "
                      "(fused: the LoRA in x's dtype, or float32 on a 16-bit x)")
    if _autocast_on(x):
        return None, "autocast on"
    if not all(_zero_available(p) for p in (a.weight, b.weight, sv.secvec_A, sv.secvec_B)):
        return None, "a weight is partitioned away by ZeRO-3"
    return n, ""


def fused_lora_adapter(sub: nn.Module, x: torch.Tensor, kwargs: dict) -> Optional[str]:
    """The adapter `fused_lora_choice` allows, or None."""
    return fused_lora_choice(sub, x, kwargs)[0]


#: fallback reasons that are the caller's intent, not a missed fused path: never logged
_QUIET_FALLBACKS = ("vector off", "vector gated per row", f"{FUSE_LORA_ENV}=0", "adapters disabled or merged")


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


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Installed per instance on a peft LoRA layer whose base_layer is a SecVecLinear: the inner base,
    then vector + LoRA in one kernel; peft's own forward when `fused_lora_choice` says no."""
    n, why = fused_lora_choice(self, x, kwargs)
    if n is None:
        _log_fallback(self, why)
        return type(self).forward(self, x, *args, **kwargs)
    for k in ("adapter_names", *_variant_kwarg_keys()):
        kwargs.pop(k, None)
    sv = self.base_layer
    sv.path_calls["fused_lora"] += 1
    out = sv.base_layer(x, *args, **kwargs)  # the inner base: the vector is added below, not twice
    return apply_secvec_lora_delta(x, out, sv.secvec_A, sv.secvec_B, sv.scale, self.lora_A[n].weight,
                                   self.lora_B[n].weight, self.scaling[n], sv.backend,
                                   inplace=writes_fresh_output(sv.base_layer))


def _is_fused(sub: nn.Module) -> bool:
    return getattr(sub.__dict__.get("forward"), "__func__", None) is _fused_lora_forward


def _external_params(m: nn.Module) -> list[nn.Parameter]:
    """What a forward of `m` reads outside its owners' forwards: on a LoRA layer with the fused
    forward, the vector's A and B and every adapter's lora A / B weight; on a SecVecLinear over a
    plain nn.Linear, that linear's weight and bias (the weight-delta path)."""
    if isinstance(m, SecVecLinear):
        base = m.base_layer
        return [p for p in (base.weight, base.bias) if isinstance(p, nn.Parameter)] if _plain_linear(base) else []
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


def _install_fused_forward(sub: nn.Module, name: str = "") -> bool:
    """Give peft LoRA layer `sub` the fused forward (an instance attribute; the class's forward stays
    peft's and is the fallback). Left alone when something else already set an instance forward
    (e.g. accelerate's hooks), which the fused forward would bypass."""
    if not hasattr(sub, "lora_A") or "forward" in sub.__dict__:
        return False
    sub.forward = _fused_lora_forward.__get__(sub)
    sub._secvec_name = name
    if "deepspeed" in sys.modules:  # imported by init_distributed before attach in DeepSpeed runs
        _register_external(sub)
    return True


def _remove_fused_forward(sub: nn.Module) -> None:
    ext = getattr(sub, "_external_params", None)
    if isinstance(ext, dict):
        for p in _external_params(sub):
            ext.pop(id(p), None)
    if _is_fused(sub):
        del sub.__dict__["forward"]
    for k in ("_secvec_name", "_secvec_fallbacks_logged"):
        sub.__dict__.pop(k, None)


def register_zero3_external_params(model) -> int:
    """Register with ZeRO-3 what the vector's paths read outside their owners' forwards: on every
    fused LoRA layer and every SecVecLinear over a plain nn.Linear of `model` (idempotent; imports
    deepspeed). attach_security_vector already does this when deepspeed is imported at that point
    (as in DeepSpeed runs); call this before deepspeed.initialize when attaching before deepspeed
    is imported. Returns the number of modules."""
    return sum(1 for m in model.modules() if _register_external(m))


def _float_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (a quantized model's unquantized
    parts: embeddings, norms, biases), float32 if it has none."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def attach_security_vector(model, sv: SecurityVector, backend: str = "auto",
                           dtype: Optional[torch.dtype] = None) -> list[SecVecLinear]:
    """Wrap each targeted linear of `model` (peft-wrapped or not) in a frozen SecVecLinear.

    Where the target is a peft LoRA layer the SecVecLinear goes under it (its base_layer) and the
    LoRA layer gets a fused forward: the inner base, then the vector and the LoRA added by one kernel
    that reads x once (`apply_secvec_lora_delta`, exact LoRA gradients, none for the vector), falling
    back to peft's forward per call when fusing would change what peft computes (`fused_lora_choice`).
    DIST_SECVEC_FUSE_LORA=0 disables it. A SecVecLinear over a plain nn.Linear may compute the layer
    and the vector as one weight delta (`uses_weight_delta`). Under ZeRO-3 what these paths read is
    registered as external parameters of the LoRA layer / the SecVecLinear (here if deepspeed is
    imported, else `register_zero3_external_params`). detach_security_vector restores peft's forward."""
    from dist_secvec.model import unwrap_base

    base = unwrap_base(model)
    wrapped = []
    for mod, (A, B) in sv.weights.items():
        sub = _target(base, sv, mod, A, B)
        if hasattr(sub, "base_layer"):  # a peft LoRA layer: the vector goes under it
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
        layer = SecVecLinear(inner, A.to(target_dtype).clone(), B.to(target_dtype).clone(), sv.scale, backend)
        layer.to(ref.device)
        setattr(holder, attr, layer)
        if "deepspeed" in sys.modules:  # imported by init_distributed before attach in DeepSpeed runs
            _register_external(layer)
        if holder is sub:
            _install_fused_forward(sub, mod)
        wrapped.append(layer)
    return wrapped


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


def detach_security_vector(model) -> int:
    """Remove every SecVecLinear, putting the original linear back (and peft's own forward on the
    LoRA layers that had the fused one); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SecVecLinear):
                if name == "base_layer":
                    _remove_fused_forward(parent)
                setattr(parent, name, child.base_layer)
                n += 1
    release_workspaces()  # the weight delta's W' buffers
    return n


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
def security_vector_off(model) -> Iterator[None]:
    """Run with every attached vector inactive (inference and evaluation)."""
    layers = security_vector_layers(model)
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = False
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.active = was


# ---------------------------------------------------------------------------------------------
# folding: a frozen 16/32-bit base weight absorbs the vector once (no per-step cost)


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


FOLDABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fold_security_vector(model, sv: SecurityVector) -> list[FoldedLayer]:
    """Add s * B @ A (computed in float32, rounded once to the weight's dtype) into each targeted
    base weight. Only for frozen, unquantized weights (e.g. the base under a trainable LoRA): a
    trained weight would mix the vector into what is learned, and a quantized one cannot hold it.
    Undo with `unfold_security_vector`."""
    from dist_secvec.model import unwrap_base

    base = unwrap_base(model)
    targets = []
    for mod, (A, B) in sv.weights.items():
        lin = _inner_linear(_target(base, sv, mod, A, B))
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dtype not in FOLDABLE_DTYPES or type(w) not in (
                torch.Tensor, nn.Parameter):
            raise SecurityVectorError(f"cannot fold the security vector into '{mod}': its weight is not a plain "
                                      "16/32-bit tensor (quantized?); attach it instead")
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
    """W <- W + s * B @ A in float32, rounded once: from the original W always the same bits, so
    a weight unfolded for a moment (stage 2's vector-off probe) is folded back exactly."""
    with torch.no_grad():
        w = t.linear.weight
        delta = (t.secvec_B.to(w.device, torch.float32) @ t.secvec_A.to(w.device, torch.float32)) * t.scale
        w.copy_((w.float() + delta).to(w.dtype))
    t.linear._secvec_folded = True


def unfold_security_vector(model, folded: list[FoldedLayer]) -> int:
    """Put every folded weight back to its original bits; returns how many."""
    with torch.no_grad():
        for t in folded:
            w = t.linear.weight
            w.copy_(t.original.to(w.device))
            t.linear._secvec_folded = False
    return len(folded)


def _find_secvec(module: nn.Module):
    while module is not None and not isinstance(module, SecVecLinear):
        module = getattr(module, "base_layer", None)
    return module


def vector_digest(layers: list) -> str:
    """sha256 of every A and B (of SecVecLinear or FoldedLayer): the stage-2 invariant that the
    vector never changes."""
    h = hashlib.sha256()
    for layer in layers:
        for t in (layer.secvec_A, layer.secvec_B):
            h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """size and sha256 of a file, as secvec.json's "files" manifest records them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def record_file_hashes(vector_dir: Path) -> dict:
    """Add the weights' and the probe's size and sha256 to secvec.json (`files`); returns the new metadata.
    load_security_vector refuses a vector whose weights no longer match (tampered or corrupted)."""
    vector_dir = Path(vector_dir)
    meta = json.loads((vector_dir / META_FILE).read_text()) if (vector_dir / META_FILE).exists() else {}
    meta["files"] = {name: file_record(vector_dir / name) for name in (ADAPTER_WEIGHTS, PROBE_FILE)
                     if (vector_dir / name).exists()}
    (vector_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def save_security_vector(peft_model, out_dir: Path, meta: dict) -> None:
    """peft's own adapter format (safetensors) plus secvec.json, with the weights file's sha256."""
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    record_file_hashes(out_dir)
