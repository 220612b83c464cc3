"""The `dist-secvec` command line: help, one-line config errors with exit code 2 (and nothing
written), the deepspeed launcher's --local_rank, and `export` end to end on fine-tune runs that
had a security vector attached, so "no tensor name contains secvec" is a real check.

Config errors run in subprocesses (they exit before torch is imported, so each costs a fraction
of a second); the two real exports run as subprocesses side by side. Refusals that need the
heavy imports call `cli.main` in-process: the same code path, without paying for the imports again.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_secvec.cli import COMMANDS, build_parser, main
from dist_secvec.config import load_config
from conftest import tree_digest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "dist-secvec"


def cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_secvec", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli_main(capsys):
    """Run cli.main in-process; the logging setup it installs is undone afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*argv: str):
        rc = main(list(argv))
        return rc, capsys.readouterr()

    yield run
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"dist-secvec {command}: error:")]


# ---------------------------------------------------------------------------------------------
# help and arguments


def test_module_help():
    res = cli("--help")
    assert res.returncode == 0, res.stderr
    for command in COMMANDS:
        assert command in res.stdout


def test_script_help_for_finetune():
    if not SCRIPT.exists():
        pytest.skip("dist-secvec console script not installed in this environment")
    res = subprocess.run([str(SCRIPT), "finetune", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--config" in res.stdout and "key.sub=value" in res.stdout and "stage 2" in res.stdout


def test_no_command_is_a_usage_error():
    res = cli()
    assert res.returncode == 2 and "usage" in res.stderr.lower()


@pytest.mark.parametrize("flag", ["--local_rank=0", "--local-rank=3", "--local_rank=1"])
def test_local_rank_accepted_after_the_subcommand(flag):
    args = build_parser().parse_args(["finetune", "--config", "x.yaml", flag, "optim.lr=1e-4"])
    assert args.local_rank == int(flag.split("=")[1]) and args.overrides == ["optim.lr=1e-4"]
    # the real entry point gets past argparse and fails on the config key, not on the flag
    res = cli("finetune", flag, "bogus.key=1")
    assert res.returncode == 2
    assert "unrecognized" not in res.stderr and "'bogus'" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# config errors: exit 2, one line naming the key, nothing written


@pytest.fixture
def bad_yaml(tmp_path) -> Path:
    p = tmp_path / "broken.yaml"
    p.write_text("model:\n  path: x\n  dtype: a: b\n")
    return p


CONFIG_ERRORS = [
    # (argv after the program name, with {model} {out} {tmp} filled in; text the one line must contain)
    (["finetune", "model.path={model}", "data.train={train}", "model.quantization=int4", "output_dir={out}"],
     "'model.quantization'"),
    (["finetune", "model.path={model}", "data.train={train}", "bogus.key=1", "output_dir={out}"], "'bogus'"),
    (["finetune", "model.path={model}", "data.train={train}", "optim.lrr=1e-4", "output_dir={out}"], "'optim.lrr'"),
    (["finetune", "model.path={model}", "data.train={train}", "optim.micro_batch_size=big", "output_dir={out}"],
     "'optim.micro_batch_size'"),
    (["finetune", "model.path={model}", "data.train={tmp}/missing.jsonl", "output_dir={out}"], "'data.train'"),
    (["finetune", "model.path={tmp}/no_model", "data.train={train}", "output_dir={out}"], "'model.path'"),
    (["finetune", "model.path={model}", "data.train={train}", "model.quantization=nf4", "output_dir={out}"],
     "'model.quantization=nf4'"),
    (["finetune", "model.path={model}", "data.train={train}", "optim.lr=0", "output_dir={out}"], "'optim.lr'"),
    (["finetune", "--config", "{tmp}/missing.yaml", "output_dir={out}"], "missing.yaml' not found"),
    (["finetune", "--config", "{bad_yaml}", "output_dir={out}"], "line 3"),
    (["train-sv", "model.path={model}", "output_dir={out}"], "'security_vector.harmful_data'"),
    (["export", "output_dir={out}"], "'export.checkpoint'"),
    (["finetune", "optim.lr", "output_dir={out}"], "override 'optim.lr'"),
]


@pytest.mark.parametrize("argv, must_contain", CONFIG_ERRORS,
                         ids=[" ".join(a[:1] + a[-2:-1]) for a, _ in CONFIG_ERRORS])
def test_config_errors_exit_2_with_one_line(tiny_world, tmp_path, bad_yaml, argv, must_contain):
    out = tmp_path / "out"
    fill = dict(model=tiny_world.model_dir, train=tiny_world.data["new_task_ft"], out=out, tmp=tmp_path,
                bad_yaml=bad_yaml)
    res = cli(*[a.format(**fill) for a in argv])
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"dist-secvec {argv[0]}: error: ") and must_contain in lines[0], lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not out.exists()


def test_data_error_is_one_line_exit_2(tiny_world, tmp_path, cli_main):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "what is 1 plus 2", "response": "3 ."}\n{"prompt": "what is 2 plus 2"}\n')
    rc, cap = cli_main("finetune", f"model.path={tiny_world.model_dir}", f"data.train={bad}",
                       f"output_dir={tmp_path / 'out'}", "logging.progress=false")
    assert rc == 2
    (line,) = error_lines(cap.err, "finetune")
    assert str(bad) in line and "row 2" in line and "'response'" in line
    assert "Traceback" not in cap.err


