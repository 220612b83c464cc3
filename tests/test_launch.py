"""Launch scripts in launch/: syntax, argument handling, and the commands they would run.

Everything runs through DRY_RUN=1 (the scripts print the command instead of running it) with a fake
`scontrol` and a fake `nvidia-smi` on PATH, so the results do not depend on the machine. Two
`slow` tests start real CPU ranks of a probe module through the deepspeed and torchrun launchers.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
VENV_BIN = str(Path(sys.executable).parent)

FAKE_SCONTROL = """#!/bin/sh
# fake `scontrol show hostnames LIST`: expands the lists the tests use, logs its arguments
echo "$@" >> "$(dirname "$0")/scontrol.log"
[ "$1" = show ] && [ "$2" = hostnames ] || exit 1
case "$3" in
  "gpu[01-02]") printf 'gpu01\\ngpu02\\n' ;;
  "node[001-003,007]") printf 'node001\\nnode002\\nnode003\\nnode007\\n' ;;
  "cpu01") echo cpu01 ;;
  *) echo "scontrol: error: invalid hostlist $3" >&2; exit 1 ;;
esac
"""


def fake_nvidia_smi(n: int) -> str:
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(n))
    return f"#!/bin/sh\n[ \"$1\" = -L ] || exit 0\nprintf '{lines}'\n" if n else "#!/bin/sh\nexit 9\n"


@pytest.fixture
def fakebin(tmp_path):
    """A bin dir with a fake scontrol and a GPU-less nvidia-smi; tests may add a GPU one."""
    b = tmp_path / "bin"
    b.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("nvidia-smi", fake_nvidia_smi(0))):
        (b / name).write_text(text)
        (b / name).chmod(0o755)
    return b


def set_gpus(fakebin: Path, n: int) -> None:
    (fakebin / "nvidia-smi").write_text(fake_nvidia_smi(n))


def run(script: str, *args: str, fakebin: Path | None = None, env: dict | None = None, cwd: Path = REPO,
        timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "DRY_RUN", "LAUNCH_", "OMP_NUM_THREADS", "GPUS_PER_NODE",
                                 "MASTER_", "HOSTFILE_DIR", "REPO_DIR", "VENV", "DEEPSPEED", "TORCHRUN"))}
    path = [VENV_BIN, "/usr/bin", "/bin"]
    if fakebin is not None:
        path.insert(0, str(fakebin))
    base["PATH"] = os.pathsep.join(path)
    base.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)


def dry(script: str, *args: str, **kw) -> list[str]:
    env = {"DRY_RUN": "1", **kw.pop("env", {})}
    r = run(script, *args, env=env, **kw)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# all scripts


def test_expected_files_exist():
    for name in ("deepspeed.sh", "torchrun.sh", "make_hostfile.sh", "slurm.sbatch", "hostfile.example",
                 "estimate_memory.py"):
        assert (LAUNCH / name).is_file(), name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_strict_mode(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_help_exits_0(script):
    r = run(script, "-h")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


# ---------------------------------------------------------------------------------------------
# make_hostfile.sh


def test_make_hostfile_from_slurm_nodelist(fakebin):
    r = run("make_hostfile.sh", fakebin=fakebin,
            env={"SLURM_JOB_NODELIST": "node[001-003,007]", "SLURM_GPUS_ON_NODE": "4"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "node001 slots=4\nnode002 slots=4\nnode003 slots=4\nnode007 slots=4\n"
    assert (fakebin / "scontrol.log").read_text() == "show hostnames node[001-003,007]\n"


@pytest.mark.parametrize("gpus_env,slots", [
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2(x2)"}, 2),
    ({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, 3),
])
def test_make_hostfile_slots_from_environment(fakebin, gpus_env, slots):
    r = run("make_hostfile.sh", "-n", "gpu[01-02]", fakebin=fakebin, env=gpus_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"gpu01 slots={slots}\ngpu02 slots={slots}\n"


def test_make_hostfile_slots_from_nvidia_smi_and_output_file(fakebin, tmp_path):
    set_gpus(fakebin, 2)
    out = tmp_path / "hostfile"
    r = run("make_hostfile.sh", "-n", "gpu[01-02]", "-o", str(out), fakebin=fakebin)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert out.read_text() == "gpu01 slots=2\ngpu02 slots=2\n"


def test_make_hostfile_explicit_slots_win(fakebin):
    r = run("make_hostfile.sh", "-n", "cpu01", "-s", "6", fakebin=fakebin, env={"SLURM_GPUS_ON_NODE": "8"})
    assert (r.returncode, r.stdout) == (0, "cpu01 slots=6\n"), r.stderr


@pytest.mark.parametrize("args,env,msg", [
    ([], {"SLURM_GPUS_ON_NODE": "8"}, "no node list"),
    (["-n", "gpu[01-02]"], {}, "GPUs per node"),
    (["-n", "gpu[01-02]", "-s", "zero"], {}, "positive integer"),
    (["-n", "gpu[01-02]", "-s", "0"], {}, "positive integer"),
    (["-n"], {}, "needs a value"),
    (["--bogus"], {}, "unknown argument"),
    (["-n", "bad[list"], {"GPUS_PER_NODE": "8"}, "could not expand"),
])
def test_make_hostfile_bad_input_exits_2(fakebin, args, env, msg):
    r = run("make_hostfile.sh", *args, fakebin=fakebin, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr


def test_make_hostfile_without_scontrol(tmp_path):
    nobin = tmp_path / "empty"
    nobin.mkdir()
    (nobin / "nvidia-smi").write_text(fake_nvidia_smi(0))
    (nobin / "nvidia-smi").chmod(0o755)
    r = run("make_hostfile.sh", "-n", "a,b", "-s", "2", fakebin=nobin)
    assert (r.returncode, r.stdout) == (0, "a slots=2\nb slots=2\n"), r.stderr
    r = run("make_hostfile.sh", "-n", "gpu[01-02]", "-s", "2", fakebin=nobin)
    assert r.returncode == 2 and "scontrol not found" in r.stderr


# ---------------------------------------------------------------------------------------------
# deepspeed.sh


@pytest.mark.parametrize("args,msg", [
    ([], "no dist-secvec command"),
    (["--gpus", "2"], "no dist-secvec command"),
    (["--bogus", "--", "finetune"], "unknown option"),
    (["finetune", "--config", "x.yaml"], "unknown option 'finetune'"),
    (["--gpus"], "needs a value"),
    (["--gpus", "0", "--", "finetune"], "--gpus must be"),
    (["--gpus", "two", "--", "finetune"], "--gpus must be"),
    (["--nodes", "2", "--", "finetune"], "needs --hostfile"),
    (["--hostfile", "/nonexistent/hostfile", "--", "finetune"], "not found"),
    (["--master-port", "70000", "--", "finetune"], "port number"),
    (["--include", "localhost:0", "--gpus", "1", "--", "finetune"], "cannot be combined"),
    (["--launcher", "carrier-pigeon", "--", "finetune"], "--launcher must be"),
    (["--no-ssh", "--", "finetune"], "needs --hostfile"),
    (["--node-rank", "1", "--", "finetune"], "only used with --no-ssh"),
])
def test_deepspeed_sh_bad_args_exit_2(fakebin, args, msg):
    r = run("deepspeed.sh", *args, fakebin=fakebin)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr
    assert "--help" in r.stderr


def test_deepspeed_sh_cpu_ranks(fakebin):
    cmd = dry("deepspeed.sh", "--gpus", "2", "--", "finetune", "--config", "configs/a b.yaml", "optim.lr=1e-4",
              fakebin=fakebin)
    assert cmd == ["OMP_NUM_THREADS=1", "deepspeed", "--num_accelerators", "2", "--no_local_rank",
                   "--module", "dist_secvec",
                   "finetune", "--config", "configs/a b.yaml", "optim.lr=1e-4"]


def test_deepspeed_sh_cpu_default_one_rank_and_user_omp(fakebin):
    cmd = dry("deepspeed.sh", "--", "eval", "--config", "c.yaml", fakebin=fakebin, env={"OMP_NUM_THREADS": "3"})
    assert cmd == ["OMP_NUM_THREADS=3", "deepspeed", "--num_accelerators", "1", "--no_local_rank",
                   "--module", "dist_secvec",
                   "eval", "--config", "c.yaml"]


def test_deepspeed_sh_forced_cpu_on_gpu_node(fakebin):
    set_gpus(fakebin, 8)
    cmd = dry("deepspeed.sh", "--cpu", "--gpus", "2", "--", "demo", fakebin=fakebin)
    assert cmd[:3] == ["OMP_NUM_THREADS=1", "deepspeed", "--num_accelerators"]


def test_deepspeed_sh_gpu_node(fakebin):
    set_gpus(fakebin, 8)
    cmd = dry("deepspeed.sh", "--gpus", "8", "--", "finetune", "--config", "c.yaml", fakebin=fakebin)
    assert cmd == ["deepspeed", "--num_gpus", "8", "--no_local_rank", "--module", "dist_secvec",
                   "finetune", "--config", "c.yaml"]
    # no --gpus: the launcher takes every visible GPU
    cmd = dry("deepspeed.sh", "--", "demo", fakebin=fakebin)
    assert cmd == ["deepspeed", "--no_local_rank", "--module", "dist_secvec", "demo"]
    r = run("deepspeed.sh", "--gpus", "9", "--", "demo", fakebin=fakebin, env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "only 8 GPU(s)" in r.stderr


def test_deepspeed_sh_multinode_hostfile(fakebin, tmp_path):
    set_gpus(fakebin, 8)
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\n\nnode001 slots=8\nnode002 slots=8\n")
    cmd = dry("deepspeed.sh", "--hostfile", str(hf), "--nodes", "2", "--gpus", "8", "--master-port", "29600",
              "--", "finetune", "--config", "configs/llama2_70b_qlora_sv_2node.yaml", fakebin=fakebin)
    assert cmd == ["deepspeed", "--num_gpus", "8", "--num_nodes", "2", "--hostfile", str(hf),
                   "--master_addr", "node001", "--master_port", "29600", "--no_local_rank", "--module", "dist_secvec",
                   "finetune", "--config", "configs/llama2_70b_qlora_sv_2node.yaml"]
    # an explicit master address wins over the hostfile's first host
    cmd = dry("deepspeed.sh", "--hostfile", str(hf), "--master-addr", "10.0.0.5", "--launcher", "openmpi",
              "--", "finetune", fakebin=fakebin)
    assert cmd == ["deepspeed", "--hostfile", str(hf), "--master_addr", "10.0.0.5", "--launcher", "openmpi",
                   "--no_local_rank", "--module", "dist_secvec", "finetune"]


def test_deepspeed_sh_no_ssh_node_rank_from_slurm(fakebin, tmp_path):
    set_gpus(fakebin, 4)
    hf = tmp_path / "hostfile"
    hf.write_text("gpu01 slots=4\ngpu02 slots=4\n")
    cmd = dry("deepspeed.sh", "--hostfile", str(hf), "--nodes", "2", "--gpus", "4", "--no-ssh",
              "--", "finetune", fakebin=fakebin, env={"SLURM_NODEID": "1"})
    assert cmd == ["deepspeed", "--num_gpus", "4", "--num_nodes", "2", "--hostfile", str(hf),
                   "--master_addr", "gpu01", "--no_ssh", "--node_rank", "1", "--no_local_rank",
                   "--module", "dist_secvec", "finetune"]


def test_deepspeed_sh_uses_module_flag_that_deepspeed_has():
    """The wrapper relies on `deepspeed --module`, `--no_local_rank` and `--num_accelerators` (= --num_gpus)."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    args = runner.parse_args(["--num_accelerators", "2", "--no_local_rank", "--module", "dist_secvec",
                              "finetune", "--config", "x"])
    assert args.module and args.no_local_rank and args.num_gpus == 2 and args.user_script == "dist_secvec"
    assert args.user_args == ["finetune", "--config", "x"]


