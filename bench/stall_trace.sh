#!/usr/bin/env bash
# bench/stall_trace.sh: where the ep_model_stall_nccl2 drill hangs. Runs the drill of
# bench/device.sh (two GPU ranks under mpirun, EP rows and gradients over NCCL, the demo recipe;
# bench/kill_rank.sh sends rank 1 SIGSTOP after STOP_AFTER s, AUTOMOE_DIST_TIMEOUT=20) in the
# background; WAIT s after the SIGSTOP prints the stack of every thread of each automoe process
# that is not stopped (cuda-gdb -p PID -batch -ex "thread apply all bt"), then kills the job.
# A job that ends before that (the fix working) is reported with its exit code and log.
#   BUILD=build-device bash bench/stall_trace.sh      (needs $BUILD/automoe, mpirun, cuda-gdb)
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device} STOP_AFTER=${STOP_AFTER:-15} WAIT=${WAIT:-45}
out=$(mktemp -d /tmp/stall_trace.XXXXXX)
mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  -x NVSHMEM_DISABLE_NVLS=1 -x AUTOMOE_EP_TRANSPORT=nccl -x KILL_RANK_SIGNAL=STOP \
  -x AUTOMOE_DIST_TIMEOUT=20 bash bench/kill_rank.sh 1 "$STOP_AFTER" "$BUILD/automoe" \
  finetune examples/demo.yaml --train.device cuda --train.log_every 10 --train.checkpoint_every 0 \
  --train.steps 100000 --train.ep 2 --data.micro_batch 8 --output.dir "$out/run" >"$out/log" 2>&1 &
job=$!
ended() { ! kill -0 "$job" 2>/dev/null; }
ranks() {  # this job's automoe processes (kill_rank.sh's sleeper is a bash with the same arguments)
  for p in $(pgrep -f -- "--output.dir $out/run"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = automoe ] && echo "$p"
  done
}
report_end() {
  wait "$job"; echo "stall_trace: the job ended by itself (exit $?) after $1"; cat "$out/log"
  kill -KILL $(ranks) 2>/dev/null  # a stopped rank left behind
}
t0=$SECONDS
until grep -q "SIGSTOP to rank" "$out/log" 2>/dev/null; do  # kill_rank.sh's line
  ended && { report_end "$((SECONDS - t0)) s, before any SIGSTOP"; exit 1; }
  (( SECONDS - t0 > STOP_AFTER + 120 )) && { echo "stall_trace: no SIGSTOP line"; break; }
  sleep 1
done
stopped_at=$SECONDS
while (( SECONDS - stopped_at < WAIT )); do
  ended && { report_end "$((SECONDS - stopped_at)) s after the SIGSTOP"; exit 0; }
  sleep 1
done
echo "stall_trace: the job still runs ${WAIT} s after the SIGSTOP; its log ends:"
tail -n 20 "$out/log"
pids=($(ranks))
for p in "${pids[@]}"; do
  state=$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f1)
  echo "=== automoe pid $p: state $state"
  [ "$state" = T ] && continue  # the stopped rank
  timeout 180 cuda-gdb -p "$p" -batch -ex "thread apply all bt" 2>&1
done
kill -KILL "${pids[@]}" 2>/dev/null
kill "$job" 2>/dev/null
wait "$job" 2>/dev/null
echo "stall_trace: killed; the run's log and output are in $out"
