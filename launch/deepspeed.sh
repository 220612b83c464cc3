#!/usr/bin/env bash
# Start dist-secvec under the DeepSpeed launcher: one rank per GPU (or CPU rank) on each node.
#
#   launch/deepspeed.sh [options] -- <dist-secvec command and arguments>
#   launch/deepspeed.sh --gpus 8 -- finetune --config configs/llama2_7b_full_sv_zero3_8gpu.yaml
#
# Runs `deepspeed <launcher options> --no_local_rank --module dist_secvec <args>`; each rank runs
# `python -u -m dist_secvec <args>` with RANK, LOCAL_RANK and WORLD_SIZE in its environment.
# It runs from any directory: a recipe's relative deepspeed.config (configs/ds_zero3.json) is
# looked up in the current directory, beside the recipe, then among the package's own JSONs.
#
# Environment: DRY_RUN=1 prints the command instead of running it; DEEPSPEED=<cmd> replaces the
# `deepspeed` executable; LAUNCH_MODULE=<module> replaces dist_secvec (tests); OMP_NUM_THREADS
# is kept when set, else 1 on CPU-only nodes.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/deepspeed.sh [options] -- <dist-secvec command> [args...]

Start dist-secvec with the DeepSpeed launcher (`deepspeed --module dist_secvec ...`).

options:
  --gpus N           ranks per node (GPUs; CPU ranks on a machine without GPU).
                     Default: the hostfile's slots, else all GPUs that nvidia-smi lists,
                     else 1 CPU rank.
  --nodes N          number of nodes to use from the hostfile (the first N hosts).
  --hostfile FILE    DeepSpeed hostfile ("host slots=N" per line) for multi-node runs.
  --master-addr A    address of the rank-0 node (default: first host of the hostfile).
  --master-port P    rendezvous port (default: 29500).
  --include SPEC     DeepSpeed --include, e.g. "localhost:0,1" (not with --gpus/--nodes).
  --launcher NAME    multi-node backend of the deepspeed runner: pdsh (default, needs ssh),
                     openmpi, mvapich, slurm, mpich, impi.
  --no-ssh           start only this node's ranks (run the script once per node, e.g. from srun);
                     needs --hostfile and --master-addr; node rank from --node-rank or $SLURM_NODEID.
  --node-rank R      this node's index in the hostfile (with --no-ssh).
  --cpu              force CPU ranks (OMP_NUM_THREADS=1, --num_accelerators) even if a GPU is seen.
  -h, --help         show this help.

Everything after `--` goes to dist-secvec, e.g.:
  launch/deepspeed.sh --gpus 8 -- finetune --config configs/llama2_7b_full_sv_zero3_8gpu.yaml
  launch/deepspeed.sh --hostfile launch/hostfile --nodes 2 --gpus 8 --master-addr node001 \
      -- finetune --config configs/llama2_70b_qlora_sv_2node.yaml
  launch/deepspeed.sh --gpus 2 --cpu -- finetune --config my.yaml   # 2 CPU ranks, no GPU

Environment: DRY_RUN=1 prints the command and exits; DEEPSPEED=cmd replaces `deepspeed`;
LAUNCH_MODULE=name runs another module than dist_secvec (for tests).
EOF
}

die() {  # one line on stderr, exit code 2 (bad input)
    echo "launch/deepspeed.sh: $* (see launch/deepspeed.sh --help)" >&2
    exit 2
}

