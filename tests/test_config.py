"""Typed config: defaults, YAML files, `key.sub=value` overrides, and every error a user can cause.

Each error must be a ConfigError (exit code 2 in the CLI) whose message names the key (or the
file and line) so that the one line the user sees says what to fix. `validate` checks paths,
ranges and impossible combinations per command before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_secvec.config import (AdapterConfig, Config, DataConfig, ModelConfig, STAGE_OPTIM_DEFAULTS, load_config, resolve_stage_defaults, validate)
from dist_secvec.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# defaults, files, overrides


def test_defaults_load_and_equal_the_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.source is None
    # unset (None): each stage's own default, filled in by validate and saved with the run
    assert cfg.optim.lr is None and cfg.optim.epochs is None
    sv, ft = resolve_stage_defaults(cfg, "train-sv").optim, resolve_stage_defaults(cfg, "finetune").optim
    assert (sv.lr, sv.epochs) == (STAGE_OPTIM_DEFAULTS["train-sv"]["lr"], STAGE_OPTIM_DEFAULTS["train-sv"]["epochs"])
    assert (ft.lr, ft.epochs) == (2e-5, 1) and isinstance(ft.lr, float)
    assert resolve_stage_defaults(load_config(None, ["optim.lr=1e-4"]), "train-sv").optim.lr == pytest.approx(1e-4)
    assert cfg.model.quantization == "none" and cfg.adapter.type == "none"
    assert cfg.adapter.target_modules is None  # every linear layer of the model (model.linear_targets)
    # unset (None): stage 1 trains rank 8 on every linear, stage 2 takes the vector's own
    assert cfg.security_vector.rank is None and cfg.security_vector.target_modules is None


def test_yaml_file_then_overrides(tmp_path):
    path = write(tmp_path / "run.yaml", """
        model:
          path: /models/llama
          quantization: nf4
        data:
          train: [a.jsonl, b.jsonl]
          max_length: 256
        optim:
          lr: 3.0e-4
          micro_batch_size: 8
          max_grad_norm: 0.5
        output_dir: runs/x
        seed: 7
        """)
    cfg = load_config(str(path), [
        "optim.lr=1e-4",  # yaml reads this as a string; overrides must turn it into a number
        "optim.weight_decay=1E-2",
        "optim.betas=[0.8, 0.95]",
        "data.shuffle=false",
        "model.double_quant=true",
        "optim.max_grad_norm=null",
        "optim.max_steps=12",
        "data.eval=c.jsonl",  # a single name becomes a one-element list
        "adapter.target_modules=[q_proj, v_proj]",
        "deepspeed.config={zero_optimization: {stage: 2}}",  # an inline mapping (Any)
        "adapter.alpha=8",  # an int where a float is expected
    ])
    assert cfg.source == str(path)
    # from the file, untouched by overrides
    assert cfg.model.path == "/models/llama" and cfg.model.quantization == "nf4"
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.data.max_length == 256
    assert cfg.optim.micro_batch_size == 8 and cfg.output_dir == "runs/x" and cfg.seed == 7
    # overrides win over the file, with the right types
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.data.shuffle is False and cfg.model.double_quant is True
    assert cfg.optim.max_grad_norm is None
    assert cfg.optim.max_steps == 12 and isinstance(cfg.optim.max_steps, int)
    assert cfg.data.eval == ["c.jsonl"]
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.deepspeed.config == {"zero_optimization": {"stage": 2}}
    assert cfg.adapter.alpha == 8.0 and isinstance(cfg.adapter.alpha, float)
    # keys named nowhere keep their defaults
    assert cfg.data.train_on == DataConfig.train_on and cfg.model.dtype == ModelConfig.dtype


def test_later_override_wins_and_empty_value_is_null():
    cfg = load_config(None, ["optim.max_steps=3", "optim.max_steps=5", "data.max_samples="])
    assert cfg.optim.max_steps == 5
    assert cfg.data.max_samples is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_yaml_file_is_a_one_line_error(tmp_path, text):
    """--config pointing at an empty file is a mistake (a placeholder, the wrong path), not a request
    for the defaults: say so instead of naming the first required key."""
    path = write(tmp_path / "empty.yaml", text)
    with pytest.raises(ConfigError, match=r"config file '.*empty.yaml' is empty \(or only comments\)"):
        load_config(str(path))


def test_scientific_notation_in_yaml_file(tmp_path):
    cfg = load_config(str(write(tmp_path / "run.yaml", "optim:\n  lr: 1e-4\n")))
    assert cfg.optim.lr == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------
# parse errors: each is a ConfigError naming the key


@pytest.mark.parametrize("overrides, must_contain", [
    # unknown keys, top level and nested: the message lists what is allowed
    (["bogus=1"], ["'bogus'", "allowed:", "model", "optim", "output_dir"]),
    (["optim.lrr=1e-4"], ["'optim.lrr'", "allowed:", "lr", "micro_batch_size"]),
    (["model.quantisation=nf4"], ["'model.quantisation'", "allowed:", "quantization"]),
    # wrong types
    (["optim.micro_batch_size=abc"], ["'optim.micro_batch_size'", "integer"]),
    (["optim.micro_batch_size=2.5"], ["'optim.micro_batch_size'", "integer"]),
    (["model.path=[a, b]"], ["'model.path'", "string"]),
    (["optim.lr=true"], ["'optim.lr'", "number"]),
    (["optim.lr=fast"], ["'optim.lr'", "number"]),
    (["data.shuffle=maybe"], ["'data.shuffle'", "true or false"]),
    (["data.shuffle=1"], ["'data.shuffle'", "true or false"]),
    (["data.train={a: 1}"], ["'data.train'", "list"]),
    (["optim.max_steps=abc"], ["'optim.max_steps'", "integer"]),
    (["optim.weight_decay="], ["'optim.weight_decay'", "number"]),  # null for a non-optional key
    (["model=5"], ["'model'", "mapping"]),
    # bad choices
    (["model.quantization=int4"], ["'model.quantization'", "int4", "nf4"]),
    (["adapter.type=qlora"], ["'adapter.type'", "lora"]),
    (["optim.schedule=step"], ["'optim.schedule'", "cosine"]),
    (["model.dtype=fp16"], ["'model.dtype'", "float16"]),
    # malformed overrides
    (["optim.lr"], ["'optim.lr'", "key.sub=value"]),
    (["=3"], ["'=3'", "empty"]),
    (["optim.lr.x=1"], ["'optim.lr'"]),  # a leaf used as a section
])
def test_override_errors_name_the_key(overrides, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, (part, msg)


def test_override_into_a_non_section_set_by_the_file(tmp_path):
    path = write(tmp_path / "run.yaml", "output_dir: runs/a\noptim:\n  lr: 0.1\n")
    for override, key in (["output_dir.sub=1", "'output_dir'"], ["optim.lr.x=1", "'optim.lr'"]):
        with pytest.raises(ConfigError, match="not a section") as e:
            load_config(str(path), [override])
        assert key in str(e.value)


def test_config_errors_are_user_errors_with_exit_code_2():
    with pytest.raises(UserError) as e:
        load_config(None, ["bogus=1"])
    assert isinstance(e.value, ConfigError) and e.value.exit_code == 2


@pytest.mark.parametrize("text, must_contain", [
    ("bogus_section:\n  a: 1\n", ["'bogus_section'", "allowed:"]),
    ("optim:\n  lr: 0.1\n  warmup: 5\n", ["'optim.warmup'", "warmup_steps"]),
    ("optim:\n  micro_batch_size: '8'\n", ["'optim.micro_batch_size'", "integer"]),
    ("optim: 5\n", ["'optim'", "mapping"]),
    ("model:\n  quantization: int4\n", ["'model.quantization'", "int4"]),
    ("data:\n  shuffle: sometimes\n", ["'data.shuffle'", "true or false"]),
    ("data:\n  mask_prompt: false\n", ["'data.mask_prompt'", "data.train_on"]),
])
def test_file_errors_name_the_key(tmp_path, text, must_contain):
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    for part in must_contain:
        assert part in str(e.value), (part, str(e.value))


@pytest.mark.parametrize("text, line", [
    ("model:\n  path: a\n  dtype: b: c\n", 3),
    ("model:\n  path: a\n\n\noptim:\n  lr: 0.1\n\tx: 1\n", 7),
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert str(path) in msg and f"line {line}" in msg and "YAML" in msg, msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(str(missing))
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path, text):
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError, match="top level must be a mapping") as e:
        load_config(str(path))
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# validate(): ranges, paths, combinations


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Things validate() checks for existence (their content is never read)."""
    model = tmp_path / "model"
    model.mkdir()
    ckpt = tmp_path / "run" / "final"
    ckpt.mkdir(parents=True)
    sv = tmp_path / "secvec"
    sv.mkdir()
    out = {"model": str(model), "ckpt": str(ckpt), "sv": str(sv), "missing": str(tmp_path / "missing")}
    for name in ("train", "eval", "harmful", "benign", "heldout"):
        p = tmp_path / f"{name}.jsonl"
        p.write_text('{"prompt": "a", "response": "b"}\n')
        out[name] = str(p)
    return out