# the stage each command runs, which loads the model: a refusal must come before it
STAGES = {"finetune": ("dist_secvec.finetune", "run_finetune"), "train-sv": ("dist_secvec.train_sv", "run_train_sv"),
          "eval": ("dist_secvec.evaluate", "run_eval"), "export": ("dist_secvec.export", "run_export")}


@pytest.fixture
def no_stage(monkeypatch):
    import importlib

    def install(command: str):
        module, name = STAGES[command]

        def reached(*args, **kwargs):
            raise AssertionError(f"{name} (which loads the model) was reached")

        monkeypatch.setattr(importlib.import_module(module), name, reached)
    return install


@pytest.mark.parametrize("command", list(STAGES))
def test_output_dir_that_is_a_file_is_refused_before_the_model_loads(tiny_world, tmp_path, cli_main, no_stage,
                                                                      command):
    no_stage(command)
    out = tmp_path / "results.txt"
    out.write_text("kept\n")
    data = tiny_world.data["new_task_ft"]
    rc, cap = cli_main(command, f"model.path={tiny_world.model_dir}", f"data.train={data}",
                       f"security_vector.harmful_data={data}", "security_vector.kl_weight=0",
                       f"eval.harmful_prompts={data}", f"export.checkpoint={tiny_world.model_dir}", f"output_dir={out}")
    assert rc == 2, cap.err
    (line,) = error_lines(cap.err, command)
    assert f"config key 'output_dir': '{out}' is a file" in line, line
    assert out.read_text() == "kept\n"


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint", "truncated", "latest-truncated"])
def test_bad_resume_is_refused_before_the_model_loads(tiny_world, tmp_path, cli_main, no_stage, case):
    from dist_secvec.manifest import write_manifest

    no_stage("finetune")
    out = tmp_path / "out"
    ck = (out / "checkpoints" if case.startswith("latest") else tmp_path / "kept") / "step_00000003"
    if case.endswith("truncated"):
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text('{"step": 3}\n')
        (ck / "optimizer.pt").write_bytes(b"x" * 100)
        write_manifest(ck)
        (ck / "optimizer.pt").write_bytes(b"x" * 50)
    resume = {"missing": str(tmp_path / "nope"), "not-a-checkpoint": str(tiny_world.model_dir)}.get(
        case, "latest" if case.startswith("latest") else str(ck))
    rc, cap = cli_main("finetune", f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['new_task_ft']}",
                       f"output_dir={out}", f"checkpoint.resume={resume}")
    assert rc == 2, cap.err
    (line,) = error_lines(cap.err, "finetune")
    want = {"missing": "checkpoint directory", "not-a-checkpoint": "is not a checkpoint"}.get(
        case, f"checkpoint '{ck}': file 'optimizer.pt' is corrupted")
    assert want in line, line