need_value() {  # option, remaining argument count
    [[ $2 -ge 2 ]] || die "option $1 needs a value"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

GPUS="" NODES="" HOSTFILE="" MASTER_ADDR_OPT="" MASTER_PORT_OPT="" INCLUDE="" LAUNCHER="" NO_SSH=0
NODE_RANK="" FORCE_CPU=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --gpus|--num-gpus) need_value "$1" $#; GPUS=$2; shift 2 ;;
        --gpus=*|--num-gpus=*) GPUS=${1#*=}; shift ;;
        --nodes) need_value "$1" $#; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        --hostfile) need_value "$1" $#; HOSTFILE=$2; shift 2 ;;
        --hostfile=*) HOSTFILE=${1#*=}; shift ;;
        --master-addr) need_value "$1" $#; MASTER_ADDR_OPT=$2; shift 2 ;;
        --master-addr=*) MASTER_ADDR_OPT=${1#*=}; shift ;;
        --master-port) need_value "$1" $#; MASTER_PORT_OPT=$2; shift 2 ;;
        --master-port=*) MASTER_PORT_OPT=${1#*=}; shift ;;
        --include) need_value "$1" $#; INCLUDE=$2; shift 2 ;;
        --include=*) INCLUDE=${1#*=}; shift ;;
        --launcher) need_value "$1" $#; LAUNCHER=$2; shift 2 ;;
        --launcher=*) LAUNCHER=${1#*=}; shift ;;
        --node-rank) need_value "$1" $#; NODE_RANK=$2; shift 2 ;;
        --node-rank=*) NODE_RANK=${1#*=}; shift ;;
        --no-ssh) NO_SSH=1; shift ;;
        --cpu) FORCE_CPU=1; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1' (dist-secvec arguments go after '--')" ;;
    esac
done

[[ $# -gt 0 ]] || die "no dist-secvec command given after '--' (e.g. -- finetune --config FILE)"
if [[ -n $GPUS ]]; then is_uint "$GPUS" && [[ $GPUS -ge 1 ]] || die "--gpus must be a positive integer, got '$GPUS'"; fi
if [[ -n $NODES ]]; then is_uint "$NODES" && [[ $NODES -ge 1 ]] || die "--nodes must be a positive integer, got '$NODES'"; fi
if [[ -n $MASTER_PORT_OPT ]]; then
    is_uint "$MASTER_PORT_OPT" && [[ $MASTER_PORT_OPT -ge 1 && $MASTER_PORT_OPT -le 65535 ]] \
        || die "--master-port must be a port number, got '$MASTER_PORT_OPT'"
fi
if [[ -n $HOSTFILE ]]; then
    [[ -f $HOSTFILE ]] || die "hostfile '$HOSTFILE' not found: pass an existing file (launch/hostfile.example shows the format)"
    [[ -r $HOSTFILE ]] || die "hostfile '$HOSTFILE' is not readable: check its permissions"
    # every line but comments and blanks: "<host> slots=<N>" (what the deepspeed runner accepts)
    # (and no host twice, which the runner refuses too)
    BAD_LINE=$(awk '{line = $0; sub(/#.*/, "")}
                    NF && !(NF == 2 && $2 ~ /^slots=[1-9][0-9]*$/) {printf "%d: %s", NR, line; exit}
                    NF && seen[$1]++ {printf "%d: %s (host listed twice)", NR, line; exit}' "$HOSTFILE" | tr -d '\r')
    [[ -z $BAD_LINE ]] || die "hostfile '$HOSTFILE' line ${BAD_LINE%%:*} is malformed ('${BAD_LINE#*: }'); each line must be '<host> slots=<N>' with N >= 1, one line per host"
fi
if [[ -n $INCLUDE && ( -n $GPUS || -n $NODES ) ]]; then die "--include cannot be combined with --gpus/--nodes"; fi
if [[ -n $NODES && $NODES -gt 1 && -z $HOSTFILE ]]; then die "--nodes $NODES needs --hostfile"; fi
case "$LAUNCHER" in
    ""|pdsh|openmpi|mvapich|slurm|mpich|impi) ;;
    *) die "--launcher must be one of pdsh, openmpi, mvapich, slurm, mpich, impi; got '$LAUNCHER'" ;;
esac
if [[ $NO_SSH -eq 1 ]]; then
    [[ -n $HOSTFILE ]] || die "--no-ssh needs --hostfile"
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    [[ -n $NODE_RANK ]] || die "--no-ssh needs --node-rank (or \$SLURM_NODEID)"
fi
if [[ -n $NODE_RANK ]]; then
    is_uint "$NODE_RANK" || die "--node-rank must be a non-negative integer, got '$NODE_RANK'"
    [[ $NO_SSH -eq 1 ]] || die "--node-rank is only used with --no-ssh"
fi

# The hostfile's first host is rank 0 unless told otherwise (the runner would ask it over ssh).
if [[ -z $MASTER_ADDR_OPT && -n $HOSTFILE ]]; then
    MASTER_ADDR_OPT=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
    [[ -n $MASTER_ADDR_OPT ]] || die "hostfile '$HOSTFILE' names no host"
fi

# GPU or CPU ranks
count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}
if [[ $FORCE_CPU -eq 1 ]]; then NGPU_SEEN=0; else NGPU_SEEN=$(count_gpus); fi