def base_overrides(command: str, f: dict) -> list[str]:
    """A config that validates for `command`; each error case adds one wrong key."""
    common = [f"model.path={f['model']}", f"output_dir={f['missing']}/out"]
    return {
        "finetune": common + [f"data.train={f['train']}"],
        "train-sv": common + [f"security_vector.harmful_data={f['harmful']}",
                              f"security_vector.benign_data={f['benign']}"],
        "export": common + [f"export.checkpoint={f['ckpt']}"],
        "eval": common,
    }[command]


@pytest.mark.parametrize("command", ["finetune", "train-sv", "export", "eval"])
def test_valid_configs_pass(files, command):
    cfg = load_config(None, base_overrides(command, files))
    # the same config back, with only the stage's optim defaults filled in
    assert validate(cfg, command) == (resolve_stage_defaults(cfg, command) if command in ("train-sv", "finetune") else cfg)


@pytest.mark.parametrize("command, overrides", [
    ("finetune", ["model.quantization=nf4", "adapter.type=lora"]),  # QLoRA
    ("finetune", ["model.quantization=int8", "adapter.type=lora", "deepspeed.zero_stage=2"]),
    ("finetune", ["model.quantization=nf4", "adapter.type=lora", "deepspeed.zero_stage=3"]),
    ("finetune", ["optim.epochs=0", "optim.max_steps=10"]),  # epochs only matter without max_steps
    ("finetune", ["optim.max_grad_norm=null", "optim.warmup_steps=0", "adapter.dropout=0.99"]),
    ("finetune", ["data.train=tatsu-lab/alpaca"]),  # a hub name is not checked as a path
    ("train-sv", ["security_vector.kl_weight=0", "security_vector.benign_data=[]"]),
    ("export", ["model.quantization=nf4"]),  # only finetune trains the quantized base
])
def test_valid_combinations_pass(files, command, overrides):
    validate(load_config(None, base_overrides(command, files) + overrides), command)


