#!/usr/bin/env bash
# tools/launch_local.sh: starts N local copies of a command the way torchrun does (RANK,
# WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), without Python: the tests
# use it for automoe's TCP backend, and it is a stand-in for `torchrun --no-python` on one host.
#   bash tools/launch_local.sh N program [args...]
# MASTER_PORT defaults to a random port in 20000-31999, below the kernel's ephemeral ports (set
# it to choose). Waits for every rank; when one exits non-zero the others get SIGTERM (and
# SIGCONT, should one be stopped), SIGKILL 5 s later, and the script exits with that rank's
# status. SIGTERM/SIGINT to the script stop every rank too. LAUNCH_LOCAL_KEEP=1 leaves the others
# running (tests: the survivors must end on their own, as when a launcher does not stop them).
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: launch_local.sh N program [args...]" >&2; exit 2; }
n=$1
shift
export WORLD_SIZE=$n LOCAL_WORLD_SIZE=$n
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-$((20000 + RANDOM % 12000))}
pids=()

stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null
  kill -CONT "${pids[@]}" 2>/dev/null
  for _ in $(seq 50); do
    [ -z "$(jobs -rp)" ] && return
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null
}
trap 'stop_all; exit 143' TERM INT

for ((r = 0; r < n; r++)); do
  RANK=$r LOCAL_RANK=$r "$@" &
  pids+=($!)
done
rc=0
for ((i = 0; i < n; i++)); do
  wait -n
  s=$?
  if [ "$s" -ne 0 ]; then
    [ "$rc" -ne 0 ] || rc=$s
    [ "${LAUNCH_LOCAL_KEEP:-0}" = 1 ] && continue
    echo "launch_local.sh: a rank exited with status $s; stopping the others" >&2
    stop_all
    break
  fi
done
wait
exit $rc