ENV_ASSIGN=()
DS_ARGS=()
if [[ $NGPU_SEEN -gt 0 ]]; then
    [[ -z $GPUS || $GPUS -le $NGPU_SEEN || -n $HOSTFILE ]] \
        || die "--gpus $GPUS but only $NGPU_SEEN GPU(s) visible on this node"
    [[ -n $GPUS ]] && DS_ARGS+=(--num_gpus "$GPUS")
else
    # CPU ranks: the deepspeed runner finds no device, so say how many ranks to start;
    # one OpenMP thread per rank, or N ranks x all cores run many times slower
    # (their OpenMP threads spin against each other).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ENV_ASSIGN+=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
    # (with a hostfile its slots decide unless --gpus is given)
    if [[ -n $GPUS ]]; then
        DS_ARGS+=(--num_accelerators "$GPUS")
    elif [[ -z $INCLUDE && -z $HOSTFILE ]]; then
        DS_ARGS+=(--num_accelerators 1)
    fi
fi
[[ -n $NODES ]] && DS_ARGS+=(--num_nodes "$NODES")
[[ -n $HOSTFILE ]] && DS_ARGS+=(--hostfile "$HOSTFILE")
[[ -n $INCLUDE ]] && DS_ARGS+=(--include "$INCLUDE")
[[ -n $MASTER_ADDR_OPT ]] && DS_ARGS+=(--master_addr "$MASTER_ADDR_OPT")
[[ -n $MASTER_PORT_OPT ]] && DS_ARGS+=(--master_port "$MASTER_PORT_OPT")
[[ -n $LAUNCHER ]] && DS_ARGS+=(--launcher "$LAUNCHER")
[[ $NO_SSH -eq 1 ]] && DS_ARGS+=(--no_ssh --node_rank "$NODE_RANK")
# The launcher would insert --local_rank=N right after the module name, before the dist-secvec
# command; each rank reads LOCAL_RANK (and RANK, WORLD_SIZE) from the environment instead.
DS_ARGS+=(--no_local_rank)

# dist_secvec importable without `pip install -e .`: the repository root goes on PYTHONPATH.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

read -r -a DEEPSPEED_CMD <<< "${DEEPSPEED:-deepspeed}"
CMD=("${DEEPSPEED_CMD[@]}" "${DS_ARGS[@]}" --module "${LAUNCH_MODULE:-dist_secvec}" "$@")

if [[ ${DRY_RUN:-0} != 0 ]]; then
    printf '%s' "${ENV_ASSIGN[@]/%/ }"
    printf '%q ' "${CMD[@]}" | sed 's/ $//'
    echo
    exit 0
fi
if ! command -v "${DEEPSPEED_CMD[0]}" >/dev/null 2>&1; then
    echo "launch/deepspeed.sh: '${DEEPSPEED_CMD[0]}' not found: activate the environment that has deepspeed" >&2
    exit 127
fi
exec "${CMD[@]}"
