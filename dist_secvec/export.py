"""`dist-secvec export`: write the fine-tuned model for inference, with no trace of the vector.

A finetune run's final/ directory already has the vector removed. Export turns it into what
serving needs: a LoRA merged into a 16-bit copy of the base (export.merge=true), the adapter
alone (export.merge=false), or the fully fine-tuned model re-saved. Every tensor name is checked
for security-vector parameters, and a security-vector directory itself is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dist_secvec.config import Config
from dist_secvec.errors import UserError
from dist_secvec.files import atomic_dir
from dist_secvec.manifest import write_manifest
from dist_secvec.model import DTYPES, check_model_dir, safetensors_problem
from dist_secvec.secvec import META_FILE, security_vector_layers

log = logging.getLogger(__name__)


def _source_dir(path: str) -> Path:
    d = Path(os.path.expanduser(path))
    if (d / "final").is_dir():  # the run directory was given
        d = d / "final"
    if (d / META_FILE).exists():
        raise UserError(f"config key 'export.checkpoint': '{path}' is a security vector, not a fine-tuned "
                        "model; the vector is never exported")
    if not ((d / "adapter_config.json").exists() or (d / "config.json").exists()):
        raise UserError(f"config key 'export.checkpoint': '{path}' holds neither a model (config.json) nor "
                        "an adapter (adapter_config.json); point it at a finetune run's final/ directory")
    return d


def assert_no_security_vector(model) -> None:
    """Refuse to write a model that still carries the vector (a bug upstream if it happens)."""
    if security_vector_layers(model) or any("secvec_" in k for k in model.state_dict()):
        raise RuntimeError("refusing to export: the model still carries the security vector")


def _check_sources(src: Path, cfg: Config) -> tuple[bool, str | None]:
    """(is_adapter, base path for an adapter): every weight file safetensors and whole, checked
    before anything is loaded."""
    if not (src / "adapter_config.json").exists():
        check_model_dir(str(src), key="export.checkpoint")
        return False, None
    weights = src / "adapter_model.safetensors"
    if not weights.exists():
        if (src / "adapter_model.bin").exists():
            raise UserError(f"config key 'export.checkpoint': '{src}' holds adapter_model.bin (pickle, which can "
                            "run code when loaded); only safetensors are loaded: re-save the adapter with "
                            "safe_serialization=True")
        raise UserError(f"config key 'export.checkpoint': '{src}' has adapter_config.json but no "
                        "adapter_model.safetensors; copy the whole final/ directory")
    problem = safetensors_problem(str(weights))
    if problem:
        raise UserError(f"config key 'export.checkpoint': '{weights}' is corrupted: {problem}; re-copy the run")
    try:
        base_path = cfg.model.path or json.loads((src / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"config key 'export.checkpoint': '{src / 'adapter_config.json'}' is not valid JSON "
                        f"({type(e).__name__}); re-copy the run") from e
    if not base_path:
        raise UserError("config key 'model.path': the adapter names no base model; set model.path")
    check_model_dir(str(base_path), key="model.path")
    return True, str(base_path)


def run_export(cfg: Config) -> Path:
    src = _source_dir(cfg.export.checkpoint)
    dst = Path(cfg.output_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"config key 'output_dir': '{dst}' already exists and is not empty; "
                        "choose a new directory for the export")
    is_adapter, base_path = _check_sources(src, cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only once the inputs look right

    dtype = DTYPES[cfg.export.dtype]
    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise UserError(f"config key 'export.checkpoint': cannot load the tokenizer from '{src}' "
                        f"({type(e).__name__}); copy the whole final/ directory") from e
    with atomic_dir(dst) as tmp:
        if is_adapter:
            from peft import PeftModel

            # merging needs the 16-bit base weights, never the 4-bit ones used for training
            base = AutoModelForCausalLM.from_pretrained(os.path.expanduser(base_path), dtype=dtype,
                                                        use_safetensors=True)
            model = PeftModel.from_pretrained(base, str(src))
            assert_no_security_vector(model)
            if cfg.export.merge:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, use_safetensors=True)
        assert_no_security_vector(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        kind = "merged model" if is_adapter and cfg.export.merge else "adapter" if is_adapter else "model"
        (tmp / "dist_secvec_export.json").write_text(json.dumps(
            {"source": str(src), "kind": kind, "dtype": cfg.export.dtype, "security_vector": None}, indent=2) + "\n")
        write_manifest(tmp)  # last: sizes and sha256 of every file, checked when the export is loaded
    log.info("exported %s to %s", kind, dst)
    return dst
