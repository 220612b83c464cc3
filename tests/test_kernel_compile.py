"""The Triton kernels as a GPU would run them, compiled on this CPU machine (kernels/aot.py).

The interpreter tests (test_kernels, test_secvec_lora_delta) check the kernels' numbers; they never
compile them. Here every launch configuration the host code picks (kernels/host.py: tiles, warps,
dot precision, rank padding) goes through triton's whole CUDA pipeline down to a cubin for A100
(sm_80) and H100/H200 (sm_90), in a fresh process without TRITON_INTERPRET, and ptxas' own report
must show no register spills and shared memory within the architecture's limit.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# not imported here: importing triton at collection would make the interpreter tests rerun in
# fresh processes (tests/triton_env.py)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "dist_secvec.kernels.aot", "--out", str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "resources.json").read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return _run_aot(tmp_path_factory.mktemp("aot"), "--dtypes", "bf16", "fp16", "--bases", "with")


def test_every_launch_compiles_for_a100_and_h100(rows):
    got = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    want = {(k, d, a) for k in ("secvec_delta", "secvec_lora_delta") for d in ("bf16", "fp16")
            for a in ("sm_80", "sm_90")}
    assert got == want
    from dist_secvec.kernels.host import pad_rank

    pads = {tuple(pad_rank(x) for x in r["ranks"]) for r in rows}  # one compile per padded rank
    assert {(16,), (32,), (64,), (128,), (16, 16), (16, 64), (64, 64), (128, 128)} <= pads  # ranks 1..128, alone and with a LoRA
    assert all(r["registers"] > 0 for r in rows)


def test_no_launch_spills_registers(rows):
    spilled = [(r["kernel"], r["dtype"], r["ranks"], r["arch"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilled, spilled


def test_shared_memory_within_the_limit(rows):
    from dist_secvec.kernels.aot import SHARED_LIMIT

    assert all(0 < r["shared_bytes"] <= SHARED_LIMIT[r["arch"]] for r in rows)


def test_launches_follow_the_host_tiles(rows):
    """What was compiled is what host.blocks picks: the tiles shrink as the padded ranks grow."""
    from dist_secvec.kernels.host import GPU_TILES, pad_rank

    for r in rows:
        total = sum(pad_rank(x) for x in r["ranks"])
        want = next(t for limit, t in GPU_TILES[r["constexprs"]["DOT_FP32"]] if total <= limit)
        c = r["constexprs"]
        assert (c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_N"], r["num_warps"]) == want, r
