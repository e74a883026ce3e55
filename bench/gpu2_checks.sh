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
#   nccl       the gradient paths over NCCL, bit for bit where the math is the same: the
#              overlapped all-reduce against AUTOMOE_GRAD_OVERLAP=0, ZeRO-1 (ep 1 x dp 2) against
#              zero 0, the memory-saving mode against one GPU's (bf16 noise); then a rank
#              stopped (SIGSTOP) mid-run: the job must end on the timeouts, not hang
# PARTS picks them (default "ipc_bw train kill w2"; "nccl" is not in the default).
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
if has nccl; then
  N=("${M[@]}" -x AUTOMOE_EP_TRANSPORT=nccl)
  step n_ov 60 "${N[@]}" "$B/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 --output.dir "$O/n_ov"
  step n_noov 60 "${N[@]}" -x AUTOMOE_GRAD_OVERLAP=0 "$B/automoe" "${run[@]}" --train.ep 2 \
    --data.micro_batch 8 --output.dir "$O/n_noov"
  step cmp_n_ov_exact 20 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$O/n_noov/metrics.jsonl" "$O/n_ov/metrics.jsonl"
  step n_dp2 60 "${N[@]}" "$B/automoe" "${run[@]}" --train.ep 1 --data.micro_batch 8 --output.dir "$O/n_dp2"
  step n_dp2_zero1 60 "${N[@]}" "$B/automoe" "${run[@]}" --train.ep 1 --train.zero 1 \
    --data.micro_batch 8 --output.dir "$O/n_dp2_zero1"
  step cmp_n_zero1_exact 20 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$O/n_dp2/metrics.jsonl" "$O/n_dp2_zero1/metrics.jsonl"
  step n_1gpu_ms 60 "$B/automoe" "${run[@]}" --data.micro_batch 16 --train.memory_saving true \
    --output.dir "$O/n_1gpu_ms"
  step n_ms 60 "${N[@]}" "$B/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
    --train.memory_saving true --output.dir "$O/n_ms"
  step cmp_n_ms 20 python3 bench/compare_loss_curves.py "$O/n_1gpu_ms/metrics.jsonl" "$O/n_ms/metrics.jsonl"
  # rank 1 stopped after 15 s: rank 0 must stop on AUTOMOE_NCCL_TIMEOUT_S / AUTOMOE_DIST_TIMEOUT
  # (20 s) and mpirun end the job (its MPI_Abort kills the stopped rank too); 124 = it hung
  step n_stall 90 "${N[@]}" -x KILL_RANK_SIGNAL=STOP -x AUTOMOE_NCCL_TIMEOUT_S=20 \
    -x AUTOMOE_DIST_TIMEOUT=20 bash bench/kill_rank.sh 1 15 "$B/automoe" "${run[@]}" \
    --train.steps 100000 --train.ep 2 --data.micro_batch 8 --output.dir "$O/n_stall"
  pkill -KILL -f "n_stall" 2>/dev/null
  grep -hE "automoe: error|timed out|timeout" "$O/n_stall.log" | head -3
fi
has ipc_bw && grep -hE "^BW|checks,|^FAIL" "$O/ipc_bw.log" | head -8
for f in "$O"/cmp_*.log; do echo "$(basename "$f" .log):"; grep -hE "^(ok|FAIL)" "$f"; done
grep -hE "transport|replicas identical" "$O"/train_*.log | sort -u | head -6
has kill && tail -n 3 "$O/kill.log"
has w2 && grep -hE "^RESULT" "$O"/w2_*.log
