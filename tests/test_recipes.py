"""Shipped recipes (configs/*.yaml), DeepSpeed JSON files (configs/*.json) and the memory estimator.

The recipes name cluster paths (/data/models/Llama-2-7b-chat-hf ...) that do not exist here; each is
loaded with those paths overridden to files and directories in a tmp dir, then validated for the
command it is meant for. The memory numbers quoted in each recipe's header are recomputed with
launch/estimate_memory.py and must match.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_secvec.config import load_config, refuse_ignored_keys, validate
from dist_secvec.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
DS_JSONS = sorted(CONFIGS.glob("*.json"))
ESTIMATOR = REPO / "launch" / "estimate_memory.py"
GIB = 2**30

EXPECTED_RECIPES = {
    "llama2_7b_full_sv_zero3_8gpu.yaml", "llama2_7b_qlora_sv_1gpu.yaml", "llama2_13b_qlora_sv_2gpu.yaml",
    "llama2_70b_qlora_sv_8gpu.yaml", "llama2_70b_qlora_sv_2node.yaml", "llama2_7b_train_sv.yaml",
    "smollm2_135m_train_sv_cpu.yaml", "smollm2_135m_lora_sv_cpu.yaml",
}
EXPECTED_JSONS = {"ds_zero2.json": 2, "ds_zero3.json": 3, "ds_zero3_offload.json": 3}

# config keys that name files or directories, and what each must be
PATH_KEYS = {
    "model.path": "dir", "model.tokenizer": "dir", "security_vector.path": "dir",
    "data.train": "files", "data.eval": "files",
    "security_vector.harmful_data": "files", "security_vector.benign_data": "files",
    "security_vector.heldout_benign_data": "files",
    "eval.harmful_prompts": "files", "eval.benign_tasks": "files", "eval.responses": "file",
}


def command_for(recipe: Path) -> str:
    return "train-sv" if "train_sv" in recipe.name else "finetune"


def get(cfg, key: str):
    node = cfg
    for k in key.split("."):
        node = getattr(node, k)
    return node


def path_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    """key=value overrides that point every path the recipe names at something that exists."""
    cfg = load_config(str(recipe))
    overrides = []
    for key, kind in PATH_KEYS.items():
        value = get(cfg, key)
        if not value:
            continue
        base = tmp_path / key.replace(".", "_")
        if kind == "dir":
            base.mkdir()
            (base / "config.json").write_text("{}")
            overrides.append(f"{key}={base}")
        else:
            names = value if isinstance(value, list) else [value]
            base.mkdir()
            paths = []
            for name in names:
                p = base / Path(name).name
                p.write_text('{"prompt": "hi", "response": "hello"}\n')
                paths.append(str(p))
            overrides.append(f"{key}={json.dumps(paths) if kind == 'files' else paths[0]}")
    return overrides


def load_estimator():
    spec = importlib.util.spec_from_file_location("estimate_memory", ESTIMATOR)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def est():
    return load_estimator()


# ---------------------------------------------------------------------------------------------
# YAML recipes


def test_expected_recipes_and_jsons_exist():
    assert EXPECTED_RECIPES <= {p.name for p in RECIPES}
    assert set(EXPECTED_JSONS) <= {p.name for p in DS_JSONS}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates_with_paths_overridden(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their DeepSpeed JSON relative to the repository root
    overrides = path_overrides(recipe, tmp_path)
    cfg = load_config(str(recipe), overrides)
    validate(cfg, command_for(recipe))
    refuse_ignored_keys(cfg, command_for(recipe))  # what the CLI checks next: no key it would ignore
    if cfg.eval.harmful_prompts or cfg.eval.benign_tasks:
        validate(cfg, "eval")
    # an override really replaced the cluster path
    assert cfg.model.path.startswith(str(tmp_path))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_fails_only_on_missing_cluster_paths(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(str(recipe))
    with pytest.raises(ConfigError, match="not found"):
        validate(cfg, command_for(recipe))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_settings_are_consistent(recipe):
    cfg = load_config(str(recipe))
    name = recipe.name
    ds = cfg.deepspeed
    if ds.zero_stage is not None:
        assert isinstance(ds.config, str), "recipes name a shipped DeepSpeed JSON"
        ds_json = json.loads((REPO / ds.config).read_text())
        assert ds_json["zero_optimization"]["stage"] == ds.zero_stage
        offloaded = "offload_optimizer" in ds_json["zero_optimization"]
        assert offloaded == ds.offload_optimizer
    if "qlora" in name:
        assert cfg.model.quantization == "nf4"
        assert cfg.model.quant_storage == "bfloat16"
        assert cfg.model.dtype == "bfloat16" and cfg.model.compute_dtype == "bfloat16"
        assert cfg.adapter.type == "lora"
    if "_full_" in name:
        assert cfg.model.quantization == "none" and cfg.adapter.type == "none"
        assert cfg.model.dtype == "bfloat16"
    if "zero3" in name or re.search(r"_(\d+)gpu|node", name) and not name.endswith("_1gpu.yaml"):
        assert ds.zero_stage == 3
    if command_for(recipe) == "finetune":
        assert cfg.security_vector.path, "stage-2 recipes run with a security vector"
    else:
        assert cfg.security_vector.harmful_data and cfg.security_vector.benign_data
        assert cfg.security_vector.kl_weight > 0
        # a stage-2 recipe reads the vector this one writes (output_dir/secvec)
        assert any(load_config(str(r)).security_vector.path == f"{cfg.output_dir}/secvec"
                   for r in RECIPES if command_for(r) == "finetune")
    if name.endswith("_cpu.yaml"):
        assert cfg.deepspeed.zero_stage is None and cfg.model.dtype == "float32"
        assert cfg.model.quantization == "none"  # bitsandbytes' 4-bit needs a GPU


def test_stage2_7b_recipes_use_the_stage1_output():
    stage1 = load_config(str(CONFIGS / "llama2_7b_train_sv.yaml"))
    for name in ("llama2_7b_full_sv_zero3_8gpu.yaml", "llama2_7b_qlora_sv_1gpu.yaml"):
        cfg = load_config(str(CONFIGS / name))
        assert cfg.security_vector.path == f"{stage1.output_dir}/secvec"  # run_train_sv writes output_dir/secvec
        assert (cfg.security_vector.rank, cfg.security_vector.alpha) == (
            stage1.security_vector.rank, stage1.security_vector.alpha)


def header(recipe: Path) -> list[str]:
    lines = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_header_names_its_launch_command(recipe):
    text = "\n".join(header(recipe))
    assert len(header(recipe)) > 5, "recipes start with a comment header"
    assert "Launch" in text
    assert f"--config configs/{recipe.name}" in text
    m = re.search(r"_(\d+)gpu\.yaml$", recipe.name)
    if m and int(m.group(1)) > 1:
        assert f"launch/deepspeed.sh --gpus {m.group(1)} -- " in text
    if recipe.name.endswith("_2node.yaml"):
        assert "launch/slurm.sbatch" in text and "--nodes 2" in text
    if recipe.name.endswith(("_1gpu.yaml", "_cpu.yaml")) or "train_sv" in recipe.name:
        assert f"dist-secvec {command_for(recipe)} --config configs/{recipe.name}" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_header_quotes_current_estimator_output(recipe, est, capsys):
    lines = header(recipe)
    if recipe.name.endswith("_cpu.yaml"):  # no GPU: the header gives the RAM it needs instead
        assert any("GiB of RAM" in ln for ln in lines)
        return
    starts = [i for i, ln in enumerate(lines) if ln.startswith("#   $ python launch/estimate_memory.py")]
    assert len(starts) == 1, "the header quotes one estimate_memory.py run"
    i = starts[0]
    argv = lines[i].split("launch/estimate_memory.py", 1)[1].split()
    quoted = []
    for ln in lines[i + 1:]:
        if not ln.startswith("#   "):
            break
        quoted.append(ln[4:])
    assert est.main(argv + ["--formula-only"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    assert quoted == printed, "re-run the command in the header and paste its output"


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON files

AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def autos(node, where=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from autos(v, f"{where}.{k}" if where else k)
    elif node == "auto":
        yield where


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_ds_json_valid_and_stage(path):
    cfg = json.loads(path.read_text())
    zero = cfg["zero_optimization"]
    if path.name in EXPECTED_JSONS:
        assert zero["stage"] == EXPECTED_JSONS[path.name]
    # the trainer passes a torch AdamW and its own LR schedule (no fused_adam build to compile)
    assert "optimizer" not in cfg and "scheduler" not in cfg
    # "auto" only where the trainer fills in values from the YAML config
    assert sorted(autos(cfg)) == sorted([*AUTO_KEYS, "bf16.enabled", "fp16.enabled"])
    assert all(not k.startswith("_") for k in cfg), "no comment keys"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
        assert isinstance(zero["stage3_param_persistence_threshold"], int)
    offload = "offload_optimizer" in zero
    assert offload == ("offload" in path.name)
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
        # a client torch.optim.AdamW with ZeRO-Offload is refused unless this is false
        assert cfg["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_ds_json_parses_in_deepspeed_after_filling_autos(path):
    """The trainer's own filling (dist_secvec.distributed.ds_config), then DeepSpeed's parser."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    from dist_secvec.config import load_config
    from dist_secvec.distributed import ds_config as run_ds_config

    run = load_config(None, [f"deepspeed.config={path}", "model.dtype=bfloat16", "optim.micro_batch_size=4",
                             "optim.gradient_accumulation_steps=2"])
    cfg = run_ds_config(run, world_size=1)
    assert not list(autos(cfg))
    parsed = ds_config.DeepSpeedConfig(cfg)
    assert int(parsed.zero_optimization_stage) == json.loads(path.read_text())["zero_optimization"]["stage"]
    assert parsed.bfloat16_config.enabled and parsed.gradient_accumulation_steps == 2
    if cfg["zero_optimization"]["stage"] == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save


