#!/usr/bin/env bash
# Cloud TPU VM lifecycle for bpo_jax: create a TPU VM (or queued resource), set up every worker,
# run the same command on all workers, fetch logs from worker 0, delete. See launch/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu.sh COMMAND --name NAME [--zone ZONE] [--project PROJECT] [--dry-run] [options]

commands:
  create   create the TPU VM
             --accelerator-type TYPE   e.g. v5litepod-8, v5p-64 (required)
             --version RUNTIME         TPU software version (default from the type: v5litepod ->
                                       v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e,
                                       v4 -> tpu-ubuntu2204-base)
             --queued                  request a queued resource (waits for capacity) instead
             --spot                    Spot capacity (cheaper, can be preempted)
  setup    put bpo_jax on every worker: the code, uv (installed to ~/.local/bin if missing), a
           Python >= --python-version in REMOTE_DIR/.venv (TPU images ship 3.10; uv fetches one),
           then bpo_jax with jax[tpu] into it; safe to rerun (a good .venv is kept)
             --git URL [--ref REF]     clone URL and check out REF (default main) on each worker;
                                       without --git, this checkout is copied (no .git, .venv, runs)
             --copy SRC:DEST           also copy a local file/directory to DEST on every worker
                                       (repeatable; DEST, or a file's directory, is created and made
                                       writable by the login user first, with sudo where needed)
             --python-version V        Python for the venv (default 3.11, the lowest bpo_jax supports)
  run      run `python -m bpo_jax.main` on all workers at once; multi-host is the config's
           distributed.enabled (set it with --set distributed.enabled=true if the config does not)
             --config FILE             config path inside the repository on the workers (required)
             --set KEY=VALUE           config override (repeatable)
             --stage STAGE             run only this stage
             --detach                  start in the background (nohup) and return at once
           every worker writes its output to REMOTE_DIR/logs/bpo_jax-HOSTNAME.log
  logs     copy REMOTE_DIR/logs from worker 0 to --dest (default .)
             --run-dir DIR             also copy this run directory (relative to REMOTE_DIR unless
                                       absolute; it includes checkpoints, which can be large)
             --dest DIR
  delete   delete the TPU VM
             --queued                  delete the queued resource and its TPU VM

common options:
  --name NAME          TPU VM name (also the queued-resource id)
  --zone ZONE          e.g. us-west4-a; default: gcloud's configured compute/zone
  --project PROJECT    default: gcloud's configured project
  --remote-dir DIR     repository directory on the workers, relative to home (default bpo_jax)
  --python PY          run: Python interpreter on the workers (default .venv/bin/python, from setup)
  --dry-run            print the commands instead of running them
  -h, --help           this help
USAGE
}

default_runtime() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1'; pass --version" ;;
  esac
}

if (($# == 0)); then
  usage >&2
  exit 2
fi
command="$1"
shift
common="--name --zone --project --remote-dir --python --dry-run -h --help"
case "$command" in
  -h | --help) usage && exit 0 ;;
  create) allowed="--accelerator-type --version --queued --spot" ;;
  setup) allowed="--git --ref --copy --python-version" ;;
  run) allowed="--config --set --stage --detach" ;;
  logs) allowed="--run-dir --dest" ;;
  delete) allowed="--queued" ;;
  *) die "unknown command '$command' (create, setup, run, logs, delete; see --help)" ;;
esac

name="" zone="" project="" remote_dir="bpo_jax" python=".venv/bin/python"
accelerator="" version="" queued=0 spot=0
git_url="" git_ref="main" copies=() python_version="3.11"
config="" sets=() stage="" detach=0
run_dir="" dest="."
while (($#)); do
  [[ " $common $allowed " == *" $1 "* ]] || die "unknown option '$1' for '$command' (see --help)"
  case "$1" in
    --dry-run) DRY_RUN=1 && shift && continue ;;
    --queued) queued=1 && shift && continue ;;
    --spot) spot=1 && shift && continue ;;
    --detach) detach=1 && shift && continue ;;
    -h | --help) usage && exit 0 ;;
  esac
  need_value "$@"
  case "$1" in
    --name) name="$2" ;;
    --zone) zone="$2" ;;
    --project) project="$2" ;;
    --remote-dir) remote_dir="$2" ;;
    --python) python="$2" ;;
    --accelerator-type) accelerator="$2" ;;
    --version) version="$2" ;;
    --git) git_url="$2" ;;
    --ref) git_ref="$2" ;;
    --python-version)
      [[ "$2" =~ ^3\.[0-9]+$ ]] || die "--python-version needs MAJOR.MINOR (e.g. 3.11), got '$2'"
      python_version="$2"
      ;;
    --copy)
      [[ "$2" == *:* ]] || die "--copy needs SRC:DEST, got '$2'"
      [[ -e "${2%%:*}" ]] || die "--copy: no such local file or directory: ${2%%:*}"
      copies+=("$2")
      ;;
    --config) config="$2" ;;
    --set) sets+=("$2") ;;
    --stage) stage="$2" ;;
    --run-dir) run_dir="$2" ;;
    --dest) dest="$2" ;;
  esac
  shift 2
done
[[ -n "$name" ]] || die "$command needs --name NAME"

