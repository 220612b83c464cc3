"""Shared fixtures: a tiny world (data files, a word-level tokenizer, a random tiny Llama) built
from the demo's generators, so every test runs offline in seconds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# DeepSpeed's JIT ops and torch extensions: one stable cache for the whole test run
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dist-secvec-torch-ext"))


@dataclass
class TinyWorld:
    root: Path
    model_dir: Path  # random tiny Llama + tokenizer (hidden 32, 2 layers), safetensors
    data: dict  # set name -> JSONL path (align, harmful_sv, harmful_ft, kl_benign, finetune_mixed, ...)
    world: object  # dist_secvec.demo.world.World


def build_tiny_world(root: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> TinyWorld:
    from dist_secvec.demo.world import WorldSizes, build_tiny_llama, build_tokenizer, build_world

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