# ---------------------------------------------------------------------------------------------
# launch/estimate_memory.py


def test_llama2_parameter_counts(est):
    # published sizes of the meta-llama/Llama-2-*-hf checkpoints
    assert est.llama_params(**est.PRESETS["llama2-7b"])["total"] == 6_738_415_616
    assert est.llama_params(**est.PRESETS["llama2-13b"])["total"] == 13_015_864_320
    assert est.llama_params(**est.PRESETS["llama2-70b"])["total"] == 68_976_648_192
    assert est.llama_params(**est.PRESETS["llama2-7b"])["largest_layer"] == 32000 * 4096
    # peft prints "trainable params: 39,976,960" for r=16 on all linears of Llama-2-7B
    assert est.llama_lora_params(16, **est.PRESETS["llama2-7b"]) == 39_976_960


def test_estimator_script_prints_deepspeed_numbers():
    r = subprocess.run([sys.executable, str(ESTIMATOR), "--params", "6738415616", "--largest-layer", "131072000",
                        "--gpus-per-node", "8", "--nodes", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # hand computation of the cold estimate, no offload, zero_init: 4 B x largest layer (gather
    # buffer) + 18 B x params / GPUs
    per_gpu = (4 * 131_072_000 + 18 * 6_738_415_616 // 8) / GIB
    assert f"{per_gpu:6.2f}GB" == " 14.61GB"
    row = [ln for ln in r.stdout.splitlines() if ln.endswith("offload_param=none, offload_optimizer=none, zero_init=1")]
    assert len(row) == 1 and "|  14.61GB |" in row[0]
    assert "[2" not in r.stdout.split("\n")[0], "no DeepSpeed log line before the table"


def test_estimator_formula_matches_deepspeed(est):
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    for total, largest, gpn, nodes in ((6_738_415_616, 131_072_000, 8, 1), (68_976_648_192, 262_144_000, 8, 2),
                                       (13_015_864_320, 163_840_000, 2, 1), (10_000, 100, 3, 5)):
        for off in (True, False):
            for off_p in (True, False):
                for zi in (True, False):
                    kw = dict(total_params=total, largest_layer_params=largest, num_gpus_per_node=gpn,
                              num_nodes=nodes, cpu_offload=off, cpu_offload_params=off_p, zero_init=zi,
                              additional_buffer_factor=1.5)
                    assert est.cold_estimate(**kw) == stage3.estimate_zero3_model_states_mem_needs(**kw)[:2]


def test_estimator_qlora_numbers(est, capsys):
    assert est.main(["--model", "llama2-70b", "--gpus-per-node", "8", "--quant", "nf4", "--lora-rank", "16",
                     "--sv-rank", "8", "--formula-only"]) == 0
    out = capsys.readouterr().out
    # by hand: 4-bit base = quantized params x (0.5 + double-quant constants) + 16-bit embeddings,
    # lm_head and norms; vector 2 B/param; LoRA 16 B/param; all / 8 GPUs; + 4 B x largest layer
    total, embed = 68_976_648_192, 32000 * 8192
    unquant = 2 * embed + 80 * 2 * 8192 + 8192
    base = (total - unquant) * (0.5 + (8 / 64 + 32 / (64 * 256)) / 8) + unquant * 2
    lora, sv = 207_093_760, 103_546_880
    per_gpu = (base + 2 * sv + 16 * lora) / 8 + 4 * embed
    assert f"per GPU (steady state): {per_gpu / GIB:.2f} GiB" in out
    assert f"{per_gpu / GIB:.2f}" == "5.62"
    load_peak = (base + 2 * sv + 4 * embed) / GIB
    assert f"whole quantized model on every rank before partitioning): {load_peak:.2f} GiB" in out


@pytest.mark.parametrize("argv", [[], ["--params", "10"], ["--model", "llama2-7b", "--gpus-per-node", "0"],
                                  ["--params", "10", "--largest-layer", "1", "--lora-rank", "8"],
                                  ["--model", "gpt-5"], ["--quant", "int3"]])
def test_estimator_bad_args_exit_2(est, argv, capsys):
    with pytest.raises(SystemExit) as e:
        est.main(argv)
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# `dist-secvec recipes` and recipes run from outside the repository


def recipes_cli(capsys, *argv: str):
    from dist_secvec.cli import main

    rc = main(["recipes", *argv])
    return rc, capsys.readouterr()


def test_recipes_lists_every_shipped_recipe_with_its_first_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, cap = recipes_cli(capsys)
    assert rc == 0, cap.err
    for recipe in RECIPES + sorted((CONFIGS / "experiments").glob("*.yaml")):
        name = str(recipe.relative_to(CONFIGS).with_suffix(""))
        first = next(line for line in recipe.read_text().splitlines() if line.startswith("#")).lstrip("#").strip()
        assert any(line.split()[0] == name and line.endswith(first) for line in cap.out.splitlines() if line), name
    assert "demo/" not in cap.out  # the demo's stage settings are not recipes
    assert not list(tmp_path.iterdir())


def test_recipes_copy_writes_the_recipe_and_its_deepspeed_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, cap = recipes_cli(capsys, "copy", "llama2_13b_qlora_sv_2gpu")
    assert rc == 0, cap.err
    recipe = CONFIGS / "llama2_13b_qlora_sv_2gpu.yaml"
    assert (tmp_path / recipe.name).read_bytes() == recipe.read_bytes()
    assert (tmp_path / "configs" / "ds_zero3.json").read_bytes() == (CONFIGS / "ds_zero3.json").read_bytes()
    # into DEST, named with .yaml; a sweep
    rc, cap = recipes_cli(capsys, "copy", "llama2_7b_full_sv_zero3_8gpu.yaml", "mine")
    assert rc == 0, cap.err
    assert {str(p.relative_to(tmp_path / "mine")) for p in (tmp_path / "mine").rglob("*") if p.is_file()} == {
        "llama2_7b_full_sv_zero3_8gpu.yaml", "configs/ds_zero3.json", "configs/ds_zero3_offload.json"}
    rc, cap = recipes_cli(capsys, "copy", "experiments/stress_study", "sweeps")
    assert rc == 0 and (tmp_path / "sweeps" / "stress_study.yaml").is_file()
    assert "dist-secvec experiment --config" in cap.out
    # a second recipe naming the same JSON into the same directory: the identical JSON is left as it is
    rc, cap = recipes_cli(capsys, "copy", "llama2_70b_qlora_sv_8gpu")
    assert rc == 0, cap.err
    assert "configs/ds_zero3.json" not in cap.out


def test_recipes_copy_refuses_to_overwrite_in_one_line(tmp_path, monkeypatch, capsys):
    from conftest import tree_digest

    monkeypatch.chdir(tmp_path)
    assert recipes_cli(capsys, "copy", "llama2_13b_qlora_sv_2gpu")[0] == 0
    (tmp_path / "configs" / "ds_zero3.json").write_text('{"edited": true}\n')
    before = tree_digest(tmp_path)
    for argv in (["copy", "llama2_13b_qlora_sv_2gpu"], ["copy", "llama2_70b_qlora_sv_8gpu"]):
        rc, cap = recipes_cli(capsys, *argv)
        assert rc == 2
        (line,) = [ln for ln in cap.err.splitlines() if ln]
        assert line.startswith("dist-secvec recipes: error: ") and "already exist" in line, line
        assert "configs/ds_zero3.json" in line
        assert tree_digest(tmp_path) == before  # nothing written, not even the recipe that was free
    rc, cap = recipes_cli(capsys, "copy", "no_such_recipe")
    assert rc == 2 and "no recipe 'no_such_recipe'" in cap.err
    rc, cap = recipes_cli(capsys, "copy")
    assert rc == 2 and "expected NAME [DEST]" in cap.err


def test_deepspeed_config_resolves_next_to_the_recipe_then_in_the_package(tmp_path, monkeypatch, capsys):
    from dist_secvec.config import PACKAGE_CONFIGS, save_config

    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    assert recipes_cli(capsys, "copy", "llama2_13b_qlora_sv_2gpu", str(tmp_path / "mine"))[0] == 0
    copied = tmp_path / "mine" / "llama2_13b_qlora_sv_2gpu.yaml"

    (tmp_path / "p").mkdir()
    paths = path_overrides(CONFIGS / copied.name, tmp_path / "p")  # model, data, vector: dummies that exist

    def resolved(recipe, *extra):
        cfg = load_config(str(recipe) if recipe else None, paths + list(extra))
        return validate(cfg, "finetune").deepspeed.config

    # next to the recipe (the copy's configs/ds_zero3.json), as an absolute path
    assert resolved(copied) == str(tmp_path / "mine" / "configs" / "ds_zero3.json")
    # the shipped recipe run from outside the repository: the package's configs/
    assert resolved(CONFIGS / copied.name) == str(PACKAGE_CONFIGS / "ds_zero3.json")
    # no recipe: a bare name or configs/NAME finds the shipped file
    assert resolved(None, "deepspeed.config=ds_zero3_offload.json") == str(PACKAGE_CONFIGS / "ds_zero3_offload.json")
    # a file where the name points from the current directory comes first
    (work / "configs").mkdir()
    (work / "configs" / "ds_zero3.json").write_text('{"zero_optimization": {"stage": 3}}\n')
    assert resolved(copied) == str(work / "configs" / "ds_zero3.json")
    with pytest.raises(ConfigError, match="'deepspeed.config': DeepSpeed JSON 'configs/nope.json' not found"):
        resolved(copied, "deepspeed.config=configs/nope.json")
    # the run's config.yaml names the file it read
    cfg = validate(load_config(str(copied), paths), "finetune")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")).deepspeed.config == str(work / "configs" / "ds_zero3.json")


@pytest.mark.slow
def test_cpu_recipes_run_both_stages_on_a_small_model(tiny_world, tmp_path, monkeypatch):
    """The CPU pair as shipped, with the model and data paths pointed at the tiny world and the
    runs shortened: stage 1 writes the vector where the stage-2 recipe reads it."""
    from dist_secvec.cli import main

    monkeypatch.chdir(tmp_path)
    d = tiny_world.data
    common = [f"model.path={tiny_world.model_dir}", "logging.progress=false", "data.max_length=64"]
    assert main(["train-sv", "--config", str(CONFIGS / "smollm2_135m_train_sv_cpu.yaml"), *common,
                 f"security_vector.harmful_data={d['harmful_sv']}", f"security_vector.benign_data={d['kl_benign']}",
                 f"security_vector.heldout_benign_data={d['heldout_benign']}", "optim.max_steps=4",
                 "eval.judges=[demo]", "eval.max_new_tokens=8"]) == 0
    assert (tmp_path / "runs" / "smollm2_135m_sv" / "secvec" / "secvec.json").is_file()
    assert main(["finetune", "--config", str(CONFIGS / "smollm2_135m_lora_sv_cpu.yaml"), *common,
                 f"data.train={d['finetune_mixed']}", "data.max_samples=32", "optim.max_steps=2"]) == 0
    assert (tmp_path / "runs" / "smollm2_135m_lora_sv_cpu" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_wheel_runs_a_shipped_recipe_from_another_directory(tiny_world, random_vector, tmp_path):
    """The package as a user installs it: a wheel built from the repository, installed on its own,
    run from a directory that is not the repository: it lists and copies a shipped recipe, and
    `finetune` runs with the copy."""
    import os

    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("dist_secvec-*.whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")

    def run(*argv):
        return subprocess.run([sys.executable, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    r = run("-c", "import dist_secvec; print(dist_secvec.__file__)")
    assert r.stdout.strip().startswith(str(site)), r.stdout + r.stderr  # the wheel's files, not the repository's
    r = run("-m", "dist_secvec", "recipes")
    assert r.returncode == 0 and "smollm2_135m_lora_sv_cpu" in r.stdout, r.stderr[-2000:]
    r = run("-m", "dist_secvec", "recipes", "copy", "smollm2_135m_lora_sv_cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("-m", "dist_secvec", "finetune", "--config", "smollm2_135m_lora_sv_cpu.yaml",
            f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['finetune_mixed']}",
            f"security_vector.path={random_vector}", "security_vector.rank=4", "security_vector.alpha=8",
            "data.max_samples=16", "data.max_length=48", "optim.max_steps=2", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "runs" / "smollm2_135m_lora_sv_cpu" / "final" / "adapter_model.safetensors").is_file()
