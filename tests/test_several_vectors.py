"""Several security vectors at once (security_vector.path as a list), and stage 1 for any behaviour.

Vectors on one layer are composed into one delta (ranks concatenated, scales folded into B): the
composed layer, fold and gate must equal what the separate vectors give, vectors for different
bases are refused in one line before anything trains, and the run info lists every vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_secvec.config import load_config, validate
from dist_secvec.errors import ConfigError, SecurityVectorError
from dist_secvec.kernels.torch_ops import secvec_delta_reference
from dist_secvec.secvec import (PathOptions, SecurityVector, VectorSet, attach_security_vector, fold_security_vector,
                                load_security_vector, only_vector, unfold_security_vector)
from conftest import plain_base, write_random_vector
from test_cli import cli_main, error_lines, no_stage  # noqa: F401 (fixtures)

TORCH_DELTA = PathOptions(backend="torch", weight_delta=False)  # the plain delta: x A^T, then B


HALLUCINATION = {"name": "hallucination", "judges": ["demo_hallucination"]}


@pytest.fixture(scope="module")
def vectors(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """a: rank 4, scale 2 on q, v, down; b: rank 2, scale 4 on q, o (scales differ), a hallucination
    vector judged by the embedded worlds' rule; c: rank 4,
    scale 2 on v, up (a's scale); other_weights: a's targets on a base of the same shapes and other
    weights; other_hidden: a base of another hidden size."""
    from transformers import AutoTokenizer

    from dist_secvec.worlds.embedded import build_tiny_llama

    root = tmp_path_factory.mktemp("several_vectors")
    md = tiny_world.model_dir
    tok = AutoTokenizer.from_pretrained(str(md))
    build_tiny_llama(tok, root / "base_weights", seed=123, hidden=32, layers=2)
    build_tiny_llama(tok, root / "base_hidden", seed=0, hidden=48, layers=2)
    b = write_random_vector(md, root / "b", seed=2, rank=2, alpha=8.0, targets=("q_proj", "o_proj"))
    meta = json.loads((b / "secvec.json").read_text())  # b stands for a vector of the second behaviour
    meta["behaviour"] = HALLUCINATION
    (b / "secvec.json").write_text(json.dumps(meta))
    return {
        "a": write_random_vector(md, root / "a", seed=1, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
        "b": b,
        "c": write_random_vector(md, root / "c", seed=3, rank=4, alpha=8.0, targets=("v_proj", "up_proj")),
        "other_weights": write_random_vector(root / "base_weights", root / "ow", seed=4,
                                             targets=("q_proj", "v_proj", "down_proj")),
        "other_hidden": write_random_vector(root / "base_hidden", root / "oh", seed=5, targets=("q_proj", "o_proj")),
    }


def merged_reference(model_dir, svs: list[SecurityVector]):
    """The float64 base with every vector merged by hand: W + sum_i s_i B_i A_i."""
    model = plain_base(model_dir, torch.float64)
    with torch.no_grad():
        for sv in svs:
            for mod, (A, B) in sv.weights.items():
                model.get_submodule(mod).weight += sv.scale * B.double() @ A.double()
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("pair", [("a", "b"), ("a", "c")], ids=["scales_differ", "same_scale"])
def test_composed_delta_is_the_sum_of_the_separate_deltas(tiny_world, vectors, pair):
    svs = [load_security_vector(str(vectors[k])) for k in pair]
    composed = load_security_vector([str(vectors[k]) for k in pair])
    assert isinstance(composed, VectorSet) and [p.path for p in composed.parts] == [sv.path for sv in svs]
    model = plain_base(tiny_world.model_dir, torch.float64)
    layers = attach_security_vector(model, composed, TORCH_DELTA, dtype=torch.float64)
    by_name = {n: m for n, m in model.named_modules() if m in layers}
    # one SecVecLinear per module any vector is on, holding the ranks of the vectors on it
    assert sorted(by_name) == sorted(set().union(*(sv.weights for sv in svs)))
    gen = torch.Generator().manual_seed(0)
    for name, layer in by_name.items():
        on = [i for i, sv in enumerate(svs) if name in sv.weights]
        assert layer.secvec_A.shape[0] == sum(svs[i].rank for i in on)
        x = torch.randn(3, 5, layer.in_features, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            base = layer.base_layer(x)
            got = layer(x) - base
            want = sum(secvec_delta_reference(x, *map(torch.Tensor.double, svs[i].weights[name]), svs[i].scale)
                       for i in on)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            for i, sv in enumerate(svs):  # each vector alone: only its own rank rows
                with only_vector(layers, i):
                    alone = layer(x) - base
                want_i = (secvec_delta_reference(x, *map(torch.Tensor.double, sv.weights[name]), sv.scale)
                          if name in sv.weights else torch.zeros_like(alone))
                torch.testing.assert_close(alone, want_i, rtol=1e-12, atol=1e-12)
    ids = torch.randint(3, 40, (2, 9), generator=gen)
    ref = merged_reference(tiny_world.model_dir, svs)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-10, atol=1e-10)


def test_composed_fold_is_the_sum_of_the_separate_folds(tiny_world, vectors):
    svs = [load_security_vector(str(vectors[k])) for k in ("a", "b")]
    composed = load_security_vector([str(vectors["a"]), str(vectors["b"])])
    model = plain_base(tiny_world.model_dir, torch.float64).requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    folded = fold_security_vector(model, composed)
    modules = set(svs[0].weights) | set(svs[1].weights)
    assert sorted(t.name for t in folded) == sorted(modules)  # one fold per module, not one per vector
    assert len(modules) < len(svs[0].weights) + len(svs[1].weights)
    ref = merged_reference(tiny_world.model_dir, svs)
    for t in folded:
        torch.testing.assert_close(t.linear.weight, ref.get_submodule(t.name).weight, rtol=1e-13, atol=1e-13)
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-10, atol=1e-10)
    unfold_security_vector(model, folded)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_one_listed_vector_is_that_vector(vectors):
    one = load_security_vector(str(vectors["a"]))
    listed = load_security_vector([str(vectors["a"])])
    assert type(listed) is SecurityVector and listed.scale == one.scale
    assert all(torch.equal(listed.weights[m][k], one.weights[m][k]) for m in one.weights for k in (0, 1))
    assert load_config(None, [f"security_vector.path={vectors['a']}"]).security_vector.paths() == [str(vectors["a"])]
    assert load_config(None, ["security_vector.path=null"]).security_vector.paths() == []


@pytest.mark.parametrize("other, key", [("other_weights", "weights_sha256"), ("other_hidden", "hidden_size")])
def test_vectors_for_different_bases_are_refused_in_one_line(tiny_world, vectors, other, key, tmp_path, cli_main,
                                                             no_stage):
    paths = [str(vectors["a"]), str(vectors[other])]
    with pytest.raises(SecurityVectorError) as e:
        load_security_vector(paths)
    msg = str(e.value)
    assert "\n" not in msg and "different base models" in msg and key in msg and all(p in msg for p in paths), msg
    no_stage("finetune")  # refused before the model loads
    rc, cap = cli_main("finetune", f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['new_task_ft']}",
                       f"output_dir={tmp_path / 'out'}", f"security_vector.path=[{paths[0]},{paths[1]}]",
                       "logging.progress=false")
    assert rc == 2, cap.err
    (line,) = error_lines(cap.err, "finetune")
    assert "different base models" in line and "Traceback" not in cap.err
    assert not (tmp_path / "out").exists()


def test_vectors_whose_shapes_disagree_are_refused(vectors, tmp_path):
    """Without fingerprints to compare, the tensors' own shapes still tell the bases apart."""
    import shutil

    copies = []
    for k in ("a", "other_hidden"):
        d = shutil.copytree(vectors[k], tmp_path / k)
        meta = json.loads((d / "secvec.json").read_text())
        del meta["base_fingerprint"]
        (d / "secvec.json").write_text(json.dumps(meta))
        copies.append(str(d))
    with pytest.raises(SecurityVectorError, match="disagree on module '.*q_proj'"):
        load_security_vector(copies)


def test_a_vector_listed_twice_is_refused_and_each_listed_vector_must_exist(tiny_world, vectors, tmp_path):
    a = str(vectors["a"])
    with pytest.raises(SecurityVectorError, match="listed twice"):
        load_security_vector([a, str(Path(a) / ".." / Path(a).name)])
    common = [f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['new_task_ft']}",
              f"output_dir={tmp_path / 'out'}", f"security_vector.path=[{a},{vectors['b']}]"]
    validate(load_config(None, common + ["data.audit=report"]), "finetune")  # scored against each vector
    validate(load_config(None, common), "audit")  # the command scores each row against each vector
    with pytest.raises(ConfigError, match="not found"):
        validate(load_config(None, common[:3] + [f"security_vector.path=[{a},{tmp_path / 'nope'}]"]), "audit")
    with pytest.raises(ConfigError, match="not found"):
        validate(load_config(None, common[:3] + [f"security_vector.path=[{a},{tmp_path / 'nope'}]"]), "finetune")


