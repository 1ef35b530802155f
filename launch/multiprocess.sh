#!/usr/bin/env bash
# Run a multi-process JAX job on this machine: N copies of a command that find each other
# through mmjax.runtime.distributed (a local stand-in for N hosts; CPU devices only).
#
#   bash launch/multiprocess.sh [--dry-run] N [DEVICES_PER_PROCESS] -- CMD [ARGS...]
#
#   N                    number of processes (>= 1)
#   DEVICES_PER_PROCESS  CPU devices each process gets (XLA's forced host platform
#                        device count); default 1, so the job has N * DEVICES_PER_PROCESS
#   CMD ARGS...          the command each process runs, as given; use the venv's
#                        interpreter, e.g. .venv/bin/python -m mmjax.train ...
#   --dry-run            print the N commands with their environment and exit 0
#
# Process i runs CMD with MMJAX_COORDINATOR=localhost:PORT (a free port),
# MMJAX_NUM_PROCESSES=N, MMJAX_PROCESS_ID=i, JAX_PLATFORMS=cpu and
# XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=DEVICES_PER_PROCESS".
# Every line a process prints is prefixed with [p<i>] (stdout and stderr kept apart).
# The launcher waits for all; when one fails it kills the others and exits with that
# first non-zero exit code (MMJAX_INIT_TIMEOUT bounds how long processes wait for each
# other at start-up). SIGINT (Ctrl-C) and SIGTERM are passed on to every process, and the
# launcher still waits: mmjax.train saves a checkpoint at a step all agree on and exits 0.
# Example (8 devices as 2 processes x 4):
#
#   bash launch/multiprocess.sh 2 4 -- .venv/bin/python -m mmjax.train \
#       --config configs/coca.py:size=tiny --workdir runs/tiny_2proc \
#       --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
set -euo pipefail

usage() {
  echo "usage: bash launch/multiprocess.sh [--dry-run] N [DEVICES_PER_PROCESS] -- CMD [ARGS...]" >&2
  exit 2
}

dry_run=0
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help)  # The header comment.
      awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) positional+=("$1"); shift ;;
  esac
done
[ $# -gt 0 ] || { echo "error: no command after --" >&2; usage; }
[ ${#positional[@]} -ge 1 ] && [ ${#positional[@]} -le 2 ] || usage
num="${positional[0]}"
per="${positional[1]:-1}"
for value in "$num" "$per"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: '$value' is not a positive integer (N, DEVICES_PER_PROCESS)" >&2
    usage
  fi
done

# A port that is free now (the kernel picks it); process 0 binds it moments later.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0))
print(s.getsockname()[1])')"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$per"

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < num; i++)); do
    printf 'MMJAX_COORDINATOR=localhost:%s MMJAX_NUM_PROCESSES=%s MMJAX_PROCESS_ID=%s ' \
      "$port" "$num" "$i"
    printf 'JAX_PLATFORMS=cpu XLA_FLAGS=%q' "$xla_flags"
    printf ' %q' "$@"
    echo
  done
  exit 0
fi

set -m  # Each process (and its prefixing pipes) in its own process group, to stop it whole.
pids=()
for ((i = 0; i < num; i++)); do
  (
    # A forwarded SIGINT/SIGTERM is for the command (mmjax.train saves and exits 0): this
    # shell waits for it, and the prefixers ignore the signal so its last lines get out.
    trap true INT TERM
    export MMJAX_COORDINATOR="localhost:$port" MMJAX_NUM_PROCESSES="$num" MMJAX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONUNBUFFERED=1
    "$@" 2> >(trap '' INT TERM; exec sed -u "s/^/[p$i] /" >&2) \
      | (trap '' INT TERM; exec sed -u "s/^/[p$i] /")
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
set +m

signal_all() {
  for pid in "${pids[@]}"; do
    kill "-$1" -- "-$pid" 2>/dev/null || true
  done
}
# Ctrl-C / SIGTERM (preemption) go to every process, and the job ends when they do: mmjax.train
# processes agree on a step, save it and exit 0. After a failure the rest cannot finish a
# collective save, so they are killed (the last committed checkpoint stays usable).
trap 'signal_all INT' INT
trap 'signal_all TERM' TERM

status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  still=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?  # bash keeps the status of a child it has reaped.
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      echo "[multiprocess] a process exited with code $code; stopping the others" >&2
      signal_all KILL
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  [ ${#remaining[@]} -eq 0 ] || sleep 0.2
done
exit "$status"
