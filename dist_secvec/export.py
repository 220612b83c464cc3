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



from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.errors import UserError
from dist_secvec.model import DTYPES
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


def run_export(cfg: Config) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _source_dir(cfg.export.checkpoint)
    dst = Path(cfg.output_dir)
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"config key 'output_dir': '{dst}' already exists and is not empty; "
                        "choose a new directory for the export")
    dtype = DTYPES[cfg.export.dtype]
    tok = AutoTokenizer.from_pretrained(str(src))
    is_adapter = (src / "adapter_config.json").exists()
    with runtime.atomic_dir(dst) as tmp:
        if is_adapter:
            from peft import PeftModel

            base_path = cfg.model.path or json.loads((src / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
            if not base_path:
                raise UserError("config key 'model.path': the adapter names no base model; set model.path")
            # merging needs the 16-bit base weights, never the 4-bit ones used for training
            base = AutoModelForCausalLM.from_pretrained(os.path.expanduser(base_path), dtype=dtype)
            model = PeftModel.from_pretrained(base, str(src))
            assert_no_security_vector(model)
            if cfg.export.merge:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
        assert_no_security_vector(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        kind = "merged model" if is_adapter and cfg.export.merge else "adapter" if is_adapter else "model"
        (tmp / "dist_secvec_export.json").write_text(json.dumps(
            {"source": str(src), "kind": kind, "dtype": cfg.export.dtype, "security_vector": None}, indent=2) + "\n")
    log.info("exported %s to %s", kind, dst)
    return dst

