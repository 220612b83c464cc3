"""Shared set-up of the Triton kernel tests (test_kernels, test_secvec_lora_delta,
test_kernel_training): import this module before anything that may import triton.

Without a GPU the kernels run in Triton's interpreter. triton.jit picks the interpreter when a
kernel is decorated, and triton's own helpers are decorated when triton is first imported, so
TRITON_INTERPRET=1 must be set before triton and the kernel modules are imported. This module
sets it for those imports only (not for the rest of the session, whose subprocesses would inherit
it) and the `interpreter_env` fixture sets it again around the tests (triton still reads it at
launch). peft and bitsandbytes import triton, so when another test module loaded them before
this module, TRITON_IN_PROCESS is False: the Triton tests skip (`needs_triton`) and each file's
fresh-process test (`rerun_in_fresh_process`) runs them in a new interpreter process.
"""

import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
TRITON_IN_PROCESS = DEVICE == "cuda" or _OLD_INTERPRET == "1" or "triton" not in sys.modules


def _set_interpret():
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"


def _restore_interpret():
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


_set_interpret()
if TRITON_IN_PROCESS:  # decorate triton's helpers and both kernels under the interpreter
    import dist_secvec.kernels.secvec_delta  # noqa: F401
    import dist_secvec.kernels.secvec_lora_delta  # noqa: F401
_restore_interpret()

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter_env():
    """Autouse in every module that imports it: TRITON_INTERPRET=1 during each test on CPU."""
    _set_interpret()
    yield
    _restore_interpret()


needs_triton = pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton was imported before TRITON_INTERPRET=1; "
                                  "this file's fresh-process test reruns it")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
TOL = {f32: 1e-5, f16: 2e-3, bf16: 2e-2}  # relative to the largest reference element


def _close(got, ref, *dtypes):
    """Within the tolerance of the least precise dtype the value passed through."""
    tol = max(TOL[d] for d in dtypes)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def _rand(*shape, dtype=f32, noncontig=False):
    """Fresh normal values; noncontig gives a stride-2 view of a buffer twice as wide."""
    if noncontig:
        return torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE).to(dtype)[..., ::2]
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.fixture
def nan_empty(monkeypatch):
    """Buffers the paths allocate start as nan, so an element they never write fails the test."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def rerun_in_fresh_process(test_file: str, select: str) -> None:
    """Run `pytest -k select` on test_file in a new process with TRITON_INTERPRET=1, all passing and
    none skipped. For a module whose Triton tests skipped here (not TRITON_IN_PROCESS)."""
    if TRITON_IN_PROCESS:
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
