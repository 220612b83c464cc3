"""Folding the security vector into a frozen unquantized base weight (LoRA stage 2).

W' = W + s * B @ A once at load replaces the per-step SecVecLinear delta; the original W comes
back bit for bit before saving. Full fine-tuning (W trains) and quantized bases keep the wrapper.
A folded run's output is not bit-identical to the unfolded run's: the trained LoRA differs in the
last bits (x (W + sBA)^T and x W^T + s (x A^T) B^T round differently). What is bit-identical: the
base weights the run hands on (and every untouched tensor of a merged export), the file sets,
manifest entries and tensor names of final/ and of the exports; the LoRA agrees within tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_secvec.stage2 as stage2_mod  # stage 2's setup and teardown, which finetune runs
from dist_secvec.config import load_config
from dist_secvec.errors import SecurityVectorError
from dist_secvec.export import run_export
from dist_secvec.finetune import run_finetune
from dist_secvec.stage2 import fold_choice
from dist_secvec.model import unwrap_base
from dist_secvec.secvec.layer import _inner_linear
from dist_secvec.secvec import (FoldedLayer, SecVecLinear, attach_security_vector,
                                detach_security_vector, fold_security_vector, load_security_vector,
                                security_vector_layers, unfold_security_vector, vector_digest)
from conftest import plain_base

STEPS = 4


def cfg_for(tw, out: Path, *overrides: str):
    return load_config(None, [f"model.path={tw.model_dir}", f"output_dir={out}", "logging.progress=false",
                              "seed=0", f"data.train={tw.data['finetune_mixed']}", "optim.lr=1e-2",
                              f"optim.max_steps={STEPS}", "optim.micro_batch_size=4", "optim.schedule=constant",
                              *overrides])


LORA = ("adapter.type=lora", "adapter.rank=4", "adapter.alpha=8")


class PathRecorder:
    """Wraps (never changes) fold/unfold/attach/detach and build_optimizer of finetune's job
    (stage2.py), recording which path ran and what the model looked like right after the vector
    went in."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.folded: list[FoldedLayer] = []
        self.wrapped: list[SecVecLinear] = []
        self.n_secvec_layers_after_fold = None
        self.folded_weights_changed = None
        self.optimizer_param_ids: set[int] = set()
        real = {n: getattr(stage2_mod, n) for n in ("fold_security_vector", "unfold_security_vector",
                                                       "attach_security_vector", "detach_security_vector",
                                                       "build_optimizer")}

        def fold(model, sv):
            self.calls.append("fold")
            self.folded = real["fold_security_vector"](model, sv)
            self.n_secvec_layers_after_fold = len(security_vector_layers(model))
            self.folded_weights_changed = [not torch.equal(f.linear.weight.detach().cpu(), f.original)
                                           for f in self.folded]
            return self.folded

        def unfold(model, folded):
            self.calls.append("unfold")
            return real["unfold_security_vector"](model, folded)

        def attach(model, sv, *a, **kw):
            self.calls.append("attach")
            self.wrapped = real["attach_security_vector"](model, sv, *a, **kw)
            return self.wrapped

        def detach(model):
            self.calls.append("detach")
            return real["detach_security_vector"](model)

        def build_optimizer(params, cfg, steps):
            self.optimizer_param_ids = {id(p) for p in params}
            return real["build_optimizer"](params, cfg, steps)

        for name, fn in (("fold_security_vector", fold), ("unfold_security_vector", unfold),
                         ("attach_security_vector", attach), ("detach_security_vector", detach),
                         ("build_optimizer", build_optimizer)):
            monkeypatch.setattr(stage2_mod, name, fn)


def _run(tw, out, *overrides):
    with pytest.MonkeyPatch.context() as mp:
        rec = PathRecorder(mp)
        res = run_finetune(cfg_for(tw, out, *overrides), keep_model=True)
    return res, rec


@pytest.fixture(scope="module")
def lora_runs(tiny_world, random_vector, tmp_path_factory):
    """The same LoRA stage 2 (same seed and data) folded, not folded, and without a vector."""
    root = tmp_path_factory.mktemp("fold_runs")
    sv = f"security_vector.path={random_vector}"
    return {"fold": _run(tiny_world, root / "fold", *LORA, sv),
            "wrap": _run(tiny_world, root / "wrap", *LORA, sv, "security_vector.fold=false"),
            "none": _run(tiny_world, root / "none", *LORA)}


# ---------------------------------------------------------------------------------------------
# (a) folding gives the same training as the wrapper