def _explained(model_dir, sv, examples, pad_id) -> list[float]:
    """Each row's explained share under `sv` alone, attached by itself to a fresh float64 base."""
    from dist_secvec.secvec import security_vector_off
    from dist_secvec.strength import explained_share, score_rows

    model = plain_base(model_dir, torch.float64)
    attach_security_vector(model, sv, TORCH_DELTA, dtype=torch.float64)
    off, on = score_rows(model, examples, pad_id, "cpu", 4, lambda: security_vector_off(model))
    return [explained_share(f, a) for f, a in zip(off, on)]


def test_gate_with_several_vectors_is_on_for_a_row_any_vector_explains(tiny_world, vectors):
    """Each row is scored against each vector alone; the threshold is placed in a gap between the
    shares so that float rounding cannot move a row across it."""
    from dist_secvec.data import load_samples, tokenize_samples
    from dist_secvec.model import load_tokenizer
    from dist_secvec.stage2 import gate_rows

    paths = [str(vectors["a"]), str(vectors["b"])]
    cfg0 = load_config(None, [f"model.path={tiny_world.model_dir}"])
    tok = load_tokenizer(cfg0.model)
    rows = load_samples([tiny_world.data["harmful_sv"]])[:6] + load_samples([tiny_world.data["new_task_ft"]])[:6]
    examples = tokenize_samples(tok, rows, cfg0.data).examples
    shares = [_explained(tiny_world.model_dir, load_security_vector(p), examples, tok.pad_token_id) for p in paths]
    flat = sorted(v for col in shares for v in col)
    mid = flat[len(flat) // 4: 3 * len(flat) // 4]  # a threshold near the middle: rows go both ways
    gap, t = max((hi - lo, (hi + lo) / 2) for lo, hi in zip(mid, mid[1:]))
    assert gap > 1e-6
    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", f"security_vector.path=[{paths[0]},{paths[1]}]",
                             f"security_vector.gate_threshold={t}", "logging.progress=false"])
    composed = load_security_vector(paths)
    model = plain_base(tiny_world.model_dir, torch.float64)
    layers = attach_security_vector(model, composed, TORCH_DELTA, dtype=torch.float64)
    gate, info = gate_rows(cfg, composed, model, layers, examples, tok.pad_token_id, "cpu")
    want = [any(col[j] >= t for col in shares) for j in range(len(examples))]
    assert [gate[id(e)] == 1.0 for e in examples] == want
    assert 0 < info["rows_vector_on"] == sum(want) < len(examples) and info["threshold"] == [t, t]
    assert [v["rows_explained"] for v in info["per_vector"]] == [sum(s >= t for s in col) for col in shares]
    assert [v["path"] for v in info["per_vector"]] == composed.meta["composed_of"]