@pytest.mark.skipif(not (REPO / "dist_secvec" / "__main__.py").exists(), reason="no dist_secvec CLI yet")
def test_ranks_command_line_parses_in_dist_secvec(tmp_path):
    """Each rank runs `python -m dist_secvec <args after -->`: the CLI must take it as is."""
    r = subprocess.run([sys.executable, "-m", "dist_secvec", "finetune", "--config", str(tmp_path / "none.yaml"),
                        "optim.lr=1e-4"], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"})
    assert r.returncode == 2, r.stderr
    assert "unrecognized arguments" not in r.stderr and "none.yaml" in r.stderr


# ---------------------------------------------------------------------------------------------
# torchrun.sh


@pytest.mark.parametrize("args,msg", [
    ([], "no dist-secvec command"),
    (["--nproc-per-node", "0", "--", "demo"], "positive integer"),
    (["--nnodes", "2", "--", "demo"], "needs --rdzv"),
    (["--nnodes", "2", "--rdzv", "node001", "--", "demo"], "HOST:PORT"),
    (["--nnodes", "2", "--rdzv", "n:1", "--node-rank", "2", "--", "demo"], "--node-rank must be"),
    (["--frobnicate", "--", "demo"], "unknown option"),
])
def test_torchrun_sh_bad_args_exit_2(fakebin, args, msg):
    r = run("torchrun.sh", *args, fakebin=fakebin)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr


def test_torchrun_sh_single_node(fakebin):
    cmd = dry("torchrun.sh", "--nproc-per-node", "2", "--", "finetune", "--config", "c.yaml", fakebin=fakebin)
    assert cmd == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m", "dist_secvec",
                   "finetune", "--config", "c.yaml"]
    set_gpus(fakebin, 4)
    cmd = dry("torchrun.sh", "--", "demo", fakebin=fakebin)
    assert cmd[:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "4"]


