#!/usr/bin/env bash
# Start dist-secvec under torchrun (torch.distributed.run): one rank per GPU (or CPU rank).
#
#   launch/torchrun.sh [options] -- <dist-secvec command and arguments>
#   launch/torchrun.sh --nproc-per-node 8 -- finetune --config configs/llama2_7b_full_sv_zero3_8gpu.yaml
#
# Runs `torchrun <options> -m dist_secvec <args>`. torchrun passes no --local_rank argument: each
# rank reads RANK, LOCAL_RANK and WORLD_SIZE from the environment. The DeepSpeed settings come
# from the recipe as with launch/deepspeed.sh. Multi-node: run this once per node (e.g. from
# srun) with the same --nnodes, --rdzv and --rdzv-id.
#
# Environment: DRY_RUN=1 prints the command instead of running it; TORCHRUN=<cmd> replaces the
# `torchrun` executable; LAUNCH_MODULE=<module> replaces dist_secvec (tests).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/torchrun.sh [options] -- <dist-secvec command> [args...]

Start dist-secvec with torchrun (`torchrun ... -m dist_secvec ...`).

options:
  --nproc-per-node N  ranks on this node (default: GPUs listed by nvidia-smi, else 1).
  --nnodes N          number of nodes (default 1; > 1 needs --rdzv).
  --node-rank R       this node's rank (optional with the c10d rendezvous; default $SLURM_NODEID
                      when set and --nnodes > 1).
  --rdzv HOST:PORT    rendezvous endpoint on the first node (c10d backend).
  --rdzv-id ID        job id shared by all nodes (default: $SLURM_JOB_ID, else dist-secvec).
  -h, --help          show this help.

Everything after `--` goes to dist-secvec, e.g.:
  launch/torchrun.sh --nproc-per-node 8 -- finetune --config configs/llama2_7b_full_sv_zero3_8gpu.yaml
  launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv node001:29500 \
      -- finetune --config configs/llama2_70b_qlora_sv_2node.yaml        # on each node

Environment: DRY_RUN=1 prints the command and exits; TORCHRUN=cmd replaces `torchrun`;
LAUNCH_MODULE=name runs another module than dist_secvec (for tests).
EOF
}

die() {  # one line on stderr, exit code 2 (bad input)
    echo "launch/torchrun.sh: $* (see launch/torchrun.sh --help)" >&2
    exit 2
}

need_value() { [[ $2 -ge 2 ]] || die "option $1 needs a value"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

NPROC="" NNODES="" NODE_RANK="" RDZV="" RDZV_ID=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --nproc-per-node|--nproc_per_node) need_value "$1" $#; NPROC=$2; shift 2 ;;
        --nproc-per-node=*|--nproc_per_node=*) NPROC=${1#*=}; shift ;;
        --nnodes) need_value "$1" $#; NNODES=$2; shift 2 ;;
        --nnodes=*) NNODES=${1#*=}; shift ;;
        --node-rank|--node_rank) need_value "$1" $#; NODE_RANK=$2; shift 2 ;;
        --node-rank=*|--node_rank=*) NODE_RANK=${1#*=}; shift ;;
        --rdzv|--rdzv-endpoint) need_value "$1" $#; RDZV=$2; shift 2 ;;
        --rdzv=*|--rdzv-endpoint=*) RDZV=${1#*=}; shift ;;
        --rdzv-id) need_value "$1" $#; RDZV_ID=$2; shift 2 ;;
        --rdzv-id=*) RDZV_ID=${1#*=}; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1' (dist-secvec arguments go after '--')" ;;
    esac
done

[[ $# -gt 0 ]] || die "no dist-secvec command given after '--' (e.g. -- finetune --config FILE)"
if [[ -n $NPROC ]]; then is_uint "$NPROC" && [[ $NPROC -ge 1 ]] || die "--nproc-per-node must be a positive integer, got '$NPROC'"; fi
NNODES=${NNODES:-1}
is_uint "$NNODES" && [[ $NNODES -ge 1 ]] || die "--nnodes must be a positive integer, got '$NNODES'"
if [[ -n $RDZV && ! $RDZV =~ ^[^:]+:[0-9]+$ ]]; then die "--rdzv must be HOST:PORT, got '$RDZV'"; fi
if [[ $NNODES -gt 1 && -z $RDZV ]]; then die "--nnodes $NNODES needs --rdzv HOST:PORT (the first node)"; fi
if [[ $NNODES -gt 1 && -z $NODE_RANK && -n ${SLURM_NODEID:-} ]]; then NODE_RANK=$SLURM_NODEID; fi
if [[ -n $NODE_RANK ]]; then
    is_uint "$NODE_RANK" && [[ $NODE_RANK -lt $NNODES ]] \
        || die "--node-rank must be an integer in [0, $NNODES), got '$NODE_RANK'"
fi

if [[ -z $NPROC ]]; then
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true); fi
    [[ $NPROC -gt 0 ]] || NPROC=1
fi

ARGS=(--nnodes "$NNODES" --nproc-per-node "$NPROC")
if [[ -n $RDZV ]]; then
    ARGS+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-dist-secvec}}")
    [[ -n $NODE_RANK ]] && ARGS+=(--node-rank "$NODE_RANK")
else
    ARGS=(--standalone "${ARGS[@]}")
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"
CMD=("${TORCHRUN_CMD[@]}" "${ARGS[@]}" -m "${LAUNCH_MODULE:-dist_secvec}" "$@")

if [[ ${DRY_RUN:-0} != 0 ]]; then
    printf '%q ' "${CMD[@]}" | sed 's/ $//'
    echo
    exit 0
fi
if ! command -v "${TORCHRUN_CMD[0]}" >/dev/null 2>&1; then
    echo "launch/torchrun.sh: '${TORCHRUN_CMD[0]}' not found: activate the environment that has torch" >&2
    exit 127
fi
exec "${CMD[@]}"
