"""Host-side launch set-up shared by the Triton kernels (secvec_delta.py, secvec_lora_delta.py).

Checks, block sizes, grid split, dot precision and warps for a row-block kernel that walks the N
blocks of its rows, and the output buffers of an autograd Function that may update base_out in
place. Imported as `dist_secvec.kernels.host` (kernels/ has no __init__.py; see pyproject.toml).
"""

import torch
import triton

from dist_secvec.kernels.torch_ops import can_update_in_place, rows_view

MAX_RANK = 128


def is_interpreted(kernel) -> bool:
    """triton.jit picks the interpreter when the kernel is decorated (TRITON_INTERPRET=1 at import
    of its module), so ask the kernel object rather than the environment, which may change later."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(inp: torch.Tensor, interpreted: bool, ranks: dict) -> None:
    """Every rank in 1..MAX_RANK ({name: r}, e.g. {"security vector": r}), and a CUDA tensor unless
    the kernel is interpreted."""
    for name, R in ranks.items():
        if not 1 <= R <= MAX_RANK:
            raise ValueError(f"{name} rank {R} is outside 1..{MAX_RANK} supported by the Triton kernel; "
                             "use backend='torch' (security_vector.backend=torch)")
    if inp.device.type != "cuda" and not interpreted:
        raise RuntimeError(f"the Triton secvec kernel needs a CUDA tensor (got {inp.device}); "
                           "use backend='torch' (or TRITON_INTERPRET=1 before this module is imported)")


def pad_rank(R: int) -> int:
    """A power of two >= 16 (tl.dot's minimum); loads past R are masked."""
    return max(16, triton.next_power_of_2(R))


#: GPU tiles (BLOCK_M, BLOCK_K, BLOCK_N, warps) by the sum of the padded ranks (one or both
#: accumulators), for 16-bit and for float32 dot inputs: the largest tiles that ptxas compiles for
#: sm_80 and sm_90 without spilling registers and within shared memory (kernels/aot.py measures
#: it, tests/test_kernel_compile.py checks it). A spill would put the rank-r intermediate or the
#: output tile in local memory: the memory traffic that fusing exists to remove.
GPU_TILES = {
    False: ((16, (64, 64, 128, 8)), (80, (32, 64, 128, 8)), (256, (32, 32, 64, 8))),  # fp16/bf16
    True: ((16, (32, 64, 128, 8)), (128, (32, 32, 64, 8)), (256, (16, 32, 32, 8))),  # fp32
}


def blocks(M: int, K: int, N: int, r_pads: tuple[int, ...], interpreted: bool,
           dot_fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, warps) for BLOCK_M x r_pad fp32 accumulators, one per padded rank
    in r_pads. Interpreter: its cost is per program and per loop trip, so cover small shapes in one.
    GPU: GPU_TILES by dot dtype and the padded ranks' sum; BLOCK_M no larger than the rows need."""
    p2 = triton.next_power_of_2
    if interpreted:
        return min(max(p2(M), 16), 128), min(max(p2(K), 16), 256), min(max(p2(N), 16), 256), 4
    r_pad = sum(r_pads)
    block_m, block_k, block_n, warps = next(t for limit, t in GPU_TILES[dot_fp32] if r_pad <= limit)
    return min(max(p2(M), 16), block_m), block_k, block_n, warps


def grid(inp: torch.Tensor, M: int, N: int, block_m: int, block_n: int, split_n: int | None) -> tuple[int, int]:
    """(row blocks, programs per row block). split_n default: enough programs to fill the GPU
    (2 per SM), 1 off CUDA; never more than the N blocks."""
    m_blocks, n_blocks = triton.cdiv(M, block_m), max(1, triton.cdiv(N, block_n))
    if split_n is None:
        split_n = 1
        if inp.device.type == "cuda":
            sms = torch.cuda.get_device_properties(inp.device).multi_processor_count
            split_n = min(n_blocks, max(1, triton.cdiv(2 * sms, m_blocks)))
    return m_blocks, min(split_n, n_blocks)


def dot_config(dtype: torch.dtype, interpreted: bool, matmul_precision: str | None = None) -> tuple[bool, str | None]:
    """(DOT_FP32, PRECISION): fp32 inputs, and bf16 in the interpreter (whose bf16 tl.dot is wrong),
    dot in fp32, IEEE unless the float32 matmul precision allows TF32 (`matmul_precision`, default
    torch's current torch.get_float32_matmul_precision())."""
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)
    if not dot_fp32:
        return False, None
    matmul_precision = matmul_precision or torch.get_float32_matmul_precision()
    return True, "ieee" if matmul_precision == "highest" else "tf32"


def output_buffers(x: torch.Tensor, base_out: torch.Tensor, inplace: bool):
    """(out, out2d, base2d, in_place) for a forward that writes base_out + delta: base_out's own rows
    when inplace is asked and torch_ops.can_update_in_place allows it (the caller then marks base_out
    dirty), else a fresh output (torch.empty: the kernel writes every element)."""
    N = base_out.shape[-1]
    rows = rows_view(base_out) if inplace and can_update_in_place(x, base_out) else None
    if rows is not None:
        return base_out, rows, rows, True
    out = torch.empty(base_out.shape, dtype=base_out.dtype, device=base_out.device)
    return out, out.view(-1, N), base_out.reshape(-1, N), False
