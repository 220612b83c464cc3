"""Loading the base model and tokenizer, and adding the trainable LoRA adapter.

The base comes from a local directory or a hub id (the hub only where the network allows), in
fp32/bf16/fp16 or quantized by bitsandbytes (NF4/FP4 4-bit, int8), which also works on CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dist_secvec.config import AdapterConfig, ModelConfig
from dist_secvec.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def _hub_error(what: str, name: str, e: Exception) -> UserError:
    return UserError(f"config key 'model.path': cannot load the {what} from '{name}' "
                     f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
                     "point it at a local model directory")


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt",
                  "adapter_model.bin", "tf_model.h5", "flax_model.msgpack")


def safetensors_problem(path: str) -> str | None:
    """Why `path` is not a complete safetensors file (header and data size checked without reading
    the tensors), or None when it looks whole."""
    import json
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it is {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "its header runs past the end of the file (truncated?)"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"its header cannot be read ({type(e).__name__})"
    if not isinstance(header, dict):
        return "its header is not a mapping of tensors"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"its header entry for '{name}' is malformed"
    if 8 + n + end != size:
        return f"it is {size} bytes but its header describes {8 + n + end} (truncated or padded)"
    return None


def check_model_dir(path: str, key: str = "model.path", need_weights: bool = True) -> None:
    """A local model directory that from_pretrained can load with safetensors only, checked in
    milliseconds before anything heavy: config.json, weights as safetensors (one file or a
    shard index whose shards exist), no pickle fallback, no truncated file.
    Hub ids (not a local directory) are left to from_pretrained."""
    import json

    d = os.path.expanduser(path)
    if not os.path.isdir(d):
        if os.path.exists(d):
            raise UserError(f"config key '{key}': '{path}' is a file; point it at the model directory")
        return
    names = set(os.listdir(d))
    if "manifest.json" in names:  # written by dist-secvec (finetune final/, export): every file as listed
        from dist_secvec.manifest import verify_manifest

        verify_manifest(Path(d), what=f"config key '{key}': model directory",
                        fix="re-run the stage that wrote it or re-copy the whole directory")
    if "config.json" not in names and "adapter_config.json" in names:  # a LoRA run's final/: peft loads its base
        if "adapter_model.safetensors" not in names:
            raise UserError(f"config key '{key}': adapter directory '{path}' has no adapter_model.safetensors"
                            + (" (only adapter_model.bin, a pickle: only safetensors are loaded)"
                               if "adapter_model.bin" in names else "") + "; copy the whole final/ directory")
        problem = safetensors_problem(os.path.join(d, "adapter_model.safetensors"))
        if problem:
            raise UserError(f"config key '{key}': '{os.path.join(path, 'adapter_model.safetensors')}' is corrupted: "
                            f"{problem}; re-copy the run")
        return
    if "config.json" not in names:
        what = "is empty" if not names else "has no config.json"
        raise UserError(f"config key '{key}': model directory '{path}' {what}; point it at a Hugging Face "
                        "model directory (config.json + model.safetensors + tokenizer files)")
    try:
        json.loads(open(os.path.join(d, "config.json"), encoding="utf-8").read())
    except (OSError, ValueError) as e:
        raise UserError(f"config key '{key}': '{os.path.join(path, 'config.json')}' is not valid JSON "
                        f"({type(e).__name__}); re-copy the model directory") from e
    if not need_weights:
        return
    shards: list[str] = []
    if "model.safetensors.index.json" in names:
        index = os.path.join(d, "model.safetensors.index.json")
        try:
            weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"config key '{key}': '{index}' is not a valid shard index ({type(e).__name__}); "
                            "re-copy the model directory") from e
        missing = [s for s in shards if s not in names]
        if missing:
            raise UserError(f"config key '{key}': model directory '{path}' lacks shard '{missing[0]}' named in "
                            "model.safetensors.index.json; re-copy the model directory")
    elif "model.safetensors" in names:
        shards = ["model.safetensors"]
    else:
        pickles = sorted(names & set(PICKLE_WEIGHTS)) or sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
        if pickles:
            raise UserError(f"config key '{key}': model directory '{path}' has weights only as '{pickles[0]}' "
                            "(pickle, which can run code when loaded); only safetensors are loaded: convert it "
                            "(save_pretrained(..., safe_serialization=True)) on a trusted machine")
        raise UserError(f"config key '{key}': model directory '{path}' has config.json but no weights "
                        "(model.safetensors or model.safetensors.index.json); copy the weights too")
    for shard in shards:
        problem = safetensors_problem(os.path.join(d, shard))
        if problem:
            raise UserError(f"config key '{key}': '{os.path.join(path, shard)}' is corrupted: {problem}; "
                            "re-copy or re-download the model")


GGUF_VERSION = 1  # bump when the conversion below changes what it writes


def gguf_model_dir(gguf_file: str) -> Path:
    """The safetensors model directory converted from a GGUF checkpoint: transformers reads the
    file (its tokenizer and chat template included) and dequantizes the weights to float32; the
    result is saved once per file content under the cache and reused by every later stage, rank
    and run, which then load an ordinary model directory (and fingerprint the base from it)."""
    import json

    from dist_secvec.files import atomic_dir, cache_root, file_lock, sha256_file

    src = Path(os.path.expanduser(gguf_file)).resolve()
    digest = sha256_file(src)
    out = cache_root() / "gguf" / f"{src.stem}-{digest[:16]}"
    with file_lock(out.parent / f"{out.name}.lock"):
        if (out / "gguf_source.json").exists():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        log.info("converting GGUF checkpoint %s to a safetensors model directory in %s (once)", src, out)
        try:
            with _gguf_bar_off():
                tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
                # dequantize: a plain dense model, which ZeRO, LoRA and the vector's layers expect
                model = AutoModelForCausalLM.from_pretrained(
                    str(src.parent), gguf_file=src.name, dtype=torch.float32,
                    quantization_config=GgufConfig(gguf_file=str(src), dequantize=True))
        except Exception as e:
            raise UserError(f"config key 'model.gguf_file': cannot load GGUF checkpoint '{gguf_file}' "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); transformers "
                            "reads GGUF files of the architectures it lists as GGUF-supported") from e
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "gguf_source.json").write_text(json.dumps(
                {"gguf_file": str(src), "sha256": digest, "size": src.stat().st_size,
                 "conversion": GGUF_VERSION}, indent=1) + "\n")
    return out


def _gguf_bar_off():
    """transformers' GGUF reader draws its own tqdm bar, which no progress switch reaches: off
    except on rank 0's terminal, so a redirected log gets no redraws."""
    import contextlib
    import functools
    from unittest import mock

    from dist_secvec.runtime import is_main, stderr_is_terminal

    if is_main() and stderr_is_terminal():
        return contextlib.nullcontext()
    import transformers.modeling_gguf_pytorch_utils as reader
    from tqdm.auto import tqdm

    return mock.patch.object(reader, "tqdm", functools.partial(tqdm, disable=True))


