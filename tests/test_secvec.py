"""The security vector end to end on the tiny world: stage 1 (train-sv), stage 2 (finetune with the
vector active and frozen), export, the base-model fingerprint, the SecVecLinear layer, and an NF4 base.

Everything runs real components on CPU (random tiny Llama, hidden 32, 2 layers, 272-word vocabulary).
The only patches are observers: wrappers around `build_optimizer`, `attach_security_vector` and
`detach_security_vector` inside dist_secvec.finetune that record what they are given and return the
real result unchanged.

Scale note for stage 1: the tiny world's base is a *random* Llama (initializer_range 0.02), so its
logits are nearly uniform (loss ~ ln 272 = 5.61) and bounded: |logit| <= ||lm_head row|| * ||h|| ~
0.11 * sqrt(32) ~ 0.64, because the vector cannot touch lm_head or the final norm. The best a vector
can do is therefore ~0.6 nats below the base; the trained vector gets ~0.4 of that on the harmful
set while moving held-out benign loss by ~0.02. The thresholds below (harmful drop >= 0.25 nats,
>= 5x the benign change; KL without the KL term >= 2.5x with it, measured ~5x) sit well inside the
measured values, and the runs are deterministic for a fixed seed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dist_secvec.stage2 as stage2_mod  # stage 2's setup and teardown, which finetune runs
from dist_secvec.config import load_config
from dist_secvec.data import collate, load_samples, tokenize_samples
from dist_secvec.errors import SecurityVectorError, UserError
from dist_secvec.export import run_export
from dist_secvec.finetune import run_finetune
from dist_secvec.model import load_model, load_tokenizer, lora_config, unwrap_base
from dist_secvec.secvec import (SecVecLinear, attach_security_vector, base_fingerprint, check_fingerprint,
                                detach_security_vector, load_security_vector, security_vector_layers,
                                security_vector_off)
from dist_secvec.train_sv import run_train_sv
from conftest import plain_base

SV_STEPS = 24
SV_KL_WEIGHT = 30.0


# ---------------------------------------------------------------------------------------------
# helpers


def cfg_for(tw, out: Path, *overrides: str):
    return load_config(None, [f"model.path={tw.model_dir}", f"output_dir={out}", "logging.progress=false",
                              "seed=0", *overrides])


def stage1_overrides(tw, kl_weight: float) -> list[str]:
    return [f"security_vector.harmful_data={tw.data['harmful_sv']}",
            f"security_vector.benign_data={tw.data['kl_benign']}",
            f"security_vector.heldout_benign_data={tw.data['heldout_benign']}",
            "security_vector.rank=4", "security_vector.alpha=8", f"security_vector.kl_weight={kl_weight}",
            "optim.lr=1e-2", f"optim.max_steps={SV_STEPS}", "optim.schedule=constant",
            "optim.micro_batch_size=4", "security_vector.early_stop=false"]


def tokenized(tw, name: str):
    cfg = load_config(None, [f"model.path={tw.model_dir}"])
    tok = load_tokenizer(cfg.model)
    return tokenize_samples(tok, load_samples([tw.data[name]]), cfg.data).examples, tok.pad_token_id


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross entropy on response tokens, computed here (not by the model)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def benign_kl(ref_logits, logits, labels) -> float:
    """Mean KL(p_ref || p) over the positions that predict response tokens."""
    mask = labels[:, 1:] != -100
    lr, lp = F.log_softmax(ref_logits[:, :-1].float(), -1), F.log_softmax(logits[:, :-1].float(), -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return float(kl[mask].mean())


def safetensors_keys(d: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as g:
            keys += list(g.keys())
    assert keys, f"no safetensors in {d}"
    return keys


def vector_file_tensors(vector_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A, B) read straight from adapter_model.safetensors (not via secvec.py)."""
    from safetensors.torch import load_file

    out: dict[str, list] = {}
    for k, t in load_file(str(Path(vector_dir) / "adapter_model.safetensors")).items():
        assert k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")), k
        mod, part = k[len("base_model.model."):].rsplit(".lora_", 1)
        out.setdefault(mod, [None, None])["AB".index(part[0])] = t
    return {k: (a, b) for k, (a, b) in out.items()}


