#!/usr/bin/env python3
"""Memory per GPU for a ZeRO-3 run: DeepSpeed's cold estimator, plus a QLoRA-aware estimate.

DeepSpeed's `estimate_zero3_model_states_mem_needs_all_cold` assumes every parameter is trained
in mixed precision (18 bytes/param: 16-bit weight and gradient, fp32 master weight and two Adam
moments, spread over all GPUs). For QLoRA with a frozen security vector most parameters are a
frozen 4-bit base, so it overstates by an order of magnitude; the second block prints our own
estimate of the model states:

    base      = P_quant * (0.5 + qconst) + P_16bit * 2     bytes (NF4 weights + 16-bit rest)
    vector    = P_sv * 2                                   bytes (frozen bf16 security vector)
    trainable = P_lora * (2 + 2 + 12)                      bytes (bf16 weight + bf16 grad +
                                                                  fp32 master, Adam m and v)
    per GPU   = (base + vector + trainable) / (gpus_per_node * nodes) + 4 * largest_layer

qconst is the quantization-constant overhead: 0.127 bit/param with double quantization
(8-bit absmax per 64 weights + fp32 per 256 blocks), 0.5 bit/param without. P_16bit are the
unquantized parameters (embeddings and lm_head, by default 2 x largest layer for Llama-2).
4 * largest_layer is the gather buffer that DeepSpeed's estimator also counts. Activations,
the CUDA context (~0.5-1 GiB) and allocator fragmentation come on top in both estimates.
With a quantized base, transformers' from_pretrained skips ZeRO-3's partitioned loading, so
each rank first holds the whole 4-bit model until deepspeed.initialize partitions it: that
load peak is printed too and must fit one GPU.

Examples:
    python launch/estimate_memory.py --model llama2-7b --gpus-per-node 8
    python launch/estimate_memory.py --model llama2-70b --gpus-per-node 8 --quant nf4 --lora-rank 16 --sv-rank 8
    python launch/estimate_memory.py --params 6738415616 --largest-layer 131072000 --quant nf4 --lora-params 39976960
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys

GIB = 2**30

# Llama-2 shapes (config.json of the meta-llama/Llama-2-*-hf checkpoints); kv = num_key_value_heads * head_dim.
PRESETS = {
    "llama2-7b": dict(hidden=4096, intermediate=11008, layers=32, kv=4096, vocab=32000),
    "llama2-13b": dict(hidden=5120, intermediate=13824, layers=40, kv=5120, vocab=32000),
    "llama2-70b": dict(hidden=8192, intermediate=28672, layers=80, kv=1024, vocab=32000),
}


def llama_params(hidden: int, intermediate: int, layers: int, kv: int, vocab: int) -> dict:
    """Parameter counts of a Llama block stack with untied embeddings and lm_head."""
    attn = 2 * hidden * hidden + 2 * hidden * kv  # q, o: h x h; k, v: h x kv
    mlp = 3 * hidden * intermediate  # gate, up, down
    per_layer = attn + mlp + 2 * hidden  # + two RMSNorm weights
    embed = vocab * hidden
    total = layers * per_layer + 2 * embed + hidden  # + embed_tokens, lm_head, final norm
    return {"total": total, "largest_layer": embed, "unquantized": 2 * embed + layers * 2 * hidden + hidden}


def llama_lora_params(rank: int, hidden: int, intermediate: int, layers: int, kv: int, **_: int) -> int:
    """Parameters of a rank-r LoRA on all seven linears (q k v o gate up down) of every block."""
    per_layer = rank * (2 * hidden + (hidden + kv) * 2 + 2 * hidden + 3 * (hidden + intermediate))
    return layers * per_layer


def cold_estimate(total_params: int, largest_layer_params: int, num_gpus_per_node: int, num_nodes: int,
                  cpu_offload: bool, cpu_offload_params: bool, zero_init: bool,
                  additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """Same formula as deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs (0.19.8)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per_param = 18 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 18 * gpus_factor)
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per_param = 16 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 16 * gpus_factor)
        cpu_mem = total_params * per_param * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        held = largest_layer_params if zero_init else total_params
        cpu_mem = held * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def deepspeed_estimator():
    """DeepSpeed's own estimate_zero3_model_states_mem_needs, or None when deepspeed cannot be imported.

    It is the function that estimate_zero3_model_states_mem_needs_all_cold calls for each row of
    its table; the table is printed here so that it reads the same with or without deepspeed.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the accelerator warning at import goes to stdout
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except Exception:  # noqa: BLE001 - any import failure means: fall back to the copied formula
        return None

    def estimate(*args, **kwargs):
        cpu_mem, gpu_mem, _largest_layer_memory = estimate_zero3_model_states_mem_needs(*args, **kwargs)
        return cpu_mem, gpu_mem

    return estimate


def cold_table(total_params: int, largest_layer_params: int, num_gpus_per_node: int, num_nodes: int,
               additional_buffer_factor: float = 1.5, estimator=None) -> str:
    """The table DeepSpeed's estimate_zero3_model_states_mem_needs_all_cold prints."""
    estimator = estimator or cold_estimate
    nodes_str = "nodes" if num_nodes > 1 else "node"
    gpus_str = "GPUs" if num_gpus_per_node > 1 else "GPU"
    lines = [
        f"HW: Setup with {num_nodes} {nodes_str}, {num_gpus_per_node} {gpus_str} per node.",
        f"SW: Model with {int(total_params / 1e6)}M total params, "
        f"{int(largest_layer_params / 1e6)}M largest layer params.",
        "  per CPU  |  per GPU |   Options",
    ]
    for cpu_offload in (True, False):
        for cpu_offload_params in (True, False):
            if not cpu_offload and cpu_offload_params:
                continue
            for zero_init in (True, False):
                cpu_mem, gpu_mem = estimator(total_params=total_params, largest_layer_params=largest_layer_params,
                                             num_gpus_per_node=num_gpus_per_node, num_nodes=num_nodes,
                                             cpu_offload=cpu_offload, cpu_offload_params=cpu_offload_params,
                                             zero_init=zero_init, additional_buffer_factor=additional_buffer_factor)
                opts = (f"offload_param={'cpu ' if cpu_offload_params else 'none'}, "
                        f"offload_optimizer={'cpu ' if cpu_offload else 'none'}, zero_init={1 if zero_init else 0}")
                lines.append(f" {cpu_mem / GIB:7.2f}GB | {gpu_mem / GIB:6.2f}GB | {opts}")
    return "\n".join(lines) + "\n"