def resolve_gguf(cfg: ModelConfig) -> None:
    """With model.gguf_file set: model.path becomes the converted directory (gguf_model_dir) and
    gguf_file is cleared, so the run's saved config loads that directory directly."""
    if not cfg.gguf_file:
        return
    out = gguf_model_dir(cfg.gguf_file)
    log.info("model.gguf_file %s: loading the converted model directory %s", cfg.gguf_file, out)
    cfg.path, cfg.gguf_file = str(out), None


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

    check_model_dir(cfg.path)
    # weights from safetensors only: a pickle checkpoint can run code when loaded
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    if cfg.attn_implementation != "auto":  # auto: transformers picks (sdpa where the model supports it)
        kwargs["attn_implementation"] = cfg.attn_implementation
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
        kwargs = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: the other name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def attn_implementation(model) -> str | None:
    """The attention kernel the loaded model runs (what model.attn_implementation=auto chose)."""
    config = getattr(unwrap_base(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def linear_targets(model, wanted: list[str] | None, key: str, model_path: str, vector: bool = False) -> list[str]:
    """The module names a LoRA (or, vector=True, the security vector) adapts on `model`: `wanted`,
    each checked against the model (a last name part such as q_proj, or a dotted tail of a module's
    name), or, unset, the last name part of every linear layer but the output head (peft's
    "all-linear": q_proj ... down_proj on Llama, qkv_proj and gate_up_proj on Phi-3). A name the
    model lacks, or (vector) a GPT-2 style Conv1D layer, is refused in one line naming `key`."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from dist_secvec.errors import ConfigError

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, Conv1D)) and m is not head and name}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    names = leaves if wanted is None else list(wanted)

    def matches(n: str) -> list:
        return [m for full, m in linears.items() if full == n or full.endswith("." + n)]

    missing = [n for n in names if not matches(n)]
    if missing:
        raise ConfigError(f"config key '{key}': {', '.join(missing)} not among the linear layers of {model_path} "
                          f"({', '.join(leaves) or 'none'}); name some of those")
    if vector:
        conv = sorted({n for n in names if any(isinstance(m, Conv1D) for m in matches(n))})
        if conv:
            raise ConfigError(f"config key '{key}': {', '.join(conv)} in {model_path} are transformers Conv1D "
                              "layers (GPT-2 style), which the security vector cannot adapt; it adapts nn.Linear "
                              "layers (Llama, Mistral, Qwen, Phi-3, Gemma and most current models)")
    return names


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
    import dataclasses

    from peft import get_peft_model

    path = getattr(getattr(model, "config", None), "_name_or_path", "the model")
    cfg = dataclasses.replace(cfg, target_modules=linear_targets(model, cfg.target_modules, "adapter.target_modules",
                                                                 path))
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
