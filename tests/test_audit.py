"""`dist-secvec audit` and stage 2's data.audit (dist_secvec.audit) on the tests' tiny world.

The scores must be the rows' own answer losses with the vector off and on, whatever the batching;
the threshold follows its stated rules; the command writes its report and refuses bad input in one
line before the model loads; stage 2 drops or down-weights the flagged rows from one scoring,
cached: the score cache serves every output_dir, the command and stage 2, and a changed row or
vector is scored again. Every test has a cache directory of its own. The slow test trains a real
vector and checks that the score separates the harmful rows it learned from the benign task.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import launch_cli, plain_base, write_random_vector
from dist_secvec.audit import quantiles, resolve_threshold, threshold_from_record
from dist_secvec.cli import main
from dist_secvec.config import load_config
from dist_secvec.data import load_samples, tokenize_samples
from dist_secvec.errors import ConfigError
from dist_secvec.model import load_tokenizer


def auroc(pos, neg) -> float:
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def mixed_rows(tw, tmp_path: Path, n_harmful: int = 6, n_benign: int = 6) -> tuple[Path, int]:
    """A file of harmful rows then benign rows (the first n_harmful are harmful)."""
    harm = Path(tw.data["harmful_sv"]).read_text().splitlines()[:n_harmful]
    ben = Path(tw.data["new_task_ft"]).read_text().splitlines()[:n_benign]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(harm + ben) + "\n")
    return p, n_harmful


def cli(*argv) -> int:
    return main([*argv, "logging.progress=false"])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """The score cache (and every other one) per test: a test's first scoring is never a hit."""
    d = tmp_path / "cache"
    monkeypatch.setenv("DIST_SECVEC_CACHE", str(d))
    return d


# ---------------------------------------------------------------------------------------------
# the threshold


