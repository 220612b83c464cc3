"""Model FLOPs of a training step, counted by hand, and the accelerator's peak for the MFU.

torch's FLOP counters count a full backward for frozen weights; this count gives them their input
gradient only, and the vector's delta its forward and input gradient (0 when folded).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_secvec.config import Config
from dist_secvec.model import unwrap_base

# dense peak TFLOP/s by GPU name fragment: (bf16/fp16 tensor core, fp32 without TF32)
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}


def flops_per_token(model, seq_len: float, sv_layers: list, folded: list) -> tuple[float, str, dict]:
    """Model FLOPs per token of one training step (forward + backward), counted by hand."""
    base = unwrap_base(model)
    frozen = trainable = 0
    for m in base.modules():
        if isinstance(m, nn.Linear):  # base linears, lm_head, peft's lora_A/lora_B (bnb layers too)
            n = m.in_features * m.out_features
            if m.weight.requires_grad:
                trainable += n
            else:
                frozen += n
    c = base.config
    n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    attn = 12 * n_layers * seq_len * n_heads * head_dim
    delta = 0
    for layer in sv_layers:
        if layer.active:
            r, k = getattr(layer.secvec_A, "ds_shape", layer.secvec_A.shape)  # ZeRO-3: the whole shape
            delta += 4 * r * (k + getattr(layer.secvec_B, "ds_shape", layer.secvec_B.shape)[0])
    total = 4 * frozen + 6 * trainable + attn + delta
    formula = (
        "flops_per_token = 4*P_frozen + 6*P_trainable + 12*n_layers*seq_len*n_heads*head_dim "
        "+ sum_adapted(4*r*(K+N)); "
        f"= 4*{frozen} + 6*{trainable} + 12*{n_layers}*{seq_len:.2f}*{n_heads}*{head_dim} + {delta} "
        f"= {total:.6g}. P = in*out of every nn.Linear (embedding lookups 0, biases/norms/softmax ignored); "
        "frozen weights: 2 fwd + 2 input-grad, trainable: + 2 weight-grad; attention: QK^T and AV, "
        "2 FLOPs per MAC each, fwd 4*seq_len*n_heads*head_dim per layer, x3 for fwd+bwd, seq_len = mean padded "
        "batch width, no causal halving; vector delta s*(x A^T) B^T: fwd 2r(K+N) + input-grad 2r(K+N), no "
        "weight grad, 0 when folded into the base weight. Excludes gradient-checkpointing recompute.")
    return float(total), formula, {"frozen_linear_params": frozen, "trainable_linear_params": trainable,
                                   "attention": attn, "secvec_delta": delta, "n_layers": n_layers,
                                   "n_heads": n_heads, "head_dim": head_dim, "seq_len": seq_len}


def peak_flops(cfg: Config, device: torch.device) -> tuple[Optional[float], str]:
    if cfg.profile.peak_tflops:
        return cfg.profile.peak_tflops * 1e12, "profile.peak_tflops"
    if device.type != "cuda":
        return None, "no accelerator peak on CPU (set profile.peak_tflops to get an MFU)"
    name = torch.cuda.get_device_name(device)
    for frag, (half, fp32) in GPU_PEAK_TFLOPS.items():
        if frag in name:
            low = cfg.model.dtype != "float32" or cfg.model.quantization != "none"
            return (half if low else fp32) * 1e12, f"table: {name} {'bf16' if low else 'fp32'} dense"
    return None, f"unknown GPU '{name}': set profile.peak_tflops"
