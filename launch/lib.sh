# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): dry-run aware command execution,
# argument checks and shell quoting for commands that run on remote machines.

DRY_RUN=0
PIDS=()

die() {
  echo "error: $*" >&2
  exit 2
}

# Print a command, shell-quoted, as it would run.
show() {
  local line
  printf -v line ' %q' "$@"
  echo "+${line}"
}

# Run a command, or only print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    "$@"
  fi
}

# Start a command in the background (pid kept in PIDS), or only print it under --dry-run.
run_bg() {
  if ((DRY_RUN)); then
    show "$@"
  else
    "$@" &
    PIDS+=("$!")
  fi
}

# Wait for every run_bg command; fail if any of them failed.
wait_all() {
  local pid failed=0
  for pid in "${PIDS[@]}"; do
    wait "$pid" || failed=1
  done
  return "$failed"
}

# `need_value "$@"` inside an option loop: the option "$1" must be followed by a value.
need_value() {
  if (($# < 2)) || [[ "$2" == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

# One string that a remote shell splits back into exactly these arguments.
quote_args() {
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}