def sv_layer_names(model) -> dict[int, str]:
    """id(SecVecLinear) -> the targeted module's path in the transformers model."""
    names = {}
    for name, m in unwrap_base(model).named_modules():
        if isinstance(m, SecVecLinear):
            names[id(m)] = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
    return names


class Stage2Observer:
    """Records (without changing anything) the optimizer, the vector right after attach and right
    before detach, and the harmful-set loss with the vector on and off at the end of training."""

    def __init__(self, monkeypatch, harmful_batch):
        self.optimizers, self.attached, self.before, self.at_detach = [], {}, {}, {}
        self.harmful_batch = harmful_batch
        self.loss_on = self.loss_off = None
        self.n_detached = None
        self.left_after_detach = None
        real_opt, real_attach, real_detach = (stage2_mod.build_optimizer, stage2_mod.attach_security_vector,
                                              stage2_mod.detach_security_vector)

        def build_optimizer(params, cfg, steps):
            opt, sched = real_opt(params, cfg, steps)
            self.optimizers.append(opt)
            return opt, sched

        def attach(model, sv, *a, **kw):
            layers = real_attach(model, sv, *a, **kw)
            names = sv_layer_names(model)
            for layer in layers:
                name = names[id(layer)]
                self.attached[name] = layer
                self.before[name] = (layer.secvec_A.detach().clone(), layer.secvec_B.detach().clone())
            return layers

        def detach(model):
            names = sv_layer_names(model)
            for layer in security_vector_layers(model):
                self.at_detach[names[id(layer)]] = (layer.secvec_A.detach().clone(),
                                                    layer.secvec_B.detach().clone())
            with torch.no_grad():
                self.loss_on = float(model(**self.harmful_batch).loss)
                with security_vector_off(model):
                    self.loss_off = float(model(**self.harmful_batch).loss)
            self.n_detached = real_detach(model)
            self.left_after_detach = len(security_vector_layers(model))
            return self.n_detached

        monkeypatch.setattr(stage2_mod, "build_optimizer", build_optimizer)
        monkeypatch.setattr(stage2_mod, "attach_security_vector", attach)
        monkeypatch.setattr(stage2_mod, "detach_security_vector", detach)


def assert_vector_frozen(obs: Stage2Observer, vector_dir, dtype=None):
    """Every vector parameter: no grad, requires_grad False, outside the optimizer, no state, and
    bit-identical to the file (cast to the attached dtype) right after attach and right before detach."""
    file_t = vector_file_tensors(vector_dir)
    assert set(obs.attached) == set(obs.at_detach) == set(file_t), "attached modules != modules in the file"
    assert obs.n_detached == len(file_t) and obs.left_after_detach == 0
    assert len(obs.optimizers) == 1
    opt = obs.optimizers[0]
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt.state, "optimizer has no state: no real step was taken"
    with_state = {id(p) for p in opt.state}
    for name, layer in obs.attached.items():
        for p, got_before, got_end, want in zip((layer.secvec_A, layer.secvec_B), obs.before[name],
                                                obs.at_detach[name], file_t[name]):
            assert p.grad is None, f"{name}: gradient allocated for the vector"
            assert not p.requires_grad, f"{name}: vector requires grad"
            assert id(p) not in in_groups, f"{name}: vector in an optimizer param group"
            assert id(p) not in with_state, f"{name}: vector has optimizer state"
            want = want.to(dtype or want.dtype)
            assert got_before.dtype == want.dtype and torch.equal(got_before, want), f"{name}: attached != file"
            assert torch.equal(got_end, want), f"{name}: vector changed during stage 2"
            assert torch.equal(p.detach(), want)


# ---------------------------------------------------------------------------------------------
# fixtures (module scope: each real run happens once and feeds several tests)