def _finetune(tiny_world, small_data, out: Path, path: str, *extra: str):
    from dist_secvec.finetune import run_finetune

    return run_finetune(load_config(None, [
        f"model.path={tiny_world.model_dir}", f"output_dir={out}", "logging.progress=false", "seed=0",
        f"data.train={small_data}", f"security_vector.path={path}", "optim.max_steps=2", "optim.micro_batch_size=4",
        "optim.lr=1e-3", *extra]))


def test_finetune_cli_with_two_vectors_lists_both_in_the_run_info(tiny_world, small_data, vectors, tmp_path, cli_main):
    a, b = str(vectors["a"]), str(vectors["b"])
    out = tmp_path / "out"
    rc, cap = cli_main("finetune", f"model.path={tiny_world.model_dir}", f"data.train={small_data}",
                       f"output_dir={out}", f"security_vector.path=[{a},{b}]", "security_vector.gate_threshold=0.0",
                       "optim.max_steps=2", "optim.micro_batch_size=4", "logging.progress=false")
    assert rc == 0, cap.err
    info = json.loads((out / "final" / "dist_secvec_run.json").read_text())
    assert info["security_vector"] == [a, b] and info["security_vector_mode"] == "attached"
    recs = info["security_vectors"]
    assert [r["path"] for r in recs] == [a, b]
    assert [sorted({m.rsplit(".", 1)[-1] for m in r["modules"]}) for r in recs] == [
        ["down_proj", "q_proj", "v_proj"], ["o_proj", "q_proj"]]
    assert [r["behaviour"] for r in recs] == [{"name": "harm", "judges": None}, HALLUCINATION]
    assert all(r["base_fingerprint"]["weights_sha256"] for r in recs)
    assert [v["path"] for v in info["security_vector_gate"]["per_vector"]] == [a, b]
    assert not [k for k in load_file(str(out / "final" / "model.safetensors")) if "secvec" in k]


