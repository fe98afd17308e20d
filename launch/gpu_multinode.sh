#!/usr/bin/env bash
# Multi-node GPU launcher for bpo_jax: one process per node, all running the same command, joined
# by jax.distributed through a coordinator (process 0's host:port). See launch/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/gpu_multinode.sh --config FILE [--set KEY=VALUE]... [--stage STAGE] [options]

Two ways to start N processes (one per node; each uses all GPUs of its node):

  on every node (e.g. `srun --ntasks-per-node=1 launch/gpu_multinode.sh --config ...`):
    --num-processes N     default: $SLURM_NTASKS
    --process-id I        default: $SLURM_PROCID
    --coordinator H:PORT  default: first host of $SLURM_JOB_NODELIST and --port (scontrol when
                          installed, else read from the hostlist: gpu[01-04],x -> gpu01)

  from one head node over ssh (a shared filesystem or the same checkout on every host):
    --hosts H0,H1,...     process i runs on host i; the coordinator is H0:PORT

options:
  --config FILE         bpo_jax config (required)
  --set KEY=VALUE       config override (repeatable)
  --stage STAGE         run only this stage
  --port PORT           coordinator port (default 12355)
  --python PY           Python interpreter (default python3)
  --workdir DIR         repository directory on the nodes (default: the current directory)
  --dry-run             print the commands instead of running them
  -h, --help            this help

Each process runs
  PY -m bpo_jax.main --config FILE --set distributed.enabled=true
     --set distributed.coordinator_address=H:PORT --set distributed.num_processes=N
     --set distributed.process_id=I [--set ...] [STAGE]
USAGE
}

config="" sets=() stage="" port=12355 python="python3" workdir="$PWD"
hosts="" num_processes="" process_id="" coordinator=""
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 && shift && continue ;;
    -h | --help) usage && exit 0 ;;
    --*) need_value "$@" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  case "$1" in
    --config) config="$2" ;;
    --set) sets+=("$2") ;;
    --stage) stage="$2" ;;
    --port) port="$2" ;;
    --python) python="$2" ;;
    --workdir) workdir="$2" ;;
    --hosts) hosts="$2" ;;
    --num-processes) num_processes="$2" ;;
    --process-id) process_id="$2" ;;
    --coordinator) coordinator="$2" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift 2
done
[[ -n "$config" ]] || die "--config FILE is required"

# The first host of a SLURM hostlist: scontrol's answer where SLURM's tools are installed, else
# read from the list itself (prefix + first number of a bracket + suffix), so that --dry-run and
# machines without scontrol work too.
first_host() {
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local re='^([^][,]*)\[([0-9]+)[^]]*\]([^][,]*)'
  if [[ "$1" =~ $re ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
  else
    echo "${1%%,*}"
  fi
}

# Set main_cmd: the command of process $3 of $2, coordinated by $1.
build_main() {
  main_cmd=("$python" -m bpo_jax.main --config "$config"
    --set distributed.enabled=true
    --set "distributed.coordinator_address=$1"
    --set "distributed.num_processes=$2"
    --set "distributed.process_id=$3")
  local item
  for item in "${sets[@]}"; do
    main_cmd+=(--set "$item")
  done
  [[ -z "$stage" ]] || main_cmd+=("$stage")
}

if [[ -n "$hosts" ]]; then
  [[ -z "$num_processes$process_id$coordinator" ]] ||
    die "--hosts sets the process count, ids and coordinator itself"
  IFS=, read -r -a host_list <<<"$hosts"
  for i in "${!host_list[@]}"; do
    build_main "${host_list[0]}:$port" "${#host_list[@]}" "$i"
    run_bg ssh -o BatchMode=yes "${host_list[$i]}" "cd $(quote_args "$workdir") && $(quote_args "${main_cmd[@]}")"
  done
  wait_all
  exit
fi

num_processes="${num_processes:-${SLURM_NTASKS:-}}"
process_id="${process_id:-${SLURM_PROCID:-}}"
[[ -n "$num_processes" ]] || die "--num-processes is required (or run under SLURM, or use --hosts)"
[[ -n "$process_id" ]] || die "--process-id is required (or run under SLURM, or use --hosts)"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$num_processes'"
if ! [[ "$process_id" =~ ^[0-9]+$ ]] || ((process_id >= num_processes)); then
  die "--process-id must be in [0, $num_processes), got '$process_id'"
fi
if [[ -z "$coordinator" ]]; then
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "--coordinator HOST:PORT is required outside SLURM"
  head_node="$(first_host "$SLURM_JOB_NODELIST")"
  [[ -n "$head_node" ]] || die "no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
  coordinator="$head_node:$port"
fi
build_main "$coordinator" "$num_processes" "$process_id"
run cd "$workdir"
run "${main_cmd[@]}"