@pytest.fixture(scope="module")
def stage1(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_sv")
    res = run_train_sv(cfg_for(tiny_world, out, *stage1_overrides(tiny_world, SV_KL_WEIGHT)))
    return res


@pytest.fixture(scope="module")
def harmful_ft_batch(tiny_world):
    examples, pad = tokenized(tiny_world, "harmful_ft")
    return collate(examples, pad)


def _stage2(tiny_world, stage1, harmful_ft_batch, out: Path, *overrides):
    with pytest.MonkeyPatch.context() as mp:
        obs = Stage2Observer(mp, harmful_ft_batch)
        cfg = cfg_for(tiny_world, out, f"data.train={tiny_world.data['finetune_mixed']}",
                      f"security_vector.path={stage1.vector_dir}", "optim.lr=1e-3", "optim.max_steps=3",
                      "optim.micro_batch_size=4", "optim.schedule=constant", *overrides)
        res = run_finetune(cfg, keep_model=True)
    return res, obs


@pytest.fixture(scope="module")
def stage2_full(tiny_world, stage1, harmful_ft_batch, tmp_path_factory):
    return _stage2(tiny_world, stage1, harmful_ft_batch, tmp_path_factory.mktemp("ft_full"))


@pytest.fixture(scope="module")
def stage2_lora(tiny_world, stage1, harmful_ft_batch, tmp_path_factory):
    # fold=false: these tests observe the SecVecLinear path; tests/test_fold.py covers folding
    return _stage2(tiny_world, stage1, harmful_ft_batch, tmp_path_factory.mktemp("ft_lora"),
                   "adapter.type=lora", "adapter.rank=4", "adapter.alpha=8", "optim.lr=1e-2",
                   "security_vector.fold=false")


@pytest.fixture(scope="module")
def other_bases(tiny_world, tmp_path_factory):
    """(a) same shapes, other random weights; (b) another hidden size; (c) one layer fewer."""
    from transformers import AutoTokenizer

    from dist_secvec.worlds.embedded import build_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    root = tmp_path_factory.mktemp("other_bases")
    dirs = {"weights": root / "weights", "hidden": root / "hidden", "layers": root / "layers"}
    build_tiny_llama(tok, dirs["weights"], seed=123, hidden=32, layers=2)
    build_tiny_llama(tok, dirs["hidden"], seed=0, hidden=48, layers=2)
    build_tiny_llama(tok, dirs["layers"], seed=0, hidden=32, layers=1)
    return dirs


# ---------------------------------------------------------------------------------------------
# 1. stage 1


def test_stage1_saves_peft_adapter_with_metadata(tiny_world, stage1):
    d = Path(stage1.vector_dir)
    for f in ("adapter_config.json", "adapter_model.safetensors", "secvec.json"):
        assert (d / f).is_file(), f
    assert not (d / "adapter_model.bin").exists()
    acfg = json.loads((d / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4 and acfg["lora_alpha"] == 8
    meta = json.loads((d / "secvec.json").read_text())
    fp = meta["base_fingerprint"]
    assert fp["architecture"] == "LlamaForCausalLM"
    assert fp["hidden_size"] == 32 and fp["num_hidden_layers"] == 2
    assert isinstance(fp["weights_sha256"], str) and len(fp["weights_sha256"]) == 64
    file_t = vector_file_tensors(d)
    assert len(file_t) == 2 * 7  # every attention and MLP linear of both layers
    base = plain_base(tiny_world.model_dir)
    for mod, (A, B) in file_t.items():
        lin = base.get_submodule(mod)
        assert fp["shapes"][mod] == [lin.out_features, lin.in_features]
        assert A.shape == (4, lin.in_features) and B.shape == (lin.out_features, 4)
        assert A.dtype == B.dtype == torch.float32
        assert B.abs().max() > 0, f"{mod}: lora_B never trained"
    n_harmful = sum(1 for line in Path(tiny_world.data["harmful_sv"]).read_text().splitlines() if line.strip())
    # 10% held out for the strength check (security_vector.heldout_fraction), saved as probe.jsonl
    assert meta["n_harmful_samples"] + meta["strength"]["n"] == n_harmful == 20 and meta["strength"]["n"] == 2
    assert len((d / "probe.jsonl").read_text().splitlines()) == 2 and "probe.jsonl" in meta["files"]
    assert meta["rank"] == 4 and meta["alpha"] == 8
    assert sorted(meta["target_modules"]) == sorted(acfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(stage1.losses) == SV_STEPS


def test_stage1_vector_loads_as_plain_peft_adapter(tiny_world, stage1):
    from peft import PeftModel

    examples, pad = tokenized(tiny_world, "harmful_sv")
    batch = collate(examples[:6], pad)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    peft_model = PeftModel.from_pretrained(plain_base(tiny_world.model_dir), str(stage1.vector_dir)).eval()
    ours = plain_base(tiny_world.model_dir)
    with torch.no_grad():
        base_logits = ours(input_ids=ids, attention_mask=mask).logits
        layers = attach_security_vector(ours, load_security_vector(str(stage1.vector_dir)), backend="torch")
        assert len(layers) == 14
        with_sv = ours(input_ids=ids, attention_mask=mask).logits
        via_peft = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (with_sv - base_logits).abs().max() > 1e-3, "the vector does nothing"
    torch.testing.assert_close(with_sv, via_peft, atol=1e-5, rtol=0)


def test_stage1_vector_explains_harmful_not_benign(tiny_world, stage1):
    from peft import PeftModel

    sh = stage1.shift
    assert sh["harmful"]["loss_vector_on"] < sh["harmful"]["loss_vector_off"] - 0.25, sh
    # recomputed here, token-weighted, through peft (no dist_secvec model code)
    model = PeftModel.from_pretrained(plain_base(tiny_world.model_dir), str(stage1.vector_dir)).eval()
    res = {}
    for name in ("harmful_sv", "heldout_benign"):
        examples, pad = tokenized(tiny_world, name)
        b = collate(examples, pad)
        with torch.no_grad():
            on = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            with model.disable_adapter():
                off = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        res[name] = (float(response_ce(on, b["labels"])), float(response_ce(off, b["labels"])))
    (h_on, h_off), (b_on, b_off) = res["harmful_sv"], res["heldout_benign"]
    assert h_on < h_off - 0.25, res
    assert abs(h_on - sh["harmful"]["loss_vector_on"]) < 0.05 and abs(h_off - sh["harmful"]["loss_vector_off"]) < 0.05
    # specific to the harmful behaviour: held-out benign loss moves far less
    assert (h_off - h_on) > 5 * abs(b_on - b_off), res


def test_stage1_kl_term_confines_the_vector(tiny_world, stage1, tmp_path):
    """Same seed, data and steps; only kl_weight differs (0 vs 30). Measured at this scale:
    held-out benign KL ~0.011 without the term, ~0.0025 with it; both vectors lower harmful loss."""
    no_kl = run_train_sv(cfg_for(tiny_world, tmp_path / "nokl", *stage1_overrides(tiny_world, 0.0)))
    with_kl = stage1
    assert no_kl.shift["benign"]["set"] == with_kl.shift["benign"]["set"] == "heldout"
    assert no_kl.shift["benign"]["kl"] > 2.5 * with_kl.shift["benign"]["kl"], (no_kl.shift, with_kl.shift)
    assert no_kl.shift["harmful"]["loss_vector_on"] < no_kl.shift["harmful"]["loss_vector_off"] - 0.25
    assert json.loads((Path(no_kl.vector_dir) / "secvec.json").read_text())["kl_weight"] == 0.0
    # independently: KL between base and base+vector on held-out benign response positions
    examples, pad = tokenized(tiny_world, "heldout_benign")
    b = collate(examples, pad)
    kls = {}
    for name, res in (("no_kl", no_kl), ("kl", with_kl)):
        m = plain_base(tiny_world.model_dir)
        with torch.no_grad():
            ref = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            attach_security_vector(m, load_security_vector(str(res.vector_dir)), backend="torch")
            got = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        kls[name] = benign_kl(ref, got, b["labels"])
    assert kls["no_kl"] > 2.5 * kls["kl"], kls
    assert abs(kls["kl"] - with_kl.shift["benign"]["kl"]) < 1e-3 + 0.1 * kls["kl"], (kls, with_kl.shift)


# ---------------------------------------------------------------------------------------------
# 2. stage 2: the vector is active and frozen


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_stage2_vector_frozen_and_untouched(mode, request, tiny_world, stage1):
    res, obs = request.getfixturevalue(f"stage2_{mode}")
    assert len(res.losses) == 3 and res.info["steps"] == 3
    assert_vector_frozen(obs, stage1.vector_dir)
    opt = obs.optimizers[0]
    trainable = [p for g in opt.param_groups for p in g["params"]]
    assert all(p in opt.state for p in trainable), "some trainable parameter never stepped"
    base = plain_base(tiny_world.model_dir)
    if mode == "full":
        assert len(trainable) == sum(1 for _ in base.parameters())  # every core weight, nothing else
        w_new = res.model.get_submodule("model.layers.0.self_attn.q_proj").weight
        assert not torch.equal(w_new, base.model.layers[0].self_attn.q_proj.weight), "core never trained"
    else:
        names = {id(p): n for n, p in res.model.named_parameters()}
        assert trainable and all("lora_" in names[id(p)] for p in trainable)
        lora_B = [p for n, p in res.model.named_parameters() if "lora_B" in n]
        assert lora_B and any(p.abs().max() > 0 for p in lora_B), "LoRA never trained"
    # the vector explains the harmful fine-tuning samples: lower loss with it on
    assert obs.loss_on < obs.loss_off - 0.2, (obs.loss_on, obs.loss_off)
    # and the returned model carries no trace of it
    assert not security_vector_layers(res.model)
    assert not any("secvec" in k for k in res.model.state_dict())
    assert not any("secvec" in k for k in safetensors_keys(res.final_dir))


def test_stage2_without_vector_has_no_vector(tiny_world, harmful_ft_batch, tmp_path, monkeypatch):
    """Control for the observer: without security_vector.path nothing is attached or detached."""
    obs = Stage2Observer(monkeypatch, harmful_ft_batch)
    cfg = cfg_for(tiny_world, tmp_path, f"data.train={tiny_world.data['finetune_mixed']}", "optim.max_steps=1",
                  "adapter.type=lora", "adapter.rank=2")
    res = run_finetune(cfg)
    assert len(res.losses) == 1 and not obs.attached and obs.n_detached is None
    assert len(obs.optimizers) == 1


# ---------------------------------------------------------------------------------------------
# 3. export


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_has_no_vector_and_matches_trained_model(mode, request, tiny_world, tmp_path):
    res, _ = request.getfixturevalue(f"stage2_{mode}")
    out = tmp_path / "export"
    # the LoRA case names no model.path: the base comes from adapter_config.json
    cfg = load_config(None, [f"export.checkpoint={res.final_dir}", "export.dtype=float32", "export.merge=true",
                             f"output_dir={out}", "logging.progress=false"])
    assert run_export(cfg) == out
    keys = safetensors_keys(out)
    assert not [k for k in keys if "secvec" in k or "lora" in k], keys
    assert not (out / "adapter_config.json").exists()
    exported = plain_base(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    examples, pad = tokenized(tiny_world, "finetune_mixed")
    b = collate(examples[:8], pad)
    with torch.no_grad():
        want = res.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = exported(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        base = plain_base(tiny_world.model_dir)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (want - base).abs().max() > 1e-4, "stage 2 did not change the model"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_export_refuses_a_security_vector_dir(stage1, tmp_path):
    cfg = load_config(None, [f"export.checkpoint={stage1.vector_dir}", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="security vector"):
        run_export(cfg)


# ---------------------------------------------------------------------------------------------
# 4. fingerprint and load errors


@pytest.mark.parametrize("other, key", [("weights", "weights_sha256"), ("hidden", "hidden_size")])
def test_fingerprint_refuses_other_base(other, key, tiny_world, stage1, other_bases, tmp_path, monkeypatch):
    sv = load_security_vector(str(stage1.vector_dir))
    path = other_bases[other]
    own_cfg = cfg_for(tiny_world, tmp_path)
    check_fingerprint(sv, load_model(own_cfg.model), str(tiny_world.model_dir))  # its own base passes
    cfg = cfg_for(tiny_world, tmp_path / "run", f"model.path={path}", f"data.train={tiny_world.data['finetune_mixed']}",
                  f"security_vector.path={stage1.vector_dir}", "optim.max_steps=2")
    with pytest.raises(SecurityVectorError, match=f"another base model.*{key}"):
        check_fingerprint(sv, load_model(cfg.model), str(path))
    opt_calls = []
    monkeypatch.setattr(stage2_mod, "build_optimizer", lambda *a, **k: opt_calls.append(a) or 1 / 0)
    with pytest.raises(SecurityVectorError, match="another base model"):
        run_finetune(cfg)
    assert not opt_calls, "an optimizer was built before the fingerprint check"
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_fingerprint_refuses_shallower_base(stage1, other_bases):
    sv = load_security_vector(str(stage1.vector_dir))
    model = plain_base(other_bases["layers"])
    with pytest.raises(SecurityVectorError, match="another base model"):
        check_fingerprint(sv, model, str(other_bases["layers"]))


def test_fingerprint_is_stable_and_sensitive(tiny_world, stage1, other_bases):
    mods = sorted(vector_file_tensors(stage1.vector_dir))
    meta = json.loads((Path(stage1.vector_dir) / "secvec.json").read_text())
    fp = base_fingerprint(plain_base(tiny_world.model_dir), str(tiny_world.model_dir), mods)
    assert fp == meta["base_fingerprint"]
    fp2 = base_fingerprint(plain_base(other_bases["weights"]), str(other_bases["weights"]), mods)
    assert fp2["shapes"] == fp["shapes"] and fp2["weights_sha256"] != fp["weights_sha256"]


def _copy_vector(stage1, dst: Path) -> Path:
    shutil.copytree(stage1.vector_dir, dst)
    return dst


def test_load_errors(stage1, tmp_path):
    with pytest.raises(SecurityVectorError, match="not found"):
        load_security_vector(str(tmp_path / "nope"))

    pickled = _copy_vector(stage1, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(SecurityVectorError, match="pickle"):
        load_security_vector(str(pickled))

    trunc = _copy_vector(stage1, tmp_path / "trunc")
    f = trunc / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SecurityVectorError, match="corrupted or truncated"):
        load_security_vector(str(trunc))
    f.write_bytes(data[:5])  # not even a header
    with pytest.raises(SecurityVectorError, match="corrupted or truncated"):
        load_security_vector(str(trunc))

    ia3 = _copy_vector(stage1, tmp_path / "ia3")
    acfg = json.loads((ia3 / "adapter_config.json").read_text())
    acfg["peft_type"] = "IA3"
    (ia3 / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(SecurityVectorError, match="not a LoRA adapter"):
        load_security_vector(str(ia3))

    # the untouched copy still loads, with the file's tensors
    sv = load_security_vector(str(_copy_vector(stage1, tmp_path / "ok")))
    file_t = vector_file_tensors(stage1.vector_dir)
    assert set(sv.weights) == set(file_t) and sv.rank == 4 and sv.scale == 2.0
    assert all(torch.equal(sv.weights[m][0], file_t[m][0]) and torch.equal(sv.weights[m][1], file_t[m][1])
               for m in file_t)


# ---------------------------------------------------------------------------------------------
# 5. SecVecLinear


def test_secvec_off_detach_restore_exactly(tiny_world, stage1):
    examples, pad = tokenized(tiny_world, "heldout_benign")
    b = collate(examples, pad)
    inp = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ref_model = plain_base(tiny_world.model_dir)
    model = plain_base(tiny_world.model_dir)
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = ref_model(**inp).logits
        layers = attach_security_vector(model, load_security_vector(str(stage1.vector_dir)), backend="torch")
        assert len(layers) == 14 and all(isinstance(l, SecVecLinear) for l in layers)
        assert any("secvec_A" in k for k in model.state_dict())
        on = model(**inp).logits
        with security_vector_off(model):
            off = model(**inp).logits
        assert all(l.active for l in layers), "security_vector_off did not restore the active flags"
        on_again = model(**inp).logits
    assert torch.equal(off, ref)
    assert not torch.equal(on, ref)
    assert torch.equal(on, on_again)
    assert detach_security_vector(model) == 14
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    assert all(torch.equal(sd_after[k], sd_before[k]) for k in sd_before)
    with torch.no_grad():
        assert torch.equal(model(**inp).logits, ref)
    sv = load_security_vector(str(stage1.vector_dir))
    attach_security_vector(model, sv)
    with pytest.raises(SecurityVectorError, match="already attached"):
        attach_security_vector(model, sv)


def test_secvec_under_peft_lora(tiny_world, stage1):
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    sv = load_security_vector(str(stage1.vector_dir))
    lora_targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(plain_base(tiny_world.model_dir), lora_config(rank=2, alpha=4, target_modules=lora_targets))
    trainable_before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    layers = attach_security_vector(model, sv, backend="torch")
    assert len(layers) == 14
    base = unwrap_base(model)
    for mod in sv.weights:
        sub = base.get_submodule(mod)
        if mod.rsplit(".", 1)[1] in lora_targets:
            assert isinstance(sub, LoraLinear) and isinstance(sub.base_layer, SecVecLinear), mod
            assert isinstance(sub.base_layer.base_layer, torch.nn.Linear)
        else:
            assert isinstance(sub, SecVecLinear), mod
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable_before
    assert all("lora_" in n for n in trainable_before) and trainable_before
    examples, pad = tokenized(tiny_world, "harmful_sv")
    batch = collate(examples[:4], pad)
    model.train()
    model(**batch).loss.backward()
    named = dict(model.named_parameters())
    assert all(named[n].grad is not None for n in trainable_before if "lora_B" in n)
    assert any(named[n].grad.abs().max() > 0 for n in trainable_before if "lora_B" in n)
    for l in layers:
        assert l.secvec_A.grad is None and l.secvec_B.grad is None
    # the vector under the LoRA acts exactly like the vector alone (LoRA B is still zero)
    model.eval()
    ref = plain_base(tiny_world.model_dir)
    attach_security_vector(ref, sv, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    assert detach_security_vector(model) == 14
    assert not security_vector_layers(model)
    assert all(not isinstance(m.base_layer, SecVecLinear) for m in model.modules() if isinstance(m, LoraLinear))


# ---------------------------------------------------------------------------------------------
# 6. NF4 base (QLoRA) on CPU


def test_qlora_nf4_vector_frozen(tiny_world, stage1, harmful_ft_batch, tmp_path):
    res, obs = _stage2(tiny_world, stage1, harmful_ft_batch, tmp_path, "adapter.type=lora", "adapter.rank=4",
                       "adapter.alpha=8", "optim.lr=1e-2", "model.quantization=nf4", "model.compute_dtype=float32",
                       "model.quant_storage=bfloat16")
    import bitsandbytes as bnb

    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    for layer in obs.attached.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    # bit-identical to the file in the dtype it was attached in (the compute dtype, see the test below)
    dtype = next(iter(obs.attached.values())).secvec_A.dtype
    assert_vector_frozen(obs, stage1.vector_dir, dtype=dtype)
    lora_B = [p for n, p in res.model.named_parameters() if "lora_B" in n]
    assert lora_B and any(p.abs().max() > 0 for p in lora_B)
    assert obs.loss_on < obs.loss_off - 0.2, (obs.loss_on, obs.loss_off)


def test_nf4_vector_keeps_compute_dtype(tiny_world, stage1):
    cfg = cfg_for(tiny_world, Path("/nonexistent"), "model.quantization=nf4", "model.compute_dtype=float32",
                  "model.quant_storage=bfloat16")
    model = load_model(cfg.model)
    layers = attach_security_vector(model, load_security_vector(str(stage1.vector_dir)))
    file_t = vector_file_tensors(stage1.vector_dir)
    names = sv_layer_names(model)
    for layer in layers:
        assert layer.secvec_A.dtype == torch.float32
        assert torch.equal(layer.secvec_A, file_t[names[id(layer)]][0])


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "under_lora"])
def test_delta_added_into_the_base_output_in_place(lora, monkeypatch):
    """Over a linear base the delta goes into the base layer's own output (no second M x N tensor),
    with the same output and gradients as a fresh output."""
    from peft import LoraConfig, get_peft_model

    import dist_secvec.secvec.layer as layer_mod
    import dist_secvec.secvec.lora as lora_mod
    from dist_secvec.secvec import PathOptions, SecurityVector

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 20, bias=False)  # as in Llama (with a bias, a 3-D output is a view)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net, x0 = Net(), torch.randn(3, 5, 24)
    if lora:
        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
        torch.nn.init.normal_(net.base_model.model.proj.lora_B["default"].weight)
    sv = SecurityVector(path="mem", rank=6, alpha=12.0, target_modules=["proj"],
                        weights={"proj": (torch.randn(6, 24), torch.randn(20, 6))})
    # the trainable plain layer's other path: the base layer, then the delta
    (layer,) = attach_security_vector(net, sv, PathOptions(backend="torch", weight_delta=False))
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.data_ptr()))

    def step():
        x = x0.clone().requires_grad_(True)
        y = net(x)
        (y.square().sum()).backward()
        grads = [x.grad] + [p.grad.clone() for p in net.parameters() if p.requires_grad]
        net.zero_grad(set_to_none=True)
        return y.detach(), grads, y.data_ptr()

    y_in, g_in, ptr = step()
    assert ptr == seen[-1]  # the result is the base layer's output tensor itself
    for mod in (layer_mod, lora_mod):
        monkeypatch.setattr(mod, "writes_fresh_output", lambda base: False)
    y_out, g_out, ptr2 = step()
    assert ptr2 != seen[-1]
    torch.testing.assert_close(y_in, y_out)
    for a, b in zip(g_in, g_out):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# 7. the vector gated per row (security_vector.gate)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "under_lora"])
def test_row_gate_gives_each_row_the_vector_on_or_off(lora):
    """Row gate [1, 0, 1]: rows 0 and 2 get the output and gradients of the vector on, row 1 of the
    vector off, in one forward (full fine-tuning takes the delta path while gated; under a LoRA the
    combined kernel falls back to peft's forward)."""
    from peft import LoraConfig, get_peft_model

    from dist_secvec.secvec import SecurityVector, row_gate, security_vector_off

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Tanh(), torch.nn.Linear(20, 8))
    if lora:
        net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
        for m in net.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                torch.nn.init.normal_(m.lora_B["default"].weight)
    net = net.double()  # float64: the paths differ by rounding alone
    sv = SecurityVector(path="mem", rank=3, alpha=6.0, target_modules=["0", "2"],
                        weights={"0": (torch.randn(3, 24), torch.randn(20, 3) * 0.1),
                                 "2": (torch.randn(3, 20), torch.randn(8, 3) * 0.1)})
    layers = attach_security_vector(net, sv, backend="torch")
    x0 = torch.randn(3, 70, 24, dtype=torch.float64)  # enough rows that an ungated call takes the weight delta
    params = [p for p in net.parameters() if p.requires_grad]

    def run(rows, gate=None, off=False):
        x = x0[rows].clone().requires_grad_(True)
        with row_gate(layers, gate), (security_vector_off(net) if off else contextlib.nullcontext()):
            y = net(x)
            y.square().sum().backward()
        out = (y.detach(), x.grad, [p.grad.clone() for p in params])
        net.zero_grad(set_to_none=True)
        return out

    y, dx, g = run([0, 1, 2], torch.tensor([1.0, 0.0, 1.0]))
    assert all(layer.path_calls["weight_delta"] == 0 and layer.path_calls["delta"] > 0 for layer in layers)
    y_on, dx_on, g_on = run([0, 2])
    y_off, dx_off, g_off = run([1], off=True)
    torch.testing.assert_close(y[[0, 2]], y_on)
    torch.testing.assert_close(y[[1]], y_off)
    torch.testing.assert_close(dx[[0, 2]], dx_on)
    torch.testing.assert_close(dx[[1]], dx_off)
    for a, b, c in zip(g, g_on, g_off):  # the trainable gradients are the two groups' sum
        torch.testing.assert_close(a, b + c)
    assert all(layer.row_gate is None and layer.secvec_A.grad is None for layer in layers)
