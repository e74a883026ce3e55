#!/usr/bin/env bash
# bench/gpu2_checks.sh: issue 4's two-GPU checks on a machine with >= 2 GPUs (GPUs 0 and 1),
# after bench/device.sh has built build-device (cuda_bench ep_check automoe_cli). Each step
# has its own timeout and log under $OUT (or build-device):
#   ipc_bw     ep_check over CUDA IPC between GPU 0 and 1 (counts mode): the checks, then dispatch/combine
#              bandwidth against ncclAlltoAll of the same bytes ("BW" lines)
#   train      the demo recipe 50 steps on one GPU, then mpirun -np 2 --train.ep 2 over NCCL and
#              over IPC (a GPU per rank); compare_loss_curves.py judges each against one GPU
#   kill       a rank SIGKILLed after 15 s of a long run over NCCL: the job must end non-zero
#   w2         W2: cuda_bench on 2 GPUs (EP 2) beside Transformers + FSDP2 on the same 2 GPUs,
#              for each of W2_LAYERS (default "12 24"), seq 4096, micro-batch 2
# PARTS picks them (default "ipc_bw train kill w2"). The NCCL gradient paths (overlap, ZeRO-1,
# memory-saving) and the stalled rank are in device.sh's stage ep_model, which runs them with
# >= 2 GPUs after its one-GPU runs.
set -uo pipefail
cd "$(dirname "$0")/.."
B=build-device
O=${OUT:-$B}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_VISIBLE_DEVICES=0,1
M=(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
   -x NVSHMEM_DISABLE_NVLS -x CUDA_VISIBLE_DEVICES)
step() { local name=$1 t=$2; shift 2; local s; s=$(date +%s)
  timeout "$t" "$@" > "$O/$name.log" 2>&1; local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - s )) s"; }
run=(finetune examples/demo.yaml --train.device cuda --train.steps 50 --train.log_every 10
     --train.checkpoint_every 0)
has() { [[ " ${PARTS:-ipc_bw train kill w2} " == *" $1 "* ]]; }
has ipc_bw && step ipc_bw 80 "${M[@]}" "$B/ep_check" --transport ipc --tokens 4096 --modes counts --recompute none --iters 10
has train && step train_1gpu 60 "$B/automoe" "${run[@]}" --data.micro_batch 16 --output.dir "$O/t1"
has train && for t in nccl ipc; do
  step "train_$t" 60 "${M[@]}" -x AUTOMOE_EP_TRANSPORT=$t "$B/automoe" "${run[@]}" --train.ep 2 \
    --data.micro_batch 8 --output.dir "$O/t_$t"
  step "cmp_$t" 20 python3 bench/compare_loss_curves.py "$O/t1/metrics.jsonl" "$O/t_$t/metrics.jsonl"
done
has kill && step kill 90 "${M[@]}" -x AUTOMOE_EP_TRANSPORT=nccl bash bench/kill_rank.sh 1 15 "$B/automoe" \
  "${run[@]}" --train.steps 100000 --train.ep 2 --data.micro_batch 8 --output.dir "$O/t_kill"
has w2 && for L in ${W2_LAYERS:-12 24}; do
  step "w2_automoe_L$L" 120 "${M[@]}" "$B/cuda_bench" --layers "$L" --seq 4096 --mbs 2
  step "w2_fsdp_L$L" 150 env LAYERS="$L" SEQ=4096 MBS=2 STEPS=8 WARM=3 PYTHONPATH=.deps/bench \
    python3 .deps/bench/hf_moe_fsdp.py
done
has ipc_bw && grep -hE "^BW|checks,|^FAIL" "$O/ipc_bw.log" | head -8
for f in "$O"/cmp_*.log; do echo "$(basename "$f" .log):"; grep -hE "^(ok|FAIL)" "$f"; done
grep -hE "transport|replicas identical" "$O"/train_*.log | sort -u | head -6
has kill && tail -n 3 "$O/kill.log"
has w2 && grep -hE "^RESULT" "$O"/w2_*.log