def quantized_estimate(total_params: int, largest_layer_params: int, unquantized_params: int, gpus: int,
                       quant: str, lora_params: int, sv_params: int, double_quant: bool = True) -> dict:
    """Model-state bytes of a frozen (4-bit or 16-bit) base + frozen vector + trainable LoRA."""
    if quant == "nf4":
        quantized = total_params - unquantized_params
        qconst = (8 / 64 + 32 / (64 * 256)) / 8 if double_quant else 32 / 64 / 8
        base = quantized * (0.5 + qconst) + unquantized_params * 2
    else:
        base = total_params * 2.0
    vector = sv_params * 2.0
    trainable = lora_params * (2 + 2 + 12)
    buffer = 4 * largest_layer_params
    return {
        "base": base, "vector": vector, "trainable": trainable, "buffer": buffer,
        "per_gpu": (base + vector + trainable) / gpus + buffer,
        "load_peak": base + vector + buffer,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="estimate_memory.py",
        description="Per-GPU memory of model states under ZeRO-3: DeepSpeed's cold estimator and a QLoRA-aware one.")
    p.add_argument("--model", choices=sorted(PRESETS), help="fill --params/--largest-layer from a Llama-2 preset")
    p.add_argument("--params", type=int, help="total parameters of the base model")
    p.add_argument("--largest-layer", type=int, help="parameters of the largest single module (embedding for Llama)")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--quant", choices=("nf4", "none"), default="none", help="base weights: 4-bit NF4 or 16-bit")
    p.add_argument("--lora-params", type=int, help="trainable LoRA parameters (0 = full fine-tuning)")
    p.add_argument("--lora-rank", type=int, help="with --model: LoRA rank on all seven linears")
    p.add_argument("--sv-params", type=int, help="frozen security-vector parameters (bf16)")
    p.add_argument("--sv-rank", type=int, help="with --model: security-vector rank on all seven linears")
    p.add_argument("--unquantized-params", type=int,
                   help="parameters kept 16-bit under --quant nf4 (default: preset's embeddings+lm_head+norms, "
                        "else 2 x --largest-layer)")
    p.add_argument("--no-double-quant", action="store_true", help="bnb_4bit_use_double_quant=False")
    p.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor (CPU)")
    p.add_argument("--formula-only", action="store_true",
                   help="do not import deepspeed; print the same table from the copied formula")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    preset = PRESETS.get(a.model) if a.model else None
    counts = llama_params(**preset) if preset else None
    total = a.params if a.params is not None else (counts["total"] if counts else None)
    largest = a.largest_layer if a.largest_layer is not None else (counts["largest_layer"] if counts else None)
    if total is None or largest is None:
        parser.error("give --model, or both --params and --largest-layer")
    if (a.lora_rank or a.sv_rank) and not preset:
        parser.error("--lora-rank/--sv-rank need --model; give --lora-params/--sv-params instead")
    for name in ("params", "largest_layer", "gpus_per_node", "nodes"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    lora = a.lora_params if a.lora_params is not None else (
        llama_lora_params(a.lora_rank, **preset) if a.lora_rank else 0)
    sv = a.sv_params if a.sv_params is not None else (llama_lora_params(a.sv_rank, **preset) if a.sv_rank else 0)
    unquant = a.unquantized_params if a.unquantized_params is not None else (
        counts["unquantized"] if counts else 2 * largest)
    gpus = a.gpus_per_node * a.nodes

    estimator = None if a.formula_only else deepspeed_estimator()
    if estimator is None and not a.formula_only:
        print("note: deepspeed is not importable; using the formula copied from deepspeed 0.19.8", file=sys.stderr)
    print(f"[DeepSpeed ZeRO-3 cold estimate (deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs):"
          f" model states only, all {total:,} params trainable]")
    sys.stdout.write(cold_table(total, largest, a.gpus_per_node, a.nodes, a.buffer_factor, estimator))
    if a.quant == "none" and lora == 0:
        print("[full fine-tuning: the DeepSpeed row 'offload_param=none, offload_optimizer=none, zero_init=1' "
              "is the per-GPU model-state estimate]")
        return 0
    e = quantized_estimate(total, largest, unquant, gpus, a.quant, lora, sv, double_quant=not a.no_double_quant)
    base_kind = "NF4 4-bit" if a.quant == "nf4" else "16-bit"
    print(f"[our estimate: frozen {base_kind} base + frozen bf16 vector ({sv:,} params) "
          f"+ trainable LoRA ({lora:,} params), ZeRO-3 over {gpus} GPU{'s' if gpus > 1 else ''}]")
    print(f"  base {e['base'] / GIB:.2f} GiB + vector {e['vector'] / GIB:.2f} GiB + LoRA states "
          f"{e['trainable'] / GIB:.2f} GiB (16 B/param), sharded / {gpus}, + gather buffer {e['buffer'] / GIB:.2f} GiB")
    print(f"  per GPU (steady state): {e['per_gpu'] / GIB:.2f} GiB + activations")
    print(f"  per GPU at load (whole quantized model on every rank before partitioning): "
          f"{e['load_peak'] / GIB:.2f} GiB" if a.quant == "nf4" else
          f"  per GPU at load (ZeRO-3 partitioned loading): {e['per_gpu'] / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