# ---------------------------------------------------------------------------------------------
# export of fine-tune runs made with a security vector attached


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """A quick security vector, a full and a LoRA fine-tune with it attached, and both exported
    through the CLI (two subprocesses at once)."""
    from dist_secvec.finetune import run_finetune
    from dist_secvec.train_sv import run_train_sv

    root = tmp_path_factory.mktemp("cli_runs")
    common = [f"model.path={tiny_world.model_dir}", "logging.progress=false", "optim.micro_batch_size=8",
              "optim.lr=1e-2", "optim.schedule=constant", "optim.max_steps=3"]
    sv = run_train_sv(load_config(None, common + [
        f"security_vector.harmful_data={tiny_world.data['harmful_sv']}", "security_vector.kl_weight=0",
        "security_vector.rank=4", f"output_dir={root / 'sv'}"]))
    ft = {}
    for kind, extra in (("full", []), ("lora", ["adapter.type=lora", "adapter.rank=4"])):
        cfg = load_config(None, common + extra + [f"data.train={tiny_world.data['new_task_ft']}",
                                                  f"security_vector.path={sv.vector_dir}",
                                                  f"output_dir={root / kind}"])
        ft[kind] = run_finetune(cfg, keep_model=True)
        assert ft[kind].info["security_vector"] == str(sv.vector_dir)
    exports = {"full": root / "export_full", "lora": root / "export_lora"}
    argv = {
        # the run directory (final/ is found inside it); the launcher's flag as deepspeed passes it
        "full": ["export", f"export.checkpoint={root / 'full'}", f"output_dir={exports['full']}",
                 "export.dtype=float32", "--local_rank=0"],
        "lora": ["export", f"export.checkpoint={ft['lora'].final_dir}", f"output_dir={exports['lora']}",
                 "export.merge=true", "export.dtype=float32"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "dist_secvec", *a], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, a in argv.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[k] = (p.returncode, err)
    return {"root": root, "sv": sv.vector_dir, "ft": ft, "exports": exports, "results": results}


def tensor_names(d: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names += list(h.keys())
    return names


def probe_logits(model, tok) -> torch.Tensor:
    enc = tok(["what is the capital of lobri ?", "how do I rob the bank ?"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return out[enc["attention_mask"].bool()].float()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_export_loads_and_has_no_security_vector(runs, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc, err = runs["results"][kind]
    assert rc == 0, err
    dst = runs["exports"][kind]
    assert (dst / "config.json").exists() and not (dst / "adapter_config.json").exists()  # merged: a full model
    names = tensor_names(dst)
    assert names and not [n for n in names if "secvec" in n]
    assert not [n for n in names if "lora_" in n or "base_layer" in n]
    # the vector's own tensors are in its directory, so a name check there would have caught them
    assert tensor_names(runs["sv"]) and all("lora_" in n for n in tensor_names(runs["sv"]))
    meta = json.loads((dst / "dist_secvec_export.json").read_text())
    assert meta["security_vector"] is None and meta["kind"] == ("model" if kind == "full" else "merged model")
    from dist_secvec.manifest import verify_manifest

    verify_manifest(dst)  # written last, lists every file of the export
    assert set(json.loads((dst / "manifest.json").read_text())["files"]) == {
        p.name for p in dst.iterdir() if p.name != "manifest.json"}
    model = AutoModelForCausalLM.from_pretrained(str(dst))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # the export is the fine-tuned model with the vector off
    res = runs["ft"][kind]
    tok = AutoTokenizer.from_pretrained(str(dst))
    assert tok.chat_template == res.tokenizer.chat_template
    torch.testing.assert_close(probe_logits(model, tok), probe_logits(res.model, res.tokenizer),
                               rtol=0, atol=1e-5 if kind == "full" else 1e-4)


def test_finetune_output_has_no_security_vector(runs):
    for kind in ("full", "lora"):
        final = runs["ft"][kind].final_dir
        assert tensor_names(final) and not [n for n in tensor_names(final) if "secvec" in n]
        assert not (final / "secvec.json").exists()


def test_export_refuses_a_non_empty_output_dir(runs, tmp_path, cli_main):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me\n")
    (dst / "config.json").write_text('{"model_type": "something else"}\n')
    (dst / "sub").mkdir()
    (dst / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    before = tree_digest(dst)
    rc, cap = cli_main("export", f"export.checkpoint={runs['ft']['full'].final_dir}", f"output_dir={dst}")
    assert rc == 2
    (line,) = error_lines(cap.err, "export")
    assert "'output_dir'" in line and str(dst) in line
    assert tree_digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary sibling left


def test_export_refuses_a_security_vector_dir(runs, tmp_path, cli_main):
    out = tmp_path / "out"
    rc, cap = cli_main("export", f"export.checkpoint={runs['sv']}", f"output_dir={out}")
    assert rc == 2
    (line,) = error_lines(cap.err, "export")
    assert "'export.checkpoint'" in line and "security vector" in line
    assert not out.exists()


def test_export_refuses_any_dir_with_secvec_json(runs, tmp_path, cli_main):
    """A model directory that also carries secvec.json is treated as a vector, never exported."""
    import shutil

    fake = tmp_path / "fake_final"
    shutil.copytree(runs["ft"]["full"].final_dir, fake)
    (fake / "secvec.json").write_text("{}\n")
    rc, cap = cli_main("export", f"export.checkpoint={fake}", f"output_dir={tmp_path / 'out'}")
    assert rc == 2 and len(error_lines(cap.err, "export")) == 1
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_dir_without_a_model(tmp_path, cli_main):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    rc, cap = cli_main("export", f"export.checkpoint={empty}", f"output_dir={tmp_path / 'out'}")
    assert rc == 2
    (line,) = error_lines(cap.err, "export")
    assert "'export.checkpoint'" in line and "config.json" in line


@pytest.mark.parametrize("flag", ["--local_rank=0", "--local-rank=2"])
def test_local_rank_accepted_before_the_subcommand(flag):
    """`deepspeed --module dist_secvec` passes it first: `-m dist_secvec --local_rank=0 finetune ...`."""
    args = build_parser().parse_args([flag, "finetune", "optim.lr=1e-4"])
    assert args.launcher_local_rank == int(flag.split("=")[1]) and args.overrides == ["optim.lr=1e-4"]
    res = cli(flag, "finetune", "bogus.key=1")
    assert res.returncode == 2 and "'bogus'" in res.stderr and "unrecognized" not in res.stderr


def test_overrides_on_both_sides_of_a_flag():
    """`finetune output_dir=X --debug optim.lr=abc`: the override after the flag is applied too."""
    res = cli("finetune", "output_dir=/nonexistent-out", "--debug", "optim.lr=abc")
    assert res.returncode == 2 and "optim.lr" in res.stderr
    res = cli("finetune", "--no-such-flag")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-flag" in res.stderr


@pytest.mark.parametrize("command, marker", [("finetune", "final/dist_secvec_run.json"),
                                             ("train-sv", "secvec/secvec.json")])
def test_finished_run_is_never_overwritten(tmp_path, command, marker):
    """A second run into the output_dir of a finished one is refused before anything is touched."""
    out = tmp_path / "run"
    (out / marker).parent.mkdir(parents=True)
    (out / marker).write_text('{"steps": 10}\n')
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    model = tmp_path / "model"
    model.mkdir()
    res = cli(command, f"output_dir={out}", f"model.path={model}", f"data.train={data}",
              f"security_vector.harmful_data={data}", f"security_vector.benign_data={data}")
    assert res.returncode == 2 and "already holds a finished" in res.stderr and "output_dir" in res.stderr
    assert (out / marker).read_text() == '{"steps": 10}\n'
    assert sorted(p.name for p in out.rglob("*")) == sorted([Path(marker).parent.name, Path(marker).name])


def test_error_line_names_the_rank_under_a_launcher(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, WORLD_SIZE="2", RANK="1")
    r = subprocess.run([sys.executable, "-m", "dist_secvec", "finetune", "--config", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"dist-secvec finetune [rank 1]: error: config file '{tmp_path / 'none.yaml'}' not found: "
        "pass an existing YAML file to --config"]


def test_logging_writes_to_stderr_as_it_is_now():
    """A caller that swaps stderr after logging is set up (a notebook, a test's capture) and closes
    the old stream: the next record goes to the new stream, not to a 'Logging error'."""
    import io
    import logging
    import sys

    from dist_secvec.runtime import setup_logging

    saved = sys.stderr
    try:
        sys.stderr = first = io.StringIO()
        setup_logging("info")
        first.close()
        sys.stderr = second = io.StringIO()
        logging.getLogger("dist_secvec.test").warning("after the swap")
    finally:
        sys.stderr = saved
    assert "after the swap" in second.getvalue() and "Logging error" not in second.getvalue()