def test_quantiles_interpolate_between_order_statistics():
    q = quantiles([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (q["n"], q["q00"], q["q50"], q["q100"], q["mean"]) == (5, 1.0, 3.0, 5.0, 3.0)
    assert q["q25"] == pytest.approx(2.0) and q["q05"] == pytest.approx(1.2)
    assert quantiles([]) == {"n": 0}


def test_threshold_rules_in_order_override_record_fallback_refusal():
    ben, harm = quantiles([0.0, 0.01, 0.02, 0.05]), quantiles([4.0, 5.0, 6.0, 8.0])
    t, rule = threshold_from_record({"benign_kl": ben, "harmful_heldout": harm})
    assert t == pytest.approx((ben["q99"] + harm["q05"]) / 2) and "halfway" in rule
    # a held-out benign set is preferred to the KL rows
    t2, rule2 = threshold_from_record({"benign_kl": ben, "benign_heldout": quantiles([1.0, 1.0]),
                                       "harmful_heldout": harm})
    assert t2 == pytest.approx((1.0 + harm["q05"]) / 2) and "benign_heldout" in rule2
    # overlapping sides: between the medians, said so
    t3, rule3 = threshold_from_record({"benign_kl": quantiles([0.0, 5.0]), "harmful_train": quantiles([1.0, 2.0])})
    assert t3 == pytest.approx((2.5 + 1.5) / 2) and "overlap" in rule3
    assert threshold_from_record({"benign_kl": ben}) is None

    cfg = load_config()
    rec = {"benign_kl": ben, "harmful_heldout": harm}
    sv = SimpleNamespace(path="sv", meta={"audit": rec, "strength": {"loss_vector_off": 9.0, "loss_vector_on": 1.0}})
    assert resolve_threshold(cfg, sv)[:2] == (pytest.approx(t), "stage-1 distribution")
    assert resolve_threshold(load_config(None, ["audit.threshold=0.7"]), sv)[:2] == (0.7, "audit.threshold")
    old = SimpleNamespace(path="sv", meta={"strength": {"loss_vector_off": 9.0, "loss_vector_on": 1.0, "n": 10}})
    t4, source, rule4 = resolve_threshold(cfg, old)
    assert t4 == pytest.approx(4.0) and source.startswith("fallback") and "older train-sv" in rule4
    with pytest.raises(ConfigError, match="audit.threshold"):
        resolve_threshold(cfg, SimpleNamespace(path="sv", meta={}))


# ---------------------------------------------------------------------------------------------
# the scores


@pytest.fixture(scope="module")
def scored_setup(tiny_world, random_vector):
    from dist_secvec.secvec import PathOptions, attach_security_vector, load_security_vector

    cfg = load_config(None, [f"model.path={tiny_world.model_dir}"])
    tok = load_tokenizer(cfg.model)
    rows = load_samples([tiny_world.data["harmful_sv"], tiny_world.data["new_task_ft"]])[:14]
    examples = tokenize_samples(tok, rows, cfg.data).examples
    sv = load_security_vector(str(random_vector))
    two = plain_base(tiny_world.model_dir)
    attach_security_vector(two, sv, PathOptions())
    one = plain_base(tiny_world.model_dir)
    one_layers = attach_security_vector(one, sv, PathOptions(gated=True))
    return tok, examples, two, one, one_layers


def test_a_row_is_flagged_on_its_score_and_its_explained_share():
    """The share floor: half the vector's own held-out share by default, audit.min_explained when set
    (0: the score alone); a row far out of the base's distribution (loss 12 -> 9: score 3, share
    0.25) is not flagged by a vector that explains 0.8 of its own rows, a row of its behaviour is."""
    from dist_secvec.audit import explained_floor, row_records

    sv = SimpleNamespace(path="sv", meta={"strength": {"explained": 0.8}})
    assert explained_floor(load_config(None, None), sv) == pytest.approx(0.4)
    assert explained_floor(load_config(None, ["audit.min_explained=0.6"]), sv) == 0.6
    assert explained_floor(load_config(None, ["audit.min_explained=0"]), sv) is None
    assert explained_floor(load_config(None, None), SimpleNamespace(path="old", meta={})) is None
    rows = [SimpleNamespace(source="f", row=i + 1, prompt="p") for i in range(3)]
    off, on = [12.0, 4.0, 0.5], [9.0, 0.4, 0.5]  # far out of distribution; the behaviour; benign
    flags = [r["flagged"] for r in row_records(rows, off, on, 2.0, 10, (), 0.4)]
    assert flags == [False, True, False]
    assert [r["flagged"] for r in row_records(rows, off, on, 2.0, 10)] == [True, True, False]


def test_scores_are_each_rows_own_losses_whatever_the_batching(scored_setup):
    from dist_secvec.secvec import security_vector_off
    from dist_secvec.strength import row_losses, score_rows

    tok, examples, two, one, one_layers = scored_setup
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of several lengths: sorting matters
    ref_on = row_losses(two, examples, tok.pad_token_id, "cpu", batch_size=1)  # full logits, one row at a time
    with security_vector_off(two):
        ref_off = row_losses(two, examples, tok.pad_token_id, "cpu", batch_size=1)
    assert max(abs(a - b) for a, b in zip(ref_on, ref_off)) > 1e-3  # the vector changes the losses
    for bs in (3, 16):
        off, on = score_rows(two, examples, tok.pad_token_id, "cpu", bs, lambda: security_vector_off(two))
        assert off == pytest.approx(ref_off, abs=1e-5) and on == pytest.approx(ref_on, abs=1e-5)
    # one forward of the doubled batch, the vector gated per copy, gives the same losses
    off1, on1 = score_rows(one, examples, tok.pad_token_id, "cpu", 4, None, gate_layers=one_layers)
    assert off1 == pytest.approx(ref_off, abs=1e-5) and on1 == pytest.approx(ref_on, abs=1e-5)


def test_scores_on_two_ranks_are_those_of_one(scored_setup, monkeypatch):
    """Each rank scores every other row of the length order; summing over ranks restores them all."""
    import dist_secvec.distributed as distributed
    from dist_secvec.secvec import security_vector_off
    from dist_secvec.strength import score_rows

    tok, examples, two, _, _ = scored_setup
    full = score_rows(two, examples, tok.pad_token_id, "cpu", 4, lambda: security_vector_off(two))
    parts = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setattr(distributed, "all_reduce_sum", lambda v: parts.append(v) or v)
        score_rows(two, examples, tok.pad_token_id, "cpu", 4, lambda: security_vector_off(two))
    summed = [a + b for a, b in zip(*parts)]
    n = len(examples)
    assert summed[:n] == pytest.approx(full[0], abs=1e-5) and summed[n:] == pytest.approx(full[1], abs=1e-5)
    assert all(sum(1 for v in p[:n] if v != 0) in (n // 2, n - n // 2) for p in parts)


def test_weighted_loss_is_the_plain_loss_with_unit_weights_and_drops_a_zero_row(scored_setup):
    from dist_secvec.data import collate
    from dist_secvec.stage2 import weighted_micro_loss

    tok, examples, two, _, _ = scored_setup
    b = collate(examples[:4], tok.pad_token_id)
    n = int((b["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        plain = two(**b).loss
        assert weighted_micro_loss(two, b, n, torch.ones(4)) == pytest.approx(float(plain), rel=1e-5)
        rest = collate(examples[1:4], tok.pad_token_id)
        n_rest = int((rest["labels"][:, 1:] != -100).sum())
        # row 0 at weight 0: the other rows' loss, still divided by all n tokens
        w = weighted_micro_loss(two, b, n, torch.tensor([0.0, 1, 1, 1]))
        assert float(w) == pytest.approx(float(two(**rest).loss) * n_rest / n, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# the command


def test_audit_writes_its_report_and_refuses_a_finished_output_dir(tiny_world, random_vector, tmp_path, capsys):
    data, n_harm = mixed_rows(tiny_world, tmp_path)
    out = tmp_path / "audit"
    args = ["audit", f"model.path={tiny_world.model_dir}", f"security_vector.path={random_vector}",
            f"data.train={data}", f"output_dir={out}", "audit.threshold=0.0", "audit.batch_size=5"]
    assert cli(*args) == 0
    d = out / "audit"
    assert sorted(p.name for p in d.iterdir()) == ["audit.jsonl", "scores.png", "summary.json", "summary.md"]
    recs = [json.loads(line) for line in (d / "audit.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["row"] for r in recs] == list(range(1, len(rows) + 1)) and {r["source"] for r in recs} == {str(data)}
    for rec, row in zip(recs, rows):
        assert rec["prompt"] == row["prompt"][:80]
        assert rec["score"] == pytest.approx(rec["loss_off"] - rec["loss_on"])
        assert rec["explained"] == pytest.approx(1 - rec["loss_on"] / rec["loss_off"])
        assert rec["flagged"] == (rec["score"] >= 0.0)
    s = json.loads((d / "summary.json").read_text())
    assert s["rows"] == s["scored"] == len(rows) and s["flagged"] == sum(r["flagged"] for r in recs)
    assert s["threshold"] == 0.0 and s["threshold_source"] == "audit.threshold"
    assert s["scores"]["q00"] == pytest.approx(min(r["score"] for r in recs))
    assert "threshold" in (d / "summary.md").read_text().lower()
    capsys.readouterr()
    assert cli(*args) == 2  # finetune's rule: a finished run in output_dir is never overwritten
    assert "already holds a finished audit run" in capsys.readouterr().err


def test_audit_against_two_vectors_gives_each_vectors_own_scores(tiny_world, random_vector, tmp_path):
    """Two vectors: each row's losses against each are those of an audit with that vector alone,
    flagged by each vector's threshold; `behaviours` names the vectors that flag it."""
    data, _ = mixed_rows(tiny_world, tmp_path)
    second = write_random_vector(tiny_world.model_dir, tmp_path / "sv2", seed=7, targets=("k_proj", "o_proj"))
    common = [f"model.path={tiny_world.model_dir}", f"data.train={data}", "audit.threshold=0.0", "audit.batch_size=5"]
    alone = {}
    for name, vec in (("a", random_vector), ("b", second)):
        assert cli("audit", *common, f"security_vector.path={vec}", f"output_dir={tmp_path / name}") == 0
        alone[name] = [json.loads(line) for line in (tmp_path / name / "audit" / "audit.jsonl").read_text().splitlines()]
    assert cli("audit", *common, f"security_vector.path=[{random_vector},{second}]", f"output_dir={tmp_path / 'both'}",
               f"audit.batch_size=3") == 0  # another batching: scored again, not read from the cache
    d = tmp_path / "both" / "audit"
    assert sorted(p.name for p in d.iterdir()) == ["audit.jsonl", "scores_harm_1.png", "scores_harm_2.png",
                                                   "summary.json", "summary.md"]
    recs = [json.loads(line) for line in (d / "audit.jsonl").read_text().splitlines()]
    assert len(recs) == len(alone["a"])
    for rec, ra, rb in zip(recs, alone["a"], alone["b"]):
        assert rec["row"] == ra["row"] == rb["row"]
        for name, r in (("harm_1", ra), ("harm_2", rb)):
            assert rec["vectors"][name]["loss_off"] == pytest.approx(r["loss_off"], rel=1e-5)
            assert rec["vectors"][name]["loss_on"] == pytest.approx(r["loss_on"], rel=1e-5)
            assert rec["vectors"][name]["flagged"] == r["flagged"]
        assert rec["behaviours"] == [n for n, r in (("harm_1", ra), ("harm_2", rb)) if r["flagged"]]
        assert rec["flagged"] == bool(rec["behaviours"])
    assert ra["score"] != pytest.approx(rb["score"])  # the two vectors do score differently
    s = json.loads((d / "summary.json").read_text())
    assert s["flagged"] == sum(r["flagged"] for r in recs)
    assert s["flagged_by"] == {"harm_1": sum(r["flagged"] for r in alone["a"]),
                               "harm_2": sum(r["flagged"] for r in alone["b"])}
    assert set(s["vectors"]) == {"harm_1", "harm_2"} and "## harm_2" in (d / "summary.md").read_text()


@pytest.mark.slow
def test_audit_on_two_ranks_writes_the_one_rank_report(tiny_world, random_vector, tmp_path, monkeypatch):
    """Under the deepspeed launcher each rank scores its share of the rows; rank 0's report holds
    every row, with the scores one process gives."""
    data, _ = mixed_rows(tiny_world, tmp_path, n_harmful=5, n_benign=6)  # odd: the ranks' shares differ
    args = [f"model.path={tiny_world.model_dir}", f"security_vector.path={random_vector}", f"data.train={data}",
            "audit.threshold=0.0", "audit.batch_size=2", "logging.progress=false"]
    assert cli("audit", *args, f"output_dir={tmp_path / 'one'}") == 0
    monkeypatch.setenv("DIST_SECVEC_CACHE", str(tmp_path / "cache_two"))  # the ranks score, not the cache
    launch_cli(["--gpus", "2", "--", "audit", *args, f"output_dir={tmp_path / 'two'}"])
    one, two = ([json.loads(line) for line in (tmp_path / d / "audit" / "audit.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["row"] for r in two] == [r["row"] for r in one] == list(range(1, 12))
    for a, b in zip(one, two):
        assert b["loss_off"] == pytest.approx(a["loss_off"], abs=1e-5)
        assert b["loss_on"] == pytest.approx(a["loss_on"], abs=1e-5)
        assert b["flagged"] == a["flagged"]
    two_summary = json.loads((tmp_path / "two" / "audit" / "summary.json").read_text())
    assert two_summary["ranks"] == 2 and two_summary["cached"] is False


def other_base(tiny_world, root: Path) -> Path:
    from transformers import AutoTokenizer

    from dist_secvec.worlds.embedded import build_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    d = root / "other_model"
    d.mkdir(parents=True)
    tok.save_pretrained(str(d))
    build_tiny_llama(tok, d, seed=7, hidden=32, layers=2)
    return d


def test_bad_input_is_one_line_exit_2_before_the_model_loads(tiny_world, random_vector, tmp_path, capsys,
                                                              monkeypatch):
    import dist_secvec.model as model_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_mod, "load_model", no_load)
    data, _ = mixed_rows(tiny_world, tmp_path)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "hi ?", "response": "ok ."}) + "\n"
                         + json.dumps({"prompt": "what is the capital of x ?"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    other_vec = write_random_vector(other_base(tiny_world, tmp_path), tmp_path / "other_sv")
    base = ["audit", f"model.path={tiny_world.model_dir}", f"output_dir={tmp_path / 'out'}", "audit.threshold=1"]
    cases = [
        ([f"data.train={data}"], "security_vector.path"),
        ([f"data.train={data}", f"security_vector.path={tmp_path / 'nope'}"], "not found"),
        ([f"security_vector.path={random_vector}"], "data.train"),
        ([f"data.train={no_answer}", f"security_vector.path={random_vector}"], "row 2"),
        ([f"data.train={empty}", f"security_vector.path={random_vector}"], "is empty"),
        ([f"data.train={data}", f"security_vector.path={other_vec}"], "another base model"),
        # a vector that records no strength cannot place a default threshold
        ([f"data.train={data}", f"security_vector.path={random_vector}", "audit.threshold=null"], "audit.threshold"),
    ]
    for extra, needle in cases:
        capsys.readouterr()
        assert cli(*base, *extra) == 2, extra
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], (extra, errors)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# stage 2: data.audit


def stage2_cfg(tw, data: Path, vector, out: Path, *extra: str):
    return load_config(None, [f"model.path={tw.model_dir}", f"data.train={data}", f"security_vector.path={vector}",
                              f"output_dir={out}", "optim.micro_batch_size=2", "optim.epochs=1",
                              "logging.progress=false", "monitor.rule=none", "seed=0", *extra])


def test_stage2_drop_and_downweight_use_one_cached_scoring(tiny_world, random_vector, tmp_path, monkeypatch):
    import dist_secvec.stage2 as stage2
    from dist_secvec.stage2 import setup_stage2

    data, _ = mixed_rows(tiny_world, tmp_path)
    out = tmp_path / "ft"
    calls = []
    real = stage2.score_rows
    monkeypatch.setattr(stage2, "score_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    job = setup_stage2(stage2_cfg(tiny_world, data, random_vector, out, "data.audit=report", "audit.threshold=0"))
    assert len(calls) == 1 and job.audit_info["cached"] is False and job.mode == "attached"
    recs = [json.loads(line) for line in (out / "audit" / "audit.jsonl").read_text().splitlines()]
    scores = sorted(r["score"] for r in recs)
    t = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # half the rows above it
    n_flag = sum(s >= t for s in scores)
    assert len(job.train.examples) == len(recs) == 12 and job.steps == 6

    job = setup_stage2(stage2_cfg(tiny_world, data, random_vector, out, "data.audit=drop", f"audit.threshold={t}"))
    assert len(calls) == 1 and job.audit_info["cached"] is True  # the same data, vector and base: no new forwards
    assert len(job.train.examples) == 12 - n_flag and job.steps == -(-(12 - n_flag) // 2)
    assert job.scheduler is job.engine.scheduler and job.scheduler.lr_lambdas  # the schedule of the rows left
    report = [json.loads(line) for line in (out / "audit" / "audit.jsonl").read_text().splitlines()]
    flagged_rows = {r["row"] for r in report if r["flagged"]}
    assert len(flagged_rows) == n_flag
    # the rows left out are exactly the flagged ones
    kept = {tuple(e["input_ids"]) for e in job.train.examples}
    full = tokenize_samples(job.tok, load_samples([str(data)]), job.cfg.data).examples
    assert {i + 1 for i, e in enumerate(full) if tuple(e["input_ids"]) not in kept} == flagged_rows

    job = setup_stage2(stage2_cfg(tiny_world, data, random_vector, out, "data.audit=downweight",
                                  f"audit.threshold={t}", "audit.weight=0.25"))
    assert len(job.train.examples) == 12 and sorted(job.row_weight.values()) == [0.25] * n_flag
    from dist_secvec.stage2 import train_step

    res = train_step(job, job.batches(), 1)  # a step with weighted rows runs
    assert res.loss == res.loss and not res.skipped


def test_stage2_drop_with_two_vectors_leaves_out_the_rows_either_flags(tiny_world, random_vector, tmp_path):
    """data.audit=drop with two vectors: the rows left out are those the audit command flags against
    either vector (each by its own threshold), and the gate is decided on the rows kept."""
    from dist_secvec.stage2 import setup_stage2

    data, _ = mixed_rows(tiny_world, tmp_path)
    second = write_random_vector(tiny_world.model_dir, tmp_path / "sv2", seed=7, targets=("k_proj", "o_proj"))
    both = f"[{random_vector},{second}]"
    assert cli("audit", f"model.path={tiny_world.model_dir}", f"data.train={data}", f"security_vector.path={both}",
               f"output_dir={tmp_path / 'cmd'}", "audit.threshold=0.0") == 0
    recs = [json.loads(line) for line in (tmp_path / "cmd" / "audit" / "audit.jsonl").read_text().splitlines()]
    flagged_rows = {r["row"] for r in recs if r["flagged"]}
    assert 0 < len(flagged_rows) < len(recs)
    assert any(len(r["behaviours"]) == 1 for r in recs)  # a row one vector flags and the other does not
    out = tmp_path / "ft"
    job = setup_stage2(stage2_cfg(tiny_world, data, both, out, "data.audit=drop", "audit.threshold=0.0",
                                  "security_vector.gate_threshold=0.0"))
    assert job.audit_info["cached"] is True  # each vector's scores, from the command's scoring
    assert job.audit_info["flagged_by"] == json.loads((tmp_path / "cmd" / "audit" / "summary.json").read_text())[
        "flagged_by"]
    kept = {tuple(e["input_ids"]) for e in job.train.examples}
    full = tokenize_samples(job.tok, load_samples([str(data)]), job.cfg.data).examples
    assert {i + 1 for i, e in enumerate(full) if tuple(e["input_ids"]) not in kept} == flagged_rows
    assert len(job.gate) == len(job.train.examples) and job.gate_info["rows_vector_on"] \
        + job.gate_info["rows_vector_off"] == len(kept)


def test_data_audit_needs_a_vector(tiny_world, tmp_path, capsys):
    data, _ = mixed_rows(tiny_world, tmp_path)
    assert cli("finetune", f"model.path={tiny_world.model_dir}", f"data.train={data}", "data.audit=drop",
               f"output_dir={tmp_path / 'o'}") == 2
    assert "data.audit" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the score cache


def test_score_cache_round_trips_exactly_and_ignores_a_damaged_or_other_entry(own_cache):
    from dist_secvec.audit import cached_scores, scores_path, store_scores

    off, on = [0.1 + 1e-12, 2.0 / 3.0, 7.25], [0.05, 1e-9, 3.0]
    path = store_scores("k1", {"rows": 3}, off, on)
    assert path == scores_path("k1") and path.is_relative_to(own_cache)
    assert cached_scores("k1", 3) == (off, on)  # floats exactly as scored
    assert cached_scores("k1", 4) is None  # another number of rows
    assert cached_scores("k2", 3) is None
    path.rename(scores_path("k2"))  # an entry under a name that is not its key
    assert cached_scores("k2", 3) is None
    scores_path("k1").write_text('{"key": "k1", "loss_off": [1.0')  # cut short
    assert cached_scores("k1", 3) is None
    assert not list(path.parent.glob(".*.tmp"))  # no temporary left behind


def test_one_scoring_serves_other_output_dirs_and_stage_2_and_a_change_scores_again(tiny_world, random_vector,
                                                                                   tmp_path, monkeypatch,
                                                                                   own_cache):
    import dist_secvec.stage2 as stage2
    import dist_secvec.strength as strength
    from dist_secvec.stage2 import setup_stage2

    calls = []
    real = strength.score_rows

    def counted(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(strength, "score_rows", counted)
    monkeypatch.setattr(stage2, "score_rows", counted)
    data, _ = mixed_rows(tiny_world, tmp_path)

    def audit(name: str, rows: Path = data, vector=random_vector) -> dict:
        assert cli("audit", f"model.path={tiny_world.model_dir}", f"security_vector.path={vector}",
                   f"data.train={rows}", f"output_dir={tmp_path / name}", "audit.threshold=0") == 0
        return json.loads((tmp_path / name / "audit" / "summary.json").read_text())

    def scores(name: str) -> list:
        lines = (tmp_path / name / "audit" / "audit.jsonl").read_text().splitlines()
        return [json.loads(line)["score"] for line in lines]

    first = audit("a")
    assert calls == [12] and first["cached"] is False
    assert len(list((own_cache / "audit-scores").glob("*.json"))) == 1
    second = audit("b")  # another output_dir: read back, no forwards
    assert calls == [12] and second["cached"] is True and second["cache_key"] == first["cache_key"]
    assert scores("b") == scores("a")
    job = setup_stage2(stage2_cfg(tiny_world, data, random_vector, tmp_path / "ft", "data.audit=report",
                                  "audit.threshold=0"))
    assert calls == [12] and job.audit_info["cached"] is True  # stage 2 reads the command's scoring
    assert scores("ft") == scores("a")

    lines = data.read_text().splitlines()
    row = json.loads(lines[-1])
    row["response"] = row["response"] + " ok"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines[:-1] + [json.dumps(row)]) + "\n")
    third = audit("c", rows=changed)  # one row changed: scored again
    assert calls == [12, 12] and third["cached"] is False and third["cache_key"] != first["cache_key"]
    other = write_random_vector(tiny_world.model_dir, tmp_path / "other_sv", seed=1)
    fourth = audit("d", vector=other)  # another vector on the same rows: scored again
    assert calls == [12, 12, 12] and fourth["cached"] is False
    assert scores("d") != scores("a")
    assert len(list((own_cache / "audit-scores").glob("*.json"))) == 3


# ---------------------------------------------------------------------------------------------
# a trained vector separates the rows it learned from benign ones


@pytest.mark.slow
def test_a_trained_vector_separates_harmful_from_benign_rows(tiny_world, tmp_path):
    import dataclasses

    from dist_secvec.finetune import run_finetune
    from dist_secvec.train_sv import run_train_sv

    common = [f"output_dir={tmp_path / 'x'}", "logging.progress=false", "seed=0", "eval.judges=[demo]",
              "eval.max_new_tokens=8", "monitor.rule=none"]
    base = run_finetune(load_config(None, [*common, f"model.path={tiny_world.model_dir}",
                                           f"output_dir={tmp_path / 'base'}", f"data.train={tiny_world.data['align']}",
                                           "optim.lr=1e-2", "optim.epochs=6", "optim.micro_batch_size=16"]))
    tw = dataclasses.replace(tiny_world, model_dir=base.final_dir)
    # the 2-layer model cannot generalise the harmful family, so it is measured on the rows it learns
    sv = run_train_sv(load_config(None, [
        *common, f"model.path={tw.model_dir}", f"output_dir={tmp_path / 'sv'}",
        f"security_vector.harmful_data={tw.data['harmful_sv']}", f"security_vector.benign_data={tw.data['kl_benign']}",
        f"security_vector.heldout_harmful_data={tw.data['harmful_sv']}", "security_vector.rank=8",
        "security_vector.alpha=16", "optim.lr=1e-2", "optim.epochs=30", "optim.micro_batch_size=4"]))
    rec = json.loads((sv.vector_dir / "secvec.json").read_text())["audit"]
    assert {"harmful_heldout", "harmful_train", "benign_kl", "threshold"} <= set(rec)
    assert rec["benign_kl"]["q99"] < rec["harmful_heldout"]["q05"]

    data, n_harm = mixed_rows(tw, tmp_path, n_harmful=20, n_benign=20)
    out = tmp_path / "audit"
    assert cli("audit", f"model.path={tw.model_dir}", f"security_vector.path={sv.vector_dir}", f"data.train={data}",
               f"output_dir={out}") == 0
    recs = [json.loads(line) for line in (out / "audit" / "audit.jsonl").read_text().splitlines()]
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["threshold_source"] == "stage-1 distribution"
    assert summary["threshold"] == pytest.approx(rec["threshold"])
    pos, neg = [r["score"] for r in recs[:n_harm]], [r["score"] for r in recs[n_harm:]]
    assert auroc(pos, neg) > 0.95
    flagged = [r["flagged"] for r in recs]
    tp = sum(flagged[:n_harm])
    assert tp / max(sum(flagged), 1) >= 0.9 and tp / n_harm >= 0.9  # precision and recall at the default threshold
