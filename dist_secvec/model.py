"""Loading the base model and tokenizer, and adding the trainable LoRA adapter.

The base comes from a local directory or a hub id (the hub only where the network allows), in
fp32/bf16/fp16 or quantized by bitsandbytes (NF4/FP4 4-bit, int8), which also works on CPU.
"""

from __future__ import annotations

import logging
import os

import torch

from dist_secvec.config import AdapterConfig, ModelConfig
from dist_secvec.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def _hub_error(what: str, name: str, e: Exception) -> UserError:
    return UserError(f"config key 'model.path': cannot load the {what} from '{name}' "
                     f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                     "point it at a local model directory")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise _hub_error("tokenizer", name, e) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer '{name}' has neither a pad nor an EOS token; add one to its "
                            "special_tokens_map.json")
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,  # nf4 | fp4
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_quant_storage=DTYPES[cfg.quant_storage],
    )


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu", for_training: bool = False):
    """AutoModelForCausalLM in the configured dtype/quantization; every base weight frozen."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    qcfg = quantization_config(cfg)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes while placing weights
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(cfg.path), **kwargs)
    except Exception as e:
        raise _hub_error("model", cfg.path, e) from e
    if qcfg is None:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if for_training and cfg.gradient_checkpointing:
        # reentrant checkpointing is the variant that works with frozen weights under ZeRO-3
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def lora_config(cfg: AdapterConfig | None = None, *, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, target_modules: list[str] | None = None, layers: list[int] | None = None):
    from peft import LoraConfig

    if cfg is not None:
        rank, alpha, dropout, target_modules = cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      layers_to_transform=list(layers) if layers else None, bias="none", task_type="CAUSAL_LM")


def add_trainable_adapter(model, cfg: AdapterConfig):
    """Full fine-tuning (adapter.type=none): unfreeze every weight. LoRA: wrap with peft."""
    if cfg.type == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as e:
        raise UserError(f"config key 'adapter.target_modules': {str(e).splitlines()[0][:200]}") from e


def unwrap_base(model):
    """The transformers model under any peft wrapper."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
