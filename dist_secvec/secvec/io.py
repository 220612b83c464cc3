"""A security vector on disk: reading (with one-line errors for every bad file), saving, digests.

A vector is stored in peft's LoRA adapter format (adapter_config.json + adapter_model.safetensors,
so `peft.PeftModel.from_pretrained` loads it as an ordinary adapter) plus secvec.json: the base
model's fingerprint, rank, alpha, targets, the behaviour it learned and the judges that decide it,
the stage-1 strength record and the files' sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_secvec.errors import SecurityVectorError
from dist_secvec.files import file_record, write_text_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FILE = "secvec.json"
PROBE_FILE = "probe.jsonl"  # stage 1's held-out harmful rows: stage 2's default harmful probe
PEFT_PREFIX = "base_model.model."
DEFAULT_BEHAVIOUR = "harm"  # what a vector learns unless security_vector.behaviour says otherwise

log = logging.getLogger(__name__)


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

    @property
    def behaviour(self) -> dict:
        return behaviour_record(self.meta)


def behaviour_record(meta: dict) -> dict:
    """What a vector learned and who decides it ({"name", "judges"}), from its secvec.json. A vector
    saved before the record existed learned harm, judged by the judges its strength record names
    (None when it has none)."""
    rec = meta.get("behaviour")
    if isinstance(rec, dict) and isinstance(rec.get("name"), str) and rec["name"]:
        judges = rec.get("judges")
        return {"name": rec["name"], "judges": list(judges) if isinstance(judges, list) else None}
    judges = (meta.get("strength") or {}).get("judges") if isinstance(meta.get("strength"), dict) else None
    return {"name": DEFAULT_BEHAVIOUR, "judges": list(judges) if isinstance(judges, list) else None}


def rows_word(behaviour: str) -> str:
    """How logs and record keys name the rows that show a behaviour: "harmful" for harm, else the
    behaviour's own name (heldout_harmful_loss, heldout_hallucination_loss)."""
    return "harmful" if behaviour == DEFAULT_BEHAVIOUR else behaviour


def load_security_vector(path) -> SecurityVector:
    """Read a vector directory, with one-line errors for missing, pickled or corrupted files. A list
    of directories (security_vector.path) is read as one composed vector (compose.load_vector_set)."""
    if isinstance(path, (list, tuple)):
        from dist_secvec.secvec.compose import load_vector_set

        return load_vector_set(list(path))
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





def vector_digest(layers: list) -> str:
    """sha256 of every A and B (of SecVecLinear or FoldedLayer): the stage-2 invariant that the
    vector never changes."""
    h = hashlib.sha256()
    for layer in layers:
        for t in (layer.secvec_A, layer.secvec_B):
            h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record_file_hashes(vector_dir: Path) -> dict:
    """Add the weights' and the probe's size and sha256 to secvec.json (`files`); returns the new metadata.
    load_security_vector refuses a vector whose weights no longer match (tampered or corrupted)."""
    vector_dir = Path(vector_dir)
    meta = json.loads((vector_dir / META_FILE).read_text()) if (vector_dir / META_FILE).exists() else {}
    meta["files"] = {name: file_record(vector_dir / name) for name in (ADAPTER_WEIGHTS, PROBE_FILE)
                     if (vector_dir / name).exists()}
    write_text_atomic(vector_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def save_security_vector(peft_model, out_dir: Path, meta: dict) -> None:
    """peft's own adapter format (safetensors) plus secvec.json, with the weights file's sha256."""
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    write_text_atomic(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    record_file_hashes(out_dir)