def test_torchrun_sh_multinode(fakebin):
    cmd = dry("torchrun.sh", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv", "node001:29500", "--",
              "finetune", fakebin=fakebin, env={"SLURM_JOB_ID": "77", "SLURM_NODEID": "1"})
    assert cmd == ["torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "node001:29500", "--rdzv-id", "77", "--node-rank", "1",
                   "-m", "dist_secvec", "finetune"]


# ---------------------------------------------------------------------------------------------
# slurm.sbatch


def slurm_env(tmp_path, **extra):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO), "HOSTFILE_DIR": str(tmp_path / "hf")}
    env.update(extra)
    return env


def test_sbatch_header():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for key in ("--nodes=", "--gpus-per-node=", "--time=", "--ntasks-per-node=1"):
        assert f"#SBATCH {key}" in text


def test_sbatch_srun_per_node(fakebin, tmp_path):
    cmd = dry("slurm.sbatch", "finetune", "--config", "configs/llama2_70b_qlora_sv_2node.yaml",
              fakebin=fakebin, env=slurm_env(tmp_path), cwd=tmp_path)
    hf = tmp_path / "hf" / "hostfile.4242"
    assert hf.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"
    assert cmd == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                   "launch/deepspeed.sh", "--hostfile", str(hf), "--nodes", "2", "--gpus", "8",
                   "--master-addr", "gpu01", "--master-port", str(20000 + 4242), "--no-ssh",
                   "--", "finetune", "--config", "configs/llama2_70b_qlora_sv_2node.yaml"]
    # what each srun task then runs (node 1 of 2)
    set_gpus(fakebin, 8)
    per_node = dry("deepspeed.sh", *cmd[5:], fakebin=fakebin, env={"SLURM_NODEID": "1"})
    assert per_node == ["deepspeed", "--num_gpus", "8", "--num_nodes", "2", "--hostfile", str(hf),
                        "--master_addr", "gpu01", "--master_port", "24242", "--no_ssh", "--node_rank", "1",
                        "--no_local_rank", "--module", "dist_secvec",
                        "finetune", "--config", "configs/llama2_70b_qlora_sv_2node.yaml"]