def test_lora_fold_matches_wrapper(lora_runs, random_vector):
    (fold, frec), (wrap, wrec), (none, _) = lora_runs["fold"], lora_runs["wrap"], lora_runs["none"]
    assert frec.calls == ["fold", "unfold"], frec.calls
    assert wrec.calls == ["attach", "detach"], wrec.calls
    n_modules = len(load_security_vector(str(random_vector)).weights)
    # folded: no wrapper layer at all, every targeted weight changed, none of them trainable
    assert len(frec.folded) == n_modules and frec.n_secvec_layers_after_fold == 0
    assert all(frec.folded_weights_changed)
    for f in frec.folded:
        assert not f.linear.weight.requires_grad and f.linear.weight.grad is None
        assert id(f.linear.weight) not in frec.optimizer_param_ids
        assert not isinstance(f.secvec_A, torch.nn.Parameter) and not isinstance(f.secvec_B, torch.nn.Parameter)
    assert len(wrec.wrapped) == n_modules

    assert len(fold.losses) == len(wrap.losses) == STEPS
    torch.testing.assert_close(torch.tensor(fold.losses), torch.tensor(wrap.losses), rtol=1e-4, atol=0)
    # the vector does act: a run without it trains differently
    assert max(abs(a - b) for a, b in zip(fold.losses, none.losses)) > 1e-3, (fold.losses, none.losses)

    # The saved adapters: NOT bit-identical in general. x (W + s B A)^T and x W^T + s (x A^T) B^T
    # round differently in fp32 (folding also rounds W + sBA to W's dtype once), so the losses and
    # gradients differ in the last bits and Adam carries that into the LoRA weights. Equal to a
    # tight tolerance instead; the bit-exactness that does hold is the restored base (below).
    # Measured on CPU: losses agree to ~1e-7 relative, adapter tensors to ~6e-5 of their largest
    # element after 4 Adam steps (Adam's first steps normalize the gradient, so small gradient
    # elements carry their relative rounding difference into the update).
    a = load_file(str(fold.final_dir / "adapter_model.safetensors"))
    b = load_file(str(wrap.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert not ("secvec" in k)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4 * b[k].abs().max().item(), msg=k)
    n_exact = sum(torch.equal(a[k], b[k]) for k in a)
    print(f"adapter tensors bit-identical with/without folding: {n_exact}/{len(a)}")


# ---------------------------------------------------------------------------------------------
# (b) the returned model has the original base weights, bit for bit


def test_fold_restores_base_bit_exact(lora_runs, tiny_world):
    res, rec = lora_runs["fold"]
    assert rec.folded and not security_vector_layers(res.model)
    base = unwrap_base(res.model)
    ref = plain_base(tiny_world.model_dir).state_dict()
    for key, want in ref.items():
        mod, _, attr = key.rpartition(".")
        got = getattr(_inner_linear(base.get_submodule(mod)), attr)
        assert got.dtype == want.dtype and torch.equal(got.detach().cpu(), want), key
    assert not any("secvec" in k for k in res.model.state_dict())


def test_fold_and_wrapper_runs_keep_the_same_base(lora_runs):
    """The model each run hands on (evaluation uses it): every base weight of the folded run equals
    the unfolded run's bit for bit (test_fold_restores_base_bit_exact: and the original's)."""
    fold, wrap = (unwrap_base(lora_runs[n][0].model) for n in ("fold", "wrap"))
    base_f = {k: v for k, v in fold.state_dict().items() if "lora_" not in k}
    base_w = {k: v for k, v in wrap.state_dict().items() if "lora_" not in k}
    assert base_f.keys() == base_w.keys() and base_f
    for k in base_f:
        assert base_f[k].dtype == base_w[k].dtype and torch.equal(base_f[k], base_w[k]), k


# ---------------------------------------------------------------------------------------------
# (b2) "the export is bit-identical to the same run's export without folding": what holds. The
# trained LoRA cannot be (x (W + sBA)^T rounds differently from x W^T + s (x A^T) B^T, see above);
# the base weights, the files and the tensor names are; the LoRA agrees within fp32 tolerance.


def _files(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_final_dirs_same_files_and_keys(lora_runs):
    """final/ of the folded and the unfolded run: the same files, manifest entries and adapter config."""
    fold, wrap = lora_runs["fold"][0].final_dir, lora_runs["wrap"][0].final_dir
    assert _files(fold) == _files(wrap)
    manifest = lambda d: json.loads((d / "manifest.json").read_text())["files"]  # noqa: E731
    assert sorted(manifest(fold)) == sorted(manifest(wrap)) and manifest(fold)
    config = lambda d: json.loads((d / "adapter_config.json").read_text())  # noqa: E731
    assert config(fold) == config(wrap)


@pytest.mark.parametrize("merge", [False, True])
def test_exports_folded_vs_unfolded(lora_runs, tiny_world, tmp_path, merge):
    exports = {}
    for name in ("fold", "wrap"):
        out = tmp_path / name
        run_export(load_config(None, [f"export.checkpoint={lora_runs[name][0].final_dir}", "export.dtype=float32",
                                      f"export.merge={str(merge).lower()}", f"output_dir={out}",
                                      "logging.progress=false"]))
        exports[name] = out
    assert _files(exports["fold"]) == _files(exports["wrap"])
    a, b = _tensors(exports["fold"]), _tensors(exports["wrap"])
    assert a.keys() == b.keys() and a
    assert not [k for k in a if "secvec" in k]
    if not merge:  # the adapter alone
        assert all("lora_" in k for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-4 * b[k].abs().max().item(), msg=k)
        return
    # merged: W + s_l B_l A_l on the LoRA's layers (the merged deltas within the LoRA's tolerance;
    # measured: 1e-5 of the largest weight at most), every other tensor the original base weight,
    # bit for bit, in both exports
    adapter = load_file(str(lora_runs["fold"][0].final_dir / "adapter_model.safetensors"))
    lora_modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter}
    orig = plain_base(tiny_world.model_dir).state_dict()
    n_exact = n_merged = 0
    for k in a:
        assert a[k].dtype == b[k].dtype == orig[k].dtype, k
        if k.rpartition(".")[0] in lora_modules:
            n_merged += 1
            assert not torch.equal(a[k], orig[k]), k  # the LoRA was merged in
            # the merged LoRA deltas agree as the adapters do (tolerance of test_lora_fold_matches_wrapper)
            da, db = a[k] - orig[k], b[k] - orig[k]
            torch.testing.assert_close(da, db, rtol=1e-4, atol=2e-4 * db.abs().max().item(), msg=k)
        else:
            n_exact += 1
            assert torch.equal(a[k], orig[k]) and torch.equal(b[k], orig[k]), k
    assert n_merged == len(lora_modules) and n_exact > 0


# ---------------------------------------------------------------------------------------------
# (c) full fine-tuning and (d) security_vector.fold=false keep the SecVecLinear path


def test_full_finetune_ignores_fold(tiny_world, random_vector, tmp_path):
    res, rec = _run(tiny_world, tmp_path, f"security_vector.path={random_vector}", "security_vector.fold=true",
                    "optim.max_steps=1", "optim.lr=1e-4")
    assert rec.calls == ["attach", "detach"], rec.calls
    assert rec.wrapped and all(isinstance(layer, SecVecLinear) for layer in rec.wrapped)
    assert not security_vector_layers(res.model)


def test_fold_false_forces_wrapper(tiny_world, random_vector, tmp_path, monkeypatch):
    cfg = cfg_for(tiny_world, tmp_path, *LORA, f"security_vector.path={random_vector}", "optim.max_steps=1")
    assert fold_choice(cfg)[0]
    cfg.security_vector.fold = False
    assert fold_choice(cfg) == (False, "security_vector.fold=false")
    rec = PathRecorder(monkeypatch)
    run_finetune(cfg)
    assert rec.calls == ["attach", "detach"], rec.calls
    assert rec.wrapped and all(isinstance(layer, SecVecLinear) for layer in rec.wrapped)


def test_fold_choice_quantized_keeps_wrapper(tiny_world, monkeypatch):
    cfg = cfg_for(tiny_world, Path("/nonexistent"), *LORA, "model.quantization=nf4")
    assert not fold_choice(cfg)[0]
    assert not fold_choice(cfg_for(tiny_world, Path("/nonexistent"), *LORA, "security_vector.fold=false"))[0]


# ---------------------------------------------------------------------------------------------
# the functions themselves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_unfold_roundtrip(tiny_world, random_vector, dtype):
    sv = load_security_vector(str(random_vector))
    model = plain_base(tiny_world.model_dir, dtype).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        # dtype=float32: folding keeps the vector as in the file (it folds in float32, rounds once)
        wrapped = attach_security_vector(model, sv, backend="torch", dtype=torch.float32)
        want = model(input_ids=ids).logits.float()
        digest_wrapped = vector_digest(wrapped)
        detach_security_vector(model)
        folded = fold_security_vector(model, sv)
        got = model(input_ids=ids).logits.float()
    assert vector_digest(folded) == digest_wrapped
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
    with pytest.raises(SecurityVectorError, match="already folded"):
        fold_security_vector(model, sv)
    assert unfold_security_vector(model, folded) == len(sv.weights)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_refuses_trainable_weight(tiny_world, random_vector):
    sv = load_security_vector(str(random_vector))
    model = plain_base(tiny_world.model_dir).requires_grad_(True)
    with pytest.raises(SecurityVectorError, match="trained"):
        fold_security_vector(model, sv)
    model.requires_grad_(False)
    attach_security_vector(model, sv)
    with pytest.raises(SecurityVectorError, match="already attached"):
        fold_security_vector(model, sv)