gcloud_flags=()
[[ -z "$zone" ]] || gcloud_flags+=("--zone=$zone")
[[ -z "$project" ]] || gcloud_flags+=("--project=$project")
dir="$(quote_args "$remote_dir")"

# Run one shell command line on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command "$1"
}

create() {
  [[ -n "$accelerator" ]] || die "create needs --accelerator-type (e.g. v5litepod-8, v5p-64)"
  [[ -n "$version" ]] || version="$(default_runtime "$accelerator")"
  local extra=()
  ((spot)) && extra+=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${gcloud_flags[@]}" "${extra[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" \
      --accelerator-type="$accelerator" --version="$version" "${gcloud_flags[@]}" "${extra[@]}"
  fi
}

setup() {
  if [[ -n "$git_url" ]]; then
    on_all_workers "$(quote_args test -d "$remote_dir/.git") || $(quote_args git clone --quiet "$git_url" "$remote_dir") \
&& $(quote_args git -C "$remote_dir" fetch --quiet origin "$git_ref") \
&& $(quote_args git -C "$remote_dir" checkout --quiet --detach FETCH_HEAD)"
  else
    local archive="${TMPDIR:-/tmp}/bpo_jax-src-$$.tar.gz"
    run tar -czf "$archive" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
      -C "$(cd "$here/.." && pwd)" .
    run gcloud compute tpus tpu-vm scp "$archive" "$name:bpo_jax-src.tar.gz" "${gcloud_flags[@]}" --worker=all
    on_all_workers "mkdir -p $dir && tar -xzf bpo_jax-src.tar.gz -C $dir && rm bpo_jax-src.tar.gz"
    run rm -f "$archive"
  fi
  local item
  for item in "${copies[@]}"; do
    copy_to_workers "${item%%:*}" "${item#*:}"
  done
  on_all_workers "$(install_command)"
}

# Copy a local file or directory's contents to DEST on every worker; reruns overwrite in place.
copy_to_workers() {
  local src="$1" dest="$2" target
  if [[ -d "$src" ]]; then
    target="$dest"
  else
    target="$(dirname "$dest")"
  fi
  # The login user cannot write outside home (e.g. /mnt) without sudo: create and hand it over.
  local q
  q="$(quote_args "$target")"
  on_all_workers "{ mkdir -p $q 2>/dev/null || sudo mkdir -p $q; } && { test -w $q || sudo chown \"\$(id -u):\$(id -g)\" $q; }"
  if [[ -d "$src" ]]; then
    local contents=("$src"/*)
    [[ -e "${contents[0]}" ]] || die "--copy: $src is empty"
    run gcloud compute tpus tpu-vm scp --recurse "${contents[@]}" "$name:$dest/" "${gcloud_flags[@]}" --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$src" "$name:$dest" "${gcloud_flags[@]}" --worker=all
  fi
}

# The worker-side install: uv if missing, a venv with Python >= python_version unless one is
# there already, then bpo_jax and jax[tpu] (libtpu comes from PyPI). Every step is a no-op or an
# in-place update when it has run before.
install_command() {
  local want="(${python_version/./, })" uv_installer="https://astral.sh/uv/install.sh"
  echo "export PATH=\"\$HOME/.local/bin:\$PATH\" && cd $dir" \
    "&& { command -v uv >/dev/null || curl -LsSf $uv_installer | sh; }" \
    "&& { .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] < $want)' 2>/dev/null" \
    "|| uv venv --clear --python $python_version .venv; }" \
    "&& uv pip install --quiet --python .venv/bin/python -e . $(quote_args 'jax[tpu]')"
}

run_main() {
  [[ -n "$config" ]] || die "run needs --config FILE (a path inside the repository on the workers)"
  local main=("$python" -m bpo_jax.main --config "$config") item
  for item in "${sets[@]}"; do
    main+=(--set "$item")
  done
  [[ -z "$stage" ]] || main+=("$stage")
  # Expanded by each worker's shell, not here: one log file per host.
  # shellcheck disable=SC2016
  local log='logs/bpo_jax-$(hostname).log'
  if ((detach)); then
    on_all_workers "cd $dir && mkdir -p logs && nohup $(quote_args "${main[@]}") > $log 2>&1 < /dev/null &"
  else
    on_all_workers "cd $dir && mkdir -p logs && set -o pipefail && $(quote_args "${main[@]}") 2>&1 | tee $log"
  fi
}

logs() {
  run mkdir -p "$dest"
  run gcloud compute tpus tpu-vm scp --recurse "$name:$remote_dir/logs" "$dest" "${gcloud_flags[@]}" --worker=0
  if [[ -n "$run_dir" ]]; then
    local path="$run_dir"
    [[ "$path" == /* ]] || path="$remote_dir/$run_dir"
    run gcloud compute tpus tpu-vm scp --recurse "$name:$path" "$dest" "${gcloud_flags[@]}" --worker=0
  fi
}

delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" --force --quiet "${gcloud_flags[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$name" --quiet "${gcloud_flags[@]}"
  fi
}

case "$command" in
  create) create ;;
  setup) setup ;;
  run) run_main ;;
  logs) logs ;;
  delete) delete ;;
esac