def test_two_vectors_fold_once_per_layer_under_a_lora(tiny_world, small_data, vectors, tmp_path):
    res = _finetune(tiny_world, small_data, tmp_path / "out", f"[{vectors['a']},{vectors['b']}]",
                    "adapter.type=lora", "adapter.rank=4", "security_vector.gate=false")
    assert res.info["security_vector_mode"] == "folded"
    assert [len(r["modules"]) for r in res.info["security_vectors"]] == [6, 4]  # 2 blocks x 3 and x 2 modules


def test_a_single_vector_listed_trains_exactly_as_before(tiny_world, small_data, vectors, tmp_path):
    runs = {k: _finetune(tiny_world, small_data, tmp_path / k, p, "security_vector.gate_threshold=0.0")
            for k, p in (("str", str(vectors["a"])), ("list", f"[{vectors['a']}]"))}
    w = {k: load_file(str(r.final_dir / "model.safetensors")) for k, r in runs.items()}
    assert w["str"].keys() == w["list"].keys() and all(torch.equal(w["str"][k], w["list"][k]) for k in w["str"])
    assert runs["str"].losses == runs["list"].losses
    assert runs["str"].info["security_vector_gate"] == runs["list"].info["security_vector_gate"]
    assert "per_vector" not in runs["str"].info["security_vector_gate"]


# ---------------------------------------------------------------------------------------------
# stage 1 for any behaviour


def test_stage1_records_the_behaviour_and_its_judges(tiny_world, tmp_path):
    from dist_secvec.train_sv import run_train_sv

    out = tmp_path / "sv"
    res = run_train_sv(load_config(None, [
        f"model.path={tiny_world.model_dir}", f"output_dir={out}", "logging.progress=false", "seed=0",
        f"security_vector.harmful_data={tiny_world.data['harmful_sv']}",
        f"security_vector.benign_data={tiny_world.data['kl_benign']}", "security_vector.rank=2",
        "security_vector.behaviour=hallucination", "security_vector.judges=[demo]", "eval.judges=[refusal]",
        "eval.max_new_tokens=8", "optim.max_steps=1", "optim.micro_batch_size=4"]))
    meta = json.loads((res.vector_dir / "secvec.json").read_text())
    assert meta["behaviour"] == {"name": "hallucination", "judges": ["demo"]}
    assert meta["strength"]["judges"] == ["demo"] and meta["n_hallucination_samples"] == 18
    assert not [k for k in list(meta) + list(res.shift) if "harm" in k], (list(meta), list(res.shift))
    log = [json.loads(line) for line in (out / "train_sv_log.jsonl").read_text().splitlines()]
    assert any("hallucination_ce" in r for r in log) and any("heldout_hallucination_loss" in r for r in log)
    assert not [k for r in log for k in r if "harm" in k]
    sv = load_security_vector(str(res.vector_dir))
    assert sv.behaviour == {"name": "hallucination", "judges": ["demo"]}


def test_an_older_secvec_json_without_a_behaviour_is_harm(vectors, tmp_path):
    import shutil

    assert load_security_vector(str(vectors["a"])).behaviour == {"name": "harm", "judges": None}
    d = shutil.copytree(vectors["a"], tmp_path / "old")
    meta = json.loads((d / "secvec.json").read_text())
    meta["strength"] = {"judges": ["refusal"], "explained": 0.7}
    (d / "secvec.json").write_text(json.dumps(meta))
    assert load_security_vector(str(d)).behaviour == {"name": "harm", "judges": ["refusal"]}


@pytest.mark.parametrize("extra, match", [
    (["security_vector.behaviour=hallucination"], "needs the judges"),
    (["security_vector.behaviour=Halluc ination", "security_vector.judges=[refusal]"], "lower-case name"),
    (["security_vector.judges=[]"], "at least one judge"),
    (["security_vector.behaviour=hallucination", "security_vector.judges=[correctness]"], "expected answers"),
])
def test_stage1_behaviour_keys_are_refused_in_one_line(tiny_world, tmp_path, extra, match):
    cfg = load_config(None, [f"model.path={tiny_world.model_dir}", f"output_dir={tmp_path / 'o'}",
                             f"security_vector.harmful_data={tiny_world.data['harmful_sv']}",
                             f"security_vector.benign_data={tiny_world.data['kl_benign']}", *extra])
    with pytest.raises(ConfigError, match=match) as e:
        validate(cfg, "train-sv")
    assert "\n" not in str(e.value)