def test_sbatch_pdsh_mode_and_port_override(fakebin, tmp_path):
    cmd = dry("slurm.sbatch", "--", "finetune", fakebin=fakebin,
              env=slurm_env(tmp_path, LAUNCH_MODE="pdsh", MASTER_PORT="29999"))
    assert cmd == ["launch/deepspeed.sh", "--hostfile", str(tmp_path / "hf" / "hostfile.4242"), "--nodes", "2",
                   "--gpus", "8", "--master-addr", "gpu01", "--master-port", "29999", "--", "finetune"]


def test_sbatch_single_node_needs_no_hostfile(fakebin, tmp_path):
    cmd = dry("slurm.sbatch", "finetune", fakebin=fakebin,
              env=slurm_env(tmp_path, SLURM_JOB_NODELIST="cpu01", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="7"))
    assert cmd == ["launch/deepspeed.sh", "--gpus", "8", "--master-port", "20007", "--", "finetune"]


@pytest.mark.parametrize("args,env,msg", [
    ([], {}, "no dist-secvec command"),
    (["finetune"], {"LAUNCH_MODE": "telnet"}, "LAUNCH_MODE"),
    (["finetune"], {"REPO_DIR": "/"}, "not the dist-secvec repository"),
])
def test_sbatch_bad_input_exits_2(fakebin, tmp_path, args, env, msg):
    r = run("slurm.sbatch", *args, fakebin=fakebin, env=slurm_env(tmp_path, **env))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr


# ---------------------------------------------------------------------------------------------
# hostfile.example


def test_hostfile_example_format():
    lines = [ln for ln in (LAUNCH / "hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == ["node001 slots=8", "node002 slots=8"]


# ---------------------------------------------------------------------------------------------
# real launches of a probe module on CPU ranks (no dist_secvec CLI needed)

PROBE = """import os, sys
line = " ".join(["PROBE", os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"],
                 str(os.environ.get("OMP_NUM_THREADS")), *sys.argv[1:]])
os.write(1, (line + "\\n").encode())  # one write: the ranks share the pipe (python -u)
"""


def probe_env(tmp_path) -> dict:
    pkg = tmp_path / "mods" / "secvec_probe"
    pkg.mkdir(parents=True)
    (pkg / "__main__.py").write_text(PROBE)
    return {"PYTHONPATH": str(tmp_path / "mods"), "LAUNCH_MODULE": "secvec_probe",
            "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed", path=VENV_BIN) is None, reason="deepspeed launcher not installed")
def test_deepspeed_sh_starts_two_cpu_ranks(fakebin, tmp_path):
    r = run("deepspeed.sh", "--cpu", "--gpus", "2", "--master-port", "29731", "--", "finetune", "--config", "x.yaml",
            fakebin=fakebin, env=probe_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    probes = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE"))
    # no --local_rank=N argument (it would land before the dist-secvec command): LOCAL_RANK env only
    assert probes == ["PROBE 0 0 2 1 finetune --config x.yaml", "PROBE 1 1 2 1 finetune --config x.yaml"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=VENV_BIN) is None, reason="torchrun not installed")
def test_torchrun_sh_starts_two_cpu_ranks(fakebin, tmp_path):
    r = run("torchrun.sh", "--nproc-per-node", "2", "--", "eval", "--config", "x.yaml",
            fakebin=fakebin, env=probe_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    probes = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("PROBE"))
    assert probes == ["PROBE 0 0 2 1 eval --config x.yaml", "PROBE 1 1 2 1 eval --config x.yaml"]


@pytest.mark.slow
def test_deepspeed_sh_runs_a_copied_recipe_from_another_directory(tiny_world, random_vector, tmp_path):
    """From a directory outside the repository: the script finds the package, and a recipe's
    relative deepspeed.config (configs/ds_zero3.json) resolves to the shipped JSON."""
    import yaml

    from conftest import launch_cli

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "run.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(tiny_world.model_dir)}, "data": {"train": [tiny_world.data["finetune_mixed"]],
                                                                 "max_samples": 16, "max_length": 48},
        "security_vector": {"path": str(random_vector)}, "deepspeed": {"config": "configs/ds_zero3.json"},
        "optim": {"max_steps": 2, "micro_batch_size": 4}, "output_dir": "ft", "logging": {"progress": False}}))
    launch_cli(["--gpus", "1", "--", "finetune", "--config", "run.yaml"], cwd=work)
    saved = yaml.safe_load((work / "ft" / "config.yaml").read_text())
    assert Path(saved["deepspeed"]["config"]) == REPO / "dist_secvec" / "configs" / "ds_zero3.json"
    assert (work / "ft" / "final").is_dir()