ERROR_CASES = [
    # (command, extra overrides, the key the message must name)
    # numbers that must be positive
    ("finetune", ["optim.lr=0"], "optim.lr"),
    ("finetune", ["optim.lr=-1e-4"], "optim.lr"),
    ("finetune", ["optim.micro_batch_size=0"], "optim.micro_batch_size"),
    ("finetune", ["optim.gradient_accumulation_steps=-2"], "optim.gradient_accumulation_steps"),
    ("finetune", ["data.max_length=0"], "data.max_length"),
    ("finetune", ["adapter.rank=0"], "adapter.rank"),
    ("finetune", ["adapter.alpha=-1"], "adapter.alpha"),
    ("finetune", ["security_vector.rank=-8"], "security_vector.rank"),
    ("finetune", ["optim.max_steps=0"], "optim.max_steps"),
    ("finetune", ["optim.max_grad_norm=-1.0"], "optim.max_grad_norm"),
    ("finetune", ["data.max_samples=0"], "data.max_samples"),
    ("finetune", ["logging.log_every=0"], "logging.log_every"),
    ("finetune", ["optim.epochs=0"], "optim.epochs"),
    ("finetune", ["optim.warmup_steps=-1"], "optim.warmup_steps"),
    ("train-sv", ["security_vector.kl_weight=-0.5"], "security_vector.kl_weight"),
    # ranges
    ("finetune", ["adapter.dropout=1.0"], "adapter.dropout"),
    ("finetune", ["adapter.dropout=-0.1"], "adapter.dropout"),
    ("train-sv", ["security_vector.dropout=1.5"], "security_vector.dropout"),
    ("finetune", ["optim.betas=[0.9]"], "optim.betas"),
    ("finetune", ["optim.betas=[0.9, 1.0]"], "optim.betas"),
    ("finetune", ["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    ("finetune", ["adapter.type=lora", "adapter.target_modules=[]"], "adapter.target_modules"),
    ("train-sv", ["security_vector.target_modules=[]"], "security_vector.target_modules"),
    # missing files and directories
    ("finetune", ["data.train={missing}/train.jsonl"], "data.train"),
    ("finetune", ["data.train=[{train}, {missing}/more.csv]"], "data.train"),
    ("finetune", ["data.eval={missing}/eval.jsonl"], "data.eval"),
    ("finetune", ["data.train=[]"], "data.train"),
    ("finetune", ["model.path={missing}/model"], "model.path"),
    ("finetune", ["model.path=''"], "model.path"),
    ("train-sv", ["model.path={missing}/model"], "model.path"),
    ("finetune", ["security_vector.path={missing}/secvec"], "security_vector.path"),
    ("finetune", ["deepspeed.config={missing}/ds.json"], "deepspeed.config"),
    ("train-sv", ["security_vector.harmful_data={missing}/harmful.jsonl"], "security_vector.harmful_data"),
    ("train-sv", ["security_vector.benign_data={missing}/benign.parquet"], "security_vector.benign_data"),
    ("train-sv", ["security_vector.heldout_benign_data={missing}/h.jsonl"], "security_vector.heldout_benign_data"),
    ("eval", ["eval.harmful_prompts={missing}/advbench.csv"], "eval.harmful_prompts"),
    ("export", ["export.checkpoint={missing}/final"], "export.checkpoint"),
    # impossible combinations
    ("finetune", ["model.quantization=nf4", "adapter.type=none"], "model.quantization"),
    ("finetune", ["model.quantization=int8"], "adapter.type"),
    ("finetune", ["model.quantization=int8", "adapter.type=lora", "deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
    ("finetune", ["model.quantization=nf4", "adapter.type=lora", "deepspeed.zero_stage=3",
                  "model.quant_storage=uint8"], "model.quant_storage"),
    ("train-sv", ["security_vector.harmful_data=[]"], "security_vector.harmful_data"),
    ("train-sv", ["security_vector.kl_weight=1.0", "security_vector.benign_data=[]"], "security_vector.benign_data"),
    ("export", ["export.checkpoint="], "export.checkpoint"),
]


@pytest.mark.parametrize("command, overrides, key", ERROR_CASES,
                         ids=[f"{c}-{'-'.join(o)}" for c, o, _ in ERROR_CASES])
def test_validate_errors_name_the_key(files, command, overrides, key):
    overrides = [o.format(**files) for o in overrides]
    cfg = load_config(None, base_overrides(command, files) + overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, command)
    msg = str(e.value)
    assert f"'{key}" in msg, msg  # 'key' or 'key=value'
    assert "\n" not in msg


@pytest.mark.parametrize("override", ["optim.lr=.nan", "optim.lr=1e999", "optim.max_grad_norm=.nan"])
def test_validate_rejects_nan_and_inf(files, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):  # at parse time or in validate
        validate(load_config(None, base_overrides("finetune", files) + [override]), "finetune")


def test_missing_file_message_names_the_path(files):
    bad = f"{files['missing']}/train.jsonl"
    cfg = load_config(None, base_overrides("finetune", files) + [f"data.train={bad}"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, "finetune")
    assert bad in str(e.value)


def test_validate_is_per_command(files):
    """A missing training file is a finetune error, not an export error."""
    cfg = load_config(None, base_overrides("export", files) + [f"data.train={files['missing']}/x.jsonl"])
    validate(cfg, "export")
    with pytest.raises(ConfigError, match="data.train"):
        validate(cfg, "finetune")


def test_to_dict_round_trips_through_yaml(tmp_path, files):
    from dist_secvec.config import save_config

    cfg = load_config(None, base_overrides("finetune", files) + ["optim.lr=1e-3", "adapter.type=lora"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(str(tmp_path / "saved.yaml"))
    assert dataclasses.replace(again, source=None).to_dict() == cfg.to_dict()


def test_config_parsing_imports_no_torch(files):
    code = textwrap.dedent(f"""
        import sys
        from dist_secvec.config import load_config, validate
        cfg = validate(load_config(None, {base_overrides('finetune', files)!r}), "finetune")
        try:
            load_config(None, ["model.quantization=int4"])
        except Exception as e:
            assert type(e).__name__ == "ConfigError", e
        heavy = sorted(m for m in ("torch", "transformers", "datasets", "peft", "deepspeed", "bitsandbytes")
                       if m in sys.modules)
        assert not heavy, heavy
        """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
