"""Memory figures measured from the tensors themselves (this rank's), and the process's peak."""

from __future__ import annotations

import logging
import resource
import sys
from typing import Optional

import torch

from dist_secvec.distributed import held_numel, is_partitioned, numel

log = logging.getLogger(__name__)


def tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def held_bytes(p: torch.Tensor) -> int:
    """Bytes of p this rank holds: held_numel (its ZeRO-3 partition, or the whole tensor) x the
    element size."""
    t = p.ds_tensor if is_partitioned(p) else p
    return held_numel(p) * t.element_size()


def whole_bytes(p: torch.Tensor) -> int:
    """Bytes of the whole parameter (what one rank without ZeRO-3 holds)."""
    t = p.ds_tensor if is_partitioned(p) else p
    return numel(p) * t.element_size()


def resident_bytes(p: torch.Tensor) -> int:
    """Bytes of p resident on this rank right now: its partition plus whatever is gathered in
    p.data (ZeRO-3 keeps parameters under stage3_param_persistence_threshold whole on every rank)."""
    return tensor_bytes(p.data) + (tensor_bytes(p.ds_tensor) if is_partitioned(p) else 0)


def param_bytes(model) -> int:
    """Parameter bytes this rank holds (ZeRO-3: its partitions)."""
    return sum(held_bytes(p) for p in model.parameters())


def zero_grad_bytes(zero_optimizer) -> int:
    """Gradient bytes a ZeRO optimizer keeps outside p.grad: ZeRO-3's flat buffer of this rank's
    gradient partitions, or ZeRO-1/2's averaged gradient partitions; 0 for a plain optimizer."""
    buf = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(buf, torch.Tensor):
        return tensor_bytes(buf)
    total = 0
    avg = getattr(zero_optimizer, "averaged_gradients", None)
    if isinstance(avg, dict):
        for v in avg.values():
            total += sum(tensor_bytes(t) for t in (v or []) if isinstance(t, torch.Tensor))
    for t in getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or []:
        total += tensor_bytes(t.grad)
    return total


def grad_bytes(model) -> int:
    return sum(tensor_bytes(p.grad) for p in model.parameters())


def optimizer_state_bytes(optimizer, only: Optional[set] = None) -> int:
    """Bytes of every tensor in optimizer.state (for the params whose id is in `only`, if given)."""
    total = 0
    for p, state in optimizer.state.items():
        if only is not None and id(p) not in only:
            continue
        total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def vector_tensors(sv_layers: list, folded: list) -> list[torch.Tensor]:
    """The tensors that hold the vector: A and B of each SecVecLinear, and each base weight a
    folded vector lives in."""
    out = [t for layer in sv_layers for t in (layer.secvec_A, layer.secvec_B)]
    out += [f.linear.weight for f in folded]
    return out


def master_param_bytes(optimizer, model, zero_optimizer=None) -> int:
    """Bytes of the tensors the torch optimizer steps that are not the model's parameters: the
    fp32 master partitions a ZeRO optimizer keeps (ZeRO-3 takes them out of the param groups
    between steps, so its own lists count too); 0 in a plain run."""
    ids = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}
    cands = [p for g in optimizer.param_groups for p in g["params"]] + list(optimizer.state.keys())
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        cands += [t for t in getattr(zero_optimizer, attr, None) or [] if isinstance(t, torch.Tensor)]
    for t in cands:
        if isinstance(t, torch.Tensor) and id(t) not in ids:
            seen[id(t)] = t
    return sum(tensor_bytes(t) for t in seen.values())


def secvec_grad_bytes(sv_layers: list, folded: list) -> int:
    return sum(tensor_bytes(t.grad) for t in vector_tensors(sv_layers, folded))


def secvec_optimizer_bytes(optimizer, sv_layers: list, folded: list) -> int:
    ids = {id(t) for t in vector_tensors(sv_layers, folded)}
    in_groups = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) in ids)
    if in_groups:  # a vector tensor handed to the optimizer is a bug even before it has state
        log.error("%d security vector tensors are in the optimizer's param groups", in_groups)
    return optimizer_state_bytes(optimizer, ids)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda", "max_allocated": torch.cuda.max_memory_allocated(device),
                "max_reserved": torch.cuda.max_memory_reserved(device)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process_rss", "max_rss": rss * (1 if sys.platform == "darwin" else 1024)}


def mark_memory(device: torch.device) -> int:
    """Reset the CUDA peak stats; the bytes allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, base: int) -> dict:
    """peak_memory, plus on CUDA the peak allocated above `base` (what this job added)."""
    peak = peak_memory(device)
    if peak["kind"] == "cuda":
        peak["baseline_allocated"] = base
        peak["job_max_allocated"] = peak["max_allocated"] - base
    return peak


def peak_bytes(peak: Optional[dict]) -> Optional[int]:
    """The one number of a peak_memory record: what the job added (CUDA), else the peak."""
    if not peak:
        return None
    return peak.get("job_max_allocated", peak.get("max_allocated", peak.get("max_rss")))
