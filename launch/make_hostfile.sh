#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N", one line per node) for a Slurm allocation.
#
#   launch/make_hostfile.sh [-n NODELIST] [-s SLOTS] [-o FILE]
#
# NODELIST defaults to $SLURM_JOB_NODELIST and is expanded with `scontrol show hostnames`
# (node[001-003,007] -> node001 node002 node003 node007). SLOTS (ranks per node) defaults to
# $GPUS_PER_NODE, then $SLURM_GPUS_ON_NODE, then $SLURM_GPUS_PER_NODE ("8" or "h100:8"),
# then the GPUs nvidia-smi lists. The first line's host is the natural master address:
#   awk 'NR==1 {print $1}' hostfile
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/make_hostfile.sh [-n NODELIST] [-s SLOTS] [-o FILE]

Write a DeepSpeed hostfile ("host slots=N" per node) for a Slurm node list.

  -n NODELIST   Slurm node list (default: $SLURM_JOB_NODELIST), expanded by `scontrol show hostnames`
  -s SLOTS      ranks (GPUs) per node (default: $GPUS_PER_NODE, $SLURM_GPUS_ON_NODE,
                $SLURM_GPUS_PER_NODE, or the GPUs nvidia-smi lists)
  -o FILE       write to FILE instead of standard output
  -h            show this help
EOF
}

die() {  # one line on stderr, exit code 2 (bad input)
    echo "launch/make_hostfile.sh: $* (see launch/make_hostfile.sh -h)" >&2
    exit 2
}

NODELIST=${SLURM_JOB_NODELIST:-}
SLOTS=""
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--nodelist) [[ $# -ge 2 ]] || die "option $1 needs a value"; NODELIST=$2; shift 2 ;;
        -s|--slots) [[ $# -ge 2 ]] || die "option $1 needs a value"; SLOTS=$2; shift 2 ;;
        -o|--output) [[ $# -ge 2 ]] || die "option $1 needs a value"; OUT=$2; shift 2 ;;
        *) die "unknown argument '$1'" ;;
    esac
done

[[ -n $NODELIST ]] || die "no node list: pass -n NODELIST or run inside a Slurm allocation (\$SLURM_JOB_NODELIST)"

if [[ -z $SLOTS ]]; then
    for v in "${GPUS_PER_NODE:-}" "${SLURM_GPUS_ON_NODE:-}" "${SLURM_GPUS_PER_NODE:-}"; do
        v=${v%%(*}          # "8(x2)" -> "8"
        v=${v##*:}          # "h100:8" -> "8"
        if [[ $v =~ ^[0-9]+$ && $v -gt 0 ]]; then SLOTS=$v; break; fi
    done
fi
if [[ -z $SLOTS ]] && command -v nvidia-smi >/dev/null 2>&1; then
    SLOTS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    [[ $SLOTS -gt 0 ]] || SLOTS=""
fi
[[ -n $SLOTS ]] || die "cannot tell the GPUs per node: pass -s SLOTS or set GPUS_PER_NODE"
[[ $SLOTS =~ ^[0-9]+$ && $SLOTS -gt 0 ]] || die "slots must be a positive integer, got '$SLOTS'"

if command -v scontrol >/dev/null 2>&1; then
    HOSTS=$(scontrol show hostnames "$NODELIST") || die "scontrol could not expand node list '$NODELIST'"
elif [[ $NODELIST != *[\[\]]* ]]; then
    HOSTS=$(tr ',' '\n' <<< "$NODELIST")  # plain "a,b,c" needs no scontrol
else
    die "scontrol not found: cannot expand node list '$NODELIST'"
fi

LINES=$(awk -v s="$SLOTS" 'NF {print $1 " slots=" s}' <<< "$HOSTS")
[[ -n $LINES ]] || die "node list '$NODELIST' expanded to no hosts"
if [[ -n $OUT ]]; then
    OUT_DIR=$(dirname -- "$OUT")
    [[ -d $OUT_DIR ]] || die "cannot write '$OUT': directory '$OUT_DIR' does not exist"
    [[ ! -d $OUT ]] || die "cannot write '$OUT': it is a directory; name a file"
    # a temporary file renamed into place: a failed write (disk full) leaves any old hostfile intact
    TMP_OUT=$(mktemp "$OUT_DIR/.hostfile.XXXXXX" 2>/dev/null) || die "cannot write to directory '$OUT_DIR' (permissions?)"
    if ! printf '%s\n' "$LINES" > "$TMP_OUT" 2>/dev/null || ! mv -f -- "$TMP_OUT" "$OUT" 2>/dev/null; then
        rm -f -- "$TMP_OUT"
        die "cannot write '$OUT' (disk full or no permission); nothing was changed"
    fi
else
    printf '%s\n' "$LINES"
fi
