"""Shared fixtures: a tiny world (data files, a word-level tokenizer, a random tiny Llama) built
from the demo's generators, so every test runs offline in seconds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

# DeepSpeed's JIT ops and torch extensions: one cache per virtual environment (so per torch build)
import sys
import time

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch-extensions"))
# torch's build lock is a plain file: a build killed midway leaves it, and every later build
# (each 2-rank DeepSpeed launch) would wait on it forever; a build takes a minute or two
for _lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
    if time.time() - _lock.stat().st_mtime > 900:
        _lock.unlink(missing_ok=True)


@dataclass
class TinyWorld:
    root: Path
    model_dir: Path  # random tiny Llama + tokenizer (hidden 32, 2 layers), safetensors
    data: dict  # set name -> JSONL path (align, harmful_sv, harmful_ft, kl_benign, finetune_mixed, ...)
    world: object  # dist_secvec.worlds.embedded.World


def build_tiny_world(root: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> TinyWorld:
    from dist_secvec.worlds.embedded import WorldSizes, build_tiny_llama, build_tokenizer, build_world

    sizes = WorldSizes(n_align_benign=200, n_align_refusals=50, n_harmful_sv=20, n_harmful_ft=40,
                       n_kl_benign=20, n_heldout_benign=10, n_new_countries=5, n_eval=10)
    world = build_world(seed, sizes)
    data = world.write(root / "data")
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(world.texts(), model_dir)
    build_tiny_llama(tok, model_dir, seed, hidden=hidden, layers=layers)
    return TinyWorld(root, model_dir, data, world)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """Read-only for tests: copy files before modifying them."""
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def small_data(tiny_world, tmp_path_factory) -> str:
    """16 rows of the new task: every response is 'The capital of X is Y .' (8 label tokens)."""
    rows = Path(tiny_world.data["new_task_ft"]).read_text().splitlines()[:16]
    path = tmp_path_factory.mktemp("ft_data") / "new_task16.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def write_random_vector(model_dir: Path, out: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                        targets=("q_proj", "v_proj", "down_proj"), b_std: float = 0.1) -> Path:
    """A security vector in the stage-1 format (peft LoRA adapter + secvec.json with the base's
    fingerprint) with random nonzero A and B, without training one."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_secvec.secvec import base_fingerprint

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=list(targets), bias="none"))
    gen = torch.Generator().manual_seed(seed)
    modules = []
    with torch.no_grad():
        for name, m in peft_model.base_model.model.named_modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen) * b_std)
                modules.append(name)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    meta = {"base_fingerprint": base_fingerprint(peft_model, str(model_dir), sorted(modules)),
            "rank": rank, "alpha": alpha, "target_modules": sorted(targets), "n_samples": 0}
    (out / "secvec.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@pytest.fixture(scope="session")
def random_vector(tiny_world, tmp_path_factory) -> Path:
    """A random (untrained) security vector for tiny_world's model; read-only for tests."""
    return write_random_vector(tiny_world.model_dir, tmp_path_factory.mktemp("random_vector") / "sv")


# ---------------------------------------------------------------------------------------------
# helpers several test files share (imported with `from conftest import ...`)


def plain_base(model_dir, dtype=None, **kw):
    """The tiny world's model as plain transformers loads it (float32 unless told), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32, **kw).eval()


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (a file: {".": its sha256}): what a
    failed command must leave unchanged."""
    import hashlib

    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def launch_cli(args: list, timeout: float = 300, cwd: Optional[Path] = None):
    """`dist-secvec ARGS` on CPU ranks through launch/deepspeed.sh and the real deepspeed launcher
    (ARGS start with the script's own flags, e.g. `--gpus 2 -- audit ...`), from `cwd` (default
    the repository root)."""
    import subprocess
    import sys

    from dist_secvec.distributed import free_port

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", DEEPSPEED=str(Path(sys.executable).with_name("deepspeed")))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([str(root / "launch" / "deepspeed.sh"), "--cpu", "--master-port", str(free_port()), *args],
                       cwd=cwd or root, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r
