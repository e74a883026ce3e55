#!/usr/bin/env bash
# bench/device.sh: the one script run on the GPU machine (H200). From a fresh copy of the repo
# (run bench/fetch_deps.sh here first; carry [".whl", ".deps"]): configures and builds the CUDA
# backend (CMake + Ninja, sm_90a), then runs the stages named in STAGES:
#   ops       cuda_op_check: every CUDA op against the CPU op (OPS: its filter words, default
#             "-grouped_perf"; e.g. OPS="grouped attention")
#   parity    cuda_parity: the CUDA model (bf16, fp32_master) against the CPU model on the
#             Transformers fixtures, judged against Transformers' own bf16 error there
#             (bench/hf_bf16_noise.py), and a TRAIN_STEPS-step (300; 0 skips) tiny-moe fine-tune on both
#   bench     cuda_bench: a 2-layer smoke run, then W1 (LAYERS=12 SEQ=4096 MBS=2) in the default
#             mode, (MEMSAVE=1, default) in the memory-saving mode and (UNFUSED=1) with
#             AUTOMOE_FUSED_NORM=0 (the norm op pairs instead of the fused ones)
#   cli       the CLI on the GPU: `automoe forward --device cuda --dtype bf16` on a Transformers
#             fixture against its reference (bench/compare_forward.py), and `automoe finetune`
#             of the demo recipe with train.device cuda, default and memory-saving
#             (CLI_STEPS, default 300)
#   profile   ncu on one step of a 1-layer W1 model: the ten most expensive kernels with their
#             share of the step and their SM and DRAM throughput as % of peak (kernel_table.py;
#             PROFILE_TOP kernels, default 10)
#   baseline  native Transformers on the same shapes (.deps/bench/hf_moe_baseline.py, a copy of
#             ../shared/bench; IMPLS, default "grouped_mm"), and the ratios
#   ep        ep_check (not in the default STAGES): the GPU expert-parallel block against one
#             GPU with P = 2, 4, 8 loopback ranks on GPU 0, then mpirun -np 2 on GPU 0 over the
#             MPI-staged transport and (small shapes) over CUDA IPC buffers (ep_ipc2: two
#             processes on one GPU check its ordering, not its NVLink bandwidth; counts and
#             padded, and "padded fwd: no host wait"), then the IPC stall drill (ep_ipc2_stall:
#             rank 1 sleeps past AUTOMOE_DIST_TIMEOUT=10; passes on rank 0's "PASS ... stalled
#             peer" line, the job's exit code is non-zero by design); with >= 2
#             GPUs also NCCL under
#             mpirun -np 2 (check + dispatch/combine bandwidth) and the kill drills (a rank exits,
#             or stops communicating, mid-run: the job must end non-zero within the NCCL timeout).
#             EP_LOOPBACK: the loopback P values (default "2 4 8").
#             At the default shapes each loopback P took about 3 minutes on an H200 (before
#             ep_check also ran the recompute options, train.ep_recompute: two more blocks per
#             case and two more arena checks, compared bitwise): give the call room, or
#             EP_ARGS="--tokens 2048" (EP_ARGS="--recompute none" leaves the options out). ep_check
#             also checks train.ep_chunks 2 and 3 against one chunk by default (a chunked block
#             per recompute option and case, and the arena check with 2 chunks: about twice the
#             checks; EP_ARGS="--chunks 1" leaves them out, "--chunks 2" keeps one). A call that outruns the device tool's limit
#             brings back no output: keep logs under $OUT, not only in a pipe.
#   ep_model  (not default) the CUDA model and trainer with expert parallelism: the demo recipe,
#             EP_STEPS (50) steps, on one GPU with micro_batch 16, then `mpirun -np 2 ...
#             --train.ep 2` with micro_batch 8 per rank (the same global batches) with both
#             ranks on GPU 0 over the MPI-staged transport; bench/compare_loss_curves.py judges
#             the two loss curves (bf16 noise; its limits say why). With >= 2 GPUs the same
#             over NCCL, a GPU per rank. The gradient all-reduce overlapped with the backward
#             (the default) against AUTOMOE_GRAD_OVERLAP=0, bit-identical (--exact), over MPI
#             staging with and without train.grad_accum 2 (ep_model_cmp_ov_exact,
#             ep_model_cmp_ov_ga_exact) and, with >= 2 GPUs, over NCCL (ep_model_cmp_nccl_ov_exact).
#             The EP backward's weight gradients beside its combine (the default) against
#             AUTOMOE_EP_WGRAD_OVERLAP=0, bit-identical (--exact), over MPI staging in the default
#             mode (ep_model_mpi2_nowg, ep_model_cmp_wg_exact) and the memory-saving mode
#             (ep_model_ms_mpi2_nowg, ep_model_cmp_ms_wg_exact). First ep_check under mpirun -np 2 on GPU 0 over MPI
#             staging (small shapes), which checks the transport alone (and, bitwise, the
#             recompute options, train.ep_recompute). Then the MPI run again with
#             --train.ep_recompute experts: its curve must equal the MPI run's exactly
#             (ep_model_mpi2_rc, ep_model_cmp_rc_exact) and follow one GPU's (ep_model_cmp_rc).
#             Then with --train.ep_dispatch padded too (no host sync in the MoE forward): its
#             curve must equal ep_model_mpi2_rc's exactly (ep_model_mpi2_padded,
#             ep_model_cmp_padded_exact) and follow one GPU's (ep_model_cmp_padded).
#             With --train.ep_chunks 2 (the EP block pipelined over two token chunks): within
#             bf16 noise of ep_model_mpi2's curve and one GPU's (ep_model_mpi2_chunks,
#             ep_model_cmp_chunks, ep_model_cmp_chunks_1gpu; the block's bits are ep_check's
#             "chunks=" lines), and over IPC bit for bit that run (ep_model_ipc2_chunks,
#             ep_model_cmp_ipc_chunks_exact).
#             The same check and
#             training run over CUDA IPC buffers (AUTOMOE_EP_TRANSPORT=ipc, both ranks on GPU 0:
#             ep_model_check_ipc2, ep_model_ipc2, ep_model_cmp_ipc; bit for bit MPI staging's
#             curve: ep_model_cmp_ipc_exact, and in padded mode ep_model_ipc2_padded against
#             ep_model_mpi2_padded: ep_model_cmp_ipc_padded_exact). And `automoe forward --device cuda --ep 2` under
#             mpirun (MPI staging) against the single-GPU forward of the same fixture
#             (bench/compare_forward.py: logits, loss, aux loss, every gradient).
#             The memory-saving mode under mpirun (MPI staging, both ranks on GPU 0):
#             ep_model_ms_mpi2 against one GPU's memory-saving run (ep_model_cmp_ms, bf16
#             noise), then with train.max_grad_norm 0 the EP default and EP memory-saving runs,
#             whose losses, aux losses and grad norms must be BIT-identical
#             (ep_model_cmp_ms_exact; the same check on one GPU, losses only, as the control:
#             ep_model_cmp_ms_exact_1gpu). Every mpirun training run ends by comparing the
#             replicas' weights over MPI ("replicas identical" or an error).
#             ZeRO-1 (train.zero 1) on two ranks of GPU 0 over MPI staging: ep 1 x dp 2 against
#             train.zero 0 and ep 2 against ep_model_mpi2, bit-identical losses and grad norms
#             (compare_loss_curves.py --exact), and a resume from the middle checkpoint; with
#             >= 2 GPUs also ZeRO-1 over NCCL against train.zero 0 over NCCL (--exact), the
#             memory-saving mode over NCCL against one GPU's (ep_model_cmp_ms_nccl), and a rank
#             stopped with SIGSTOP over NCCL (ep_model_stall_nccl2: must end, not hang).
#   ep_memsave (not default) only those memory-saving stages of ep_model (TARGETS=automoe_cli
#             builds only the CLI they need).
#   ep_zero3  (not default; also part of ep_model) ZeRO-3 on the GPU (train.zero 3) against
#             ZeRO-1, two ranks of GPU 0 over MPI staging, ep 1 x dp 2 and ep 2: bit-identical
#             losses, CE, aux and grad norms (--exact), identical HF exports (diff -r), a resume
#             from the middle checkpoint; grad_accum 2 within bf16 noise (ep_zero3_stages says
#             why not bitwise). With >= 2 GPUs ep_model also runs ZeRO-3 over NCCL against ZeRO-1
#             (ep_model_cmp_nccl_zero3). TARGETS=automoe_cli suffices. Memory at scale:
#             STAGES=multi BENCH_ARGS="--zero 3" (cuda_bench's memory lines).
#   ep_gpu2   (not default; also part of ep_model on >= 2 GPUs) only ep_model's two-GPU
#             block (NCCL: EP = 2, auto, the overlapped all-reduce bit for bit, ZeRO-1 and
#             ZeRO-3 against it, memory-saving, a stopped rank) after its two one-GPU reference
#             runs: about two minutes after the build (TARGETS=automoe_cli)
#   push      (not default) the direct dispatch (AUTOMOE_EP_PUSH, dist/expert_parallel_cuda.h)
#             and the combine read in place (AUTOMOE_EP_INPLACE; against the gather with the
#             copy engines' copies, AUTOMOE_IPC_SM_COPY=0, bitwise), and the compute stream
#             at the default priority with the EP weight gradients on every SM
#             (AUTOMOE_CTX_PRIORITY=0 AUTOMOE_EP_WGRAD_SMS=132, bitwise), the weight
#             gradients' grids oversubscribed (AUTOMOE_EP_WGRAD_SMS=1056, bitwise), and the packed
#             layout against the broadcast one with its rows ahead (the reference run forces
#             AUTOMOE_EP_BROADCAST=1, opt-in; bitwise)
#             over CUDA IPC, on two GPUs (or two processes on GPU 0): ep_check's checks with
#             "direct dispatch off" lines and its "BW ipc ... direct / packed" bandwidth lines
#             (a GPU per rank; the direct one also split into layout + counts, push, copy-out),
#             and 50 training steps with it on and off, bit-identical.
#             TARGETS="ep_check automoe_cli".
#   dispatch_bw (not default; two GPUs) the forward's dispatch/combine bandwidth lines of
#             ep_check --bench-only over DISPATCH_TRANSPORTS ("ipc nccl") at DISPATCH_TOKENS
#             ("4096 8192") per rank, idle and queued start (--queued-start), TARGETS=ep_check
#   multi     (not default) several GPUs: cuda_bench under mpirun, a rank per GPU, experts over
#             all of them (transport auto), beside Transformers + FSDP2 (hf_moe_fsdp.py) for each
#             MULTI_LAYERS (default "12 24": W2; W4: MULTI_LAYERS=48 MBS=1 on 4 GPUs); on one GPU
#             a small two-rank smoke run of the same path; each also with --ep-chunks 2
#             (multi_automoe_L<L>_chunks2, multi_smoke_chunks2; MULTI_CHUNKS=0 leaves those out)
#             and with --ep-halves over IPC (multi_automoe_L<L>_halves; MULTI_HALVES=0 leaves
#             those out); MULTI_FSDP=0 leaves out Transformers (A/B runs of ours only)
#   halves    (not default) train.ep_halves against the whole micro-batch: 50 steps of the demo
#             recipe, EP = 2 over IPC, the same loss curve within bf16 rounding
#             (TARGETS=automoe_cli)
#   launch    (not default) torchrun (torch.distributed.run --no-python, no MPI in the processes:
#             the TCP backend of dist::Comm) against mpirun, bit for bit: a 20-step CPU tiny-moe run
#             with ep 2, and the demo recipe on GPU 0 with ep 2 (both ranks on GPU 0: IPC rows,
#             host-staged gradients); then a rank SIGKILLed under torchrun must end the job
#   gpu2      (not default; >= 2 GPUs) bench/gpu2_checks.sh on GPUs 0 and 1: IPC between the GPUs
#             (checks and bandwidth against ncclAlltoAll), the demo recipe with ep 2 over NCCL
#             and over IPC against one GPU, the NCCL kill drill, and W2 (12 and 24 layers)
#             beside Transformers + FSDP2 on the same two GPUs
#   sweep     (not default) grouped_sweep: every candidate CUTLASS configuration (tile, cluster,
#             schedule) of the six W1 expert GEMMs, timed and checked against the production
#             configuration; the summary names the fastest per GEMM. Configures the build with
#             -DAUTOMOE_GROUPED_SWEEP=ON (~27 CUTLASS translation units). STAGES=sweep alone
#             builds only grouped_sweep. SWEEP_ARGS: its flags (e.g. "--only fwd" to split it)
# and prints a short table last. Default STAGES="ops parity bench cli baseline".
#   bash bench/device.sh            Env: BUILD (build-device), CUDA_ARCH (90a), STAGES, OPS,
#                                   TRAIN_STEPS, LAYERS, SEQ, MBS, IMPLS, BENCH_ARGS (extra cuda_bench
#                                   flags), EP_ARGS (extra ep_check flags), TARGETS (what to build;
#                                   default: every bench binary), STAGE_TIMEOUT (seconds per stage,
#                                   300; exit 124)
# Exit code: the number of failed stages (configure 3, build 4). Logs go to $OUT/device-logs.tgz
# when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-device}
mkdir -p "$BUILD/.bin"

# Ninja: the system's, else pip's (the GPU machine has no ninja-build package).
if ! command -v ninja >/dev/null 2>&1; then
  python3 -c 'import ninja' 2>/dev/null || { echo "device.sh: no ninja (system or pip)"; exit 2; }
  printf '#!/bin/sh\nexec python3 -m ninja "$@"\n' > "$BUILD/.bin/ninja"
  chmod +x "$BUILD/.bin/ninja"
  export PATH="$PWD/$BUILD/.bin:$PATH"
fi
# PCRE2 from bench/fetch_deps.sh when the machine has none (the tokenizer, hence the CLI, needs
# it): a copy of its pkg-config file pointing at the extracted Debian package.
if ! pkg-config --exists libpcre2-8 2>/dev/null && [ -d .deps/pcre2/usr/include ]; then
  pc=$(find .deps/pcre2 -name libpcre2-8.pc | head -n 1)
  mkdir -p "$BUILD/.pkgconfig"
  sed "s|^prefix=.*|prefix=$PWD/.deps/pcre2/usr|" "$pc" > "$BUILD/.pkgconfig/libpcre2-8.pc"
  export PKG_CONFIG_PATH="$PWD/$BUILD/.pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
fi
# CUTLASS headers (sm90 grouped GEMMs): the nvidia-cutlass wheel, installed here from a carried
# .whl/nvidia_cutlass-*.whl when pip has none (the GPU machine has no network). Without them
# CMake builds the grouped GEMM fallback only and says so.
if ! python3 -c "import importlib.util as u; assert u.find_spec('cutlass_library')" 2>/dev/null; then
  for w in .whl/nvidia_cutlass-*.whl; do
    [ -f "$w" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$BUILD/.py" "$w" \
      && export PYTHONPATH="$PWD/$BUILD/.py${PYTHONPATH:+:$PYTHONPATH}"
  done
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
STAGES=${STAGES:-ops parity bench cli baseline}
has() { [[ " $STAGES " == *" $1 "* ]]; }

t0=$(date +%s)
deadline=$(( t0 + ${DEADLINE:-570} ))
left() { echo $(( deadline - $(date +%s) )); }
# Warnings stay warnings here (a newer host compiler must not stop the run); CI has -Werror.
# The sweep's CUTLASS instantiations only when it runs (an explicit OFF otherwise: the option
# is cached in the build dir).
sweep=OFF
has sweep && sweep=ON
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DAUTOMOE_WERROR=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90a}" -DAUTOMOE_GROUPED_SWEEP=$sweep \
  > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; echo "device.sh: configure failed"; exit 3; }
grep -E "PCRE2|CUDA compiler identification|cuDNN|CUTLASS" "$BUILD/configure.log"
grep -E "NCCL" "$BUILD/configure.log"
if [ -n "${TARGETS:-}" ]; then
  read -r -a targets <<< "$TARGETS"
elif [ "${STAGES// /}" = sweep ]; then
  targets=(grouped_sweep)
else
  targets=(cuda_op_check cuda_parity cuda_bench ep_check)
  grep -q "PCRE2 (libpcre2-8) not found" "$BUILD/configure.log" || targets+=(automoe_cli)
  has sweep && targets+=(grouped_sweep)
fi
cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}" > "$BUILD/build.log" 2>&1 \
  || { tail -n 60 "$BUILD/build.log"; echo "device.sh: build failed"; exit 4; }
echo "device.sh: built ${targets[*]} in $(( $(date +%s) - t0 )) s"

export AUTOMOE_THREADS=0  # the CPU references on every core
fails=0
LOGS=("$BUILD/build.log")
SUMMARY=()
stage() {  # name, command...
  local name=$1; shift
  local log="$BUILD/$name.log"
  LOGS+=("$log")
  local budget=$(( $(left) - 20 ))  # 20 s for the summary and the archive
  [ "$budget" -gt "${STAGE_TIMEOUT:-300}" ] && budget=${STAGE_TIMEOUT:-300}
  if [ "$budget" -lt 10 ]; then
    echo "== $name: skipped (the DEADLINE is near)"
    SUMMARY+=("$(printf '%-12s skipped: no time left before DEADLINE' "$name")")
    fails=$((fails + 1))
    return 0
  fi
  echo "== $name: $* (at most $budget s)"
  local s=$(date +%s)
  timeout "$budget" "$@" 2>&1 | tee "$log"  # a hung stage must not eat the call
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc in $(( $(date +%s) - s )) s"
  SUMMARY+=("$(printf '%-12s exit %-3s %4s s' "$name" "$rc" "$(( $(date +%s) - s ))")")
  [ "$rc" -ne 0 ] && fails=$((fails + 1))
  return 0
}

# A drill that must FAIL: exit non-zero, but not by the stage timeout (124: it hung).
stage_must_fail() {  # name, command...
  local name=$1; shift
  local log="$BUILD/$name.log"
  LOGS+=("$log")
  echo "== $name (must fail, not hang): $*"
  local s
  s=$(date +%s)
  timeout "${STAGE_TIMEOUT:-300}" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  { [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; } && verdict=FAILED && fails=$((fails + 1))
  echo "== $name: exit $rc in $(( $(date +%s) - s )) s: $verdict"
  SUMMARY+=("$(printf '%-12s exit %-3s %4s s  (must be non-zero, not 124): %s' "$name" "$rc" "$(( $(date +%s) - s ))" "$verdict")")
  return 0
}

if has ops; then
  # shellcheck disable=SC2086
  stage op_check "$BUILD/cuda_op_check" ${OPS:--grouped_perf}
fi
if has sweep; then
  # shellcheck disable=SC2086
  stage sweep "$BUILD/grouped_sweep" ${SWEEP_ARGS:-}
fi
if has parity; then
  # bf16's own yardstick: what bf16 costs Transformers on the same fixtures (torch is there)
  noise=()
  if python3 -c "import torch, transformers" 2>/dev/null; then
    stage hf_bf16 python3 bench/hf_bf16_noise.py "$BUILD/hf_bf16_noise.json"
    [ -f "$BUILD/hf_bf16_noise.json" ] && noise=(--hf-noise "$BUILD/hf_bf16_noise.json")
  fi
  train=(--steps "${TRAIN_STEPS:-300}")
  [ "${TRAIN_STEPS:-300}" = 0 ] && train=(--skip-train)
  stage parity "$BUILD/cuda_parity" "${train[@]}" "${noise[@]}"
fi
if has bench; then
  stage bench_smoke "$BUILD/cuda_bench" --layers 2 --seq 1024 --mbs 1 --warmup 1 --steps 2
  # shellcheck disable=SC2086
  stage bench_w1 "$BUILD/cuda_bench" --layers "${LAYERS:-12}" --seq "${SEQ:-4096}" --mbs "${MBS:-2}" ${BENCH_ARGS:-}
  if [ "${UNFUSED:-0}" = 1 ]; then  # the norm op pairs (AUTOMOE_FUSED_NORM=0) beside the default
    # shellcheck disable=SC2086
    stage bench_w1_unfused env AUTOMOE_FUSED_NORM=0 "$BUILD/cuda_bench" --layers "${LAYERS:-12}" \
      --seq "${SEQ:-4096}" --mbs "${MBS:-2}" ${BENCH_ARGS:-}
  fi
  if [ "${MEMSAVE:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    stage bench_w1_memsave "$BUILD/cuda_bench" --layers "${LAYERS:-12}" --seq "${SEQ:-4096}" --mbs "${MBS:-2}" \
      --memory-saving ${BENCH_ARGS:-}
  fi
fi
if has cli; then
  if [ -x "$BUILD/automoe" ]; then
    fx=tests/fixtures/hf/tiny_a
    stage cli_forward bash -c "'$BUILD/automoe' forward --model $fx/model --batch $fx/reference.safetensors \
      --out '$BUILD/fwd_cuda.safetensors' --grads --device cuda --dtype bf16 \
      && python3 bench/compare_forward.py '$BUILD/fwd_cuda.safetensors' $fx/reference.safetensors \
         \$( [ -f '$BUILD/hf_bf16_noise.json' ] && echo --hf-noise '$BUILD/hf_bf16_noise.json' --fixture tiny_a )"
    for mode in default memsave; do
      extra=()
      [ "$mode" = memsave ] && extra=(--train.memory_saving true)
      stage "cli_finetune_$mode" "$BUILD/automoe" finetune examples/demo.yaml --train.device cuda \
        --train.steps "${CLI_STEPS:-300}" --train.log_every 50 --train.checkpoint_every 0 \
        --output.dir "$BUILD/cli_$mode" "${extra[@]}"
    done
  else
    echo "device.sh: no $BUILD/automoe (PCRE2 missing?): no cli stage"
    fails=$((fails + 1))
  fi
fi
if has ep; then
  for P in ${EP_LOOPBACK-2 4 8}; do  # EP_LOOPBACK="" runs none
    # shellcheck disable=SC2086
    stage "ep_loop$P" "$BUILD/ep_check" --loopback "$P" ${EP_ARGS:-}
  done
  if command -v mpirun >/dev/null 2>&1; then  # two processes on ONE GPU: MPI staging
    # shellcheck disable=SC2086
    stage ep_mpi2 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      "$BUILD/ep_check" --transport mpi --no-bench ${EP_ARGS:-}
    # the same two processes over CUDA IPC buffers (small shapes, seconds: the ordering, not
    # bandwidth; with the train.ep_chunks checks; a hang costs 180 s at most)
    STAGE_TIMEOUT=180 stage ep_ipc2 mpirun --allow-run-as-root --oversubscribe -np 2 \
      -x CUDA_VISIBLE_DEVICES=0 "$BUILD/ep_check" --transport ipc --no-bench --tokens 1024 \
      --hidden 512 --inter 256 --experts 16 --topk 4
    # the IPC stall drill: rank 1 sleeps past AUTOMOE_DIST_TIMEOUT=10 before its forward; rank 0
    # must print "PASS ... stalled peer" (its sync threw the timeout error) and end the job
    # (MPI_Abort: mpirun's exit is non-zero either way, so the verdict is the PASS line)
    STAGE_TIMEOUT=120 stage ep_ipc2_stall bash -c 'out=$("$@" 2>&1); rc=$?; echo "$out";
      echo "mpirun exit $rc (non-zero expected)"; grep -q "^PASS .*stalled peer" <<<"$out" &&
      ! grep -q "^FAIL" <<<"$out"' _ mpirun --allow-run-as-root --oversubscribe -np 2 \
      -x CUDA_VISIBLE_DEVICES=0 -x AUTOMOE_DIST_TIMEOUT=10 "$BUILD/ep_check" --transport ipc \
      --stall-rank 1 --tokens 1024 --hidden 512 --inter 256 --experts 16 --topk 4
  fi
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
  if [ "$ngpu" -ge 2 ] && command -v mpirun >/dev/null 2>&1; then
    # NVLink multicast stays off (NCCL, torch symmetric memory, NVSHMEM): KINDS.md says why.
    # The transport named (auto takes ipc on one node): NCCL here, its kill drills below.
    MPI=(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1
         -x NVSHMEM_DISABLE_NVLS=1 -x AUTOMOE_EP_TRANSPORT=nccl)
    # shellcheck disable=SC2086
    stage ep_nccl2 "${MPI[@]}" "$BUILD/ep_check" ${EP_ARGS:-}
    # CUDA IPC between the two GPUs (NVLink P2P; what auto takes there): the checks and its
    # dispatch/combine bandwidth against ncclAlltoAll of the same bytes
    # shellcheck disable=SC2086
    stage ep_ipc_gpu2 "${MPI[@]}" "$BUILD/ep_check" --transport ipc ${EP_ARGS:-}
    # shellcheck disable=SC2086
    stage_must_fail ep_kill_exit "${MPI[@]}" -x AUTOMOE_NCCL_TIMEOUT_S=30 "$BUILD/ep_check" \
      --kill-rank 1 --kill-mode exit ${EP_ARGS:-}
    # shellcheck disable=SC2086
    stage_must_fail ep_kill_stall "${MPI[@]}" -x AUTOMOE_NCCL_TIMEOUT_S=30 "$BUILD/ep_check" \
      --kill-rank 1 --kill-mode stall ${EP_ARGS:-}
  else
    echo "device.sh: $ngpu GPU(s) or no mpirun: the NCCL runs of stage ep need 2 GPUs (skipped)"
  fi
fi
# The demo recipe for EP_STEPS steps on the GPU: every training run of ep_model and ep_memsave.
run=(finetune examples/demo.yaml --train.device cuda --train.steps "${EP_STEPS:-50}"
     --train.log_every 10 --train.checkpoint_every 0)
# The memory-saving mode under mpirun (stage ep_model, or STAGES=ep_memsave alone: eight small
# training runs and five comparisons). Needs $BUILD/automoe and mpirun.
ep_memsave_stages() {
  # The memory-saving mode under mpirun (AdamW per tensor inside the backward, each gradient
  # summed over the ranks first): its loss curve against one GPU's memory-saving run ...
  local ms=(--train.memory_saving true)
  local mpi2=(mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0
        -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8)
  stage ep_model_1gpu_ms "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 "${ms[@]}" \
    --output.dir "$BUILD/ep_model_1gpu_ms"
  stage ep_model_ms_mpi2 "${mpi2[@]}" "${ms[@]}" --output.dir "$BUILD/ep_model_ms_mpi2"
  stage ep_model_cmp_ms python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu_ms/metrics.jsonl" \
    "$BUILD/ep_model_ms_mpi2/metrics.jsonl"
  # the EP backward's expert weight gradients on the compute stream (AUTOMOE_EP_WGRAD_OVERLAP=0)
  # against the side stream (the default; joined before the mode's AdamW on them): the same bits
  stage ep_model_ms_mpi2_nowg mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
    -x AUTOMOE_EP_TRANSPORT=mpi -x AUTOMOE_EP_WGRAD_OVERLAP=0 "$BUILD/automoe" "${run[@]}" \
    --train.ep 2 --data.micro_batch 8 "${ms[@]}" --output.dir "$BUILD/ep_model_ms_mpi2_nowg"
  stage ep_model_cmp_ms_wg_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_ms_mpi2/metrics.jsonl" "$BUILD/ep_model_ms_mpi2_nowg/metrics.jsonl"
  # with train.ep_recompute experts too (what issue 7's memory needs): the same bits
  stage ep_model_ms_rc_mpi2 "${mpi2[@]}" "${ms[@]}" --train.ep_recompute experts \
    --output.dir "$BUILD/ep_model_ms_rc_mpi2"
  stage ep_model_cmp_ms_rc_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_ms_mpi2/metrics.jsonl" "$BUILD/ep_model_ms_rc_mpi2/metrics.jsonl"
  # ... and, without clipping (the mode clips by the previous step's norm), bit for bit the
  # default mode under the same two ranks; on one GPU the same pair is the control
  local nc=(--train.max_grad_norm 0)
  stage ep_model_mpi2_noclip "${mpi2[@]}" "${nc[@]}" --output.dir "$BUILD/ep_model_mpi2_noclip"
  stage ep_model_ms_mpi2_noclip "${mpi2[@]}" "${nc[@]}" "${ms[@]}" \
    --output.dir "$BUILD/ep_model_ms_mpi2_noclip"
  stage ep_model_cmp_ms_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_mpi2_noclip/metrics.jsonl" "$BUILD/ep_model_ms_mpi2_noclip/metrics.jsonl"
  stage ep_model_1gpu_noclip "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 "${nc[@]}" \
    --output.dir "$BUILD/ep_model_1gpu_noclip"
  stage ep_model_1gpu_ms_noclip "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 "${nc[@]}" \
    "${ms[@]}" --output.dir "$BUILD/ep_model_1gpu_ms_noclip"
  stage ep_model_cmp_ms_exact_1gpu python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss \
    "$BUILD/ep_model_1gpu_noclip/metrics.jsonl" "$BUILD/ep_model_1gpu_ms_noclip/metrics.jsonl"
}
# ZeRO-3 on the GPU (train.zero 3, dist/zero3_cuda.h) under mpirun, two ranks on GPU 0 over MPI
# staging (stage ep_model, or STAGES=ep_zero3 alone: eight small training runs, eight checks).
# No full parameter or gradient arena: each block is gathered into a window before its forward
# and its backward, its gradients reduced into the shard after its backward. Against train.zero 1
# on the same ranks, ep 1 x dp 2 and ep 2 x dp 1: with one micro-batch per step every gradient
# element is the same a + b rounded to bf16 once, the norm sums the same per-piece partial sums
# and AdamW is elementwise, so losses, CE, aux and grad norms must be bit-identical (--exact),
# and so must the exported HF files (diff -r). The dp 2 run checkpoints at EP_STEPS/2;
# ep_model_zero3_resume deletes the last checkpoint, resumes from the middle one (the shards'
# moment files, the full weights) and must end identically. With train.grad_accum 2 zero 3
# cannot be bit-identical to zero 1 (zero 1 adds the micro-batches on each rank, then sums over
# the ranks; zero 3 sums each micro-batch over the ranks, then adds: (a1+a2)+(b1+b2) against
# (a1+b1)+(a2+b2), each rounded to bf16), so that pair is compared within bf16 noise.
ep_zero3_stages() {
  local zr=(mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0
            -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --data.micro_batch 8
            --output.export_hf true)
  local half=$(( ${EP_STEPS:-50} / 2 ))
  local z3dir="$BUILD/ep_model_dp2_zero3"
  local ex=(python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm)
  stage ep_model_dp2_zero1x "${zr[@]}" --train.ep 1 --train.zero 1 --output.dir "$BUILD/ep_model_dp2_zero1x"
  stage ep_model_dp2_zero3 "${zr[@]}" --train.ep 1 --train.zero 3 \
    --train.checkpoint_every "$half" --train.keep_checkpoints 2 --output.dir "$z3dir"
  stage ep_model_cmp_zero3 "${ex[@]}" "$BUILD/ep_model_dp2_zero1x/metrics.jsonl" "$z3dir/metrics.jsonl"
  stage ep_model_cmp_zero3_hf diff -r "$BUILD/ep_model_dp2_zero1x/hf" "$z3dir/hf"
  stage ep_model_ep2_zero1x "${zr[@]}" --train.ep 2 --train.zero 1 --output.dir "$BUILD/ep_model_ep2_zero1x"
  stage ep_model_ep2_zero3 "${zr[@]}" --train.ep 2 --train.zero 3 --output.dir "$BUILD/ep_model_ep2_zero3"
  stage ep_model_cmp_ep2_zero3 "${ex[@]}" "$BUILD/ep_model_ep2_zero1x/metrics.jsonl" \
    "$BUILD/ep_model_ep2_zero3/metrics.jsonl"
  stage ep_model_cmp_ep2_zero3_hf diff -r "$BUILD/ep_model_ep2_zero1x/hf" "$BUILD/ep_model_ep2_zero3/hf"
  if [ -f "$z3dir/metrics.jsonl" ] && [ "$half" -gt 0 ]; then
    cp "$z3dir/metrics.jsonl" "$z3dir/metrics-full.jsonl"
    rm -rf "$z3dir/checkpoints/step-$(printf %07d "${EP_STEPS:-50}")" "$z3dir/hf"
    ls "$z3dir/checkpoints"
    stage ep_model_zero3_resume "${zr[@]}" --train.ep 1 --train.zero 3 \
      --train.checkpoint_every "$half" --train.keep_checkpoints 2 --output.dir "$z3dir" \
      --output.resume true
    stage ep_model_cmp_zero3_resume "${ex[@]}" "$z3dir/metrics-full.jsonl" "$z3dir/metrics.jsonl"
    stage ep_model_cmp_zero3_resume_hf diff -r "$BUILD/ep_model_dp2_zero1x/hf" "$z3dir/hf"
  fi
  stage ep_model_ep2_zero1_ga "${zr[@]}" --train.ep 2 --train.zero 1 --data.micro_batch 4 \
    --train.grad_accum 2 --output.dir "$BUILD/ep_model_ep2_zero1_ga"
  stage ep_model_ep2_zero3_ga "${zr[@]}" --train.ep 2 --train.zero 3 --data.micro_batch 4 \
    --train.grad_accum 2 --output.dir "$BUILD/ep_model_ep2_zero3_ga"
  stage ep_model_cmp_zero3_ga python3 bench/compare_loss_curves.py \
    "$BUILD/ep_model_ep2_zero1_ga/metrics.jsonl" "$BUILD/ep_model_ep2_zero3_ga/metrics.jsonl"
}
# The trainer over NCCL with a GPU per rank (stage ep_model on >= 2 GPUs, or STAGES=ep_gpu2
# alone, which first writes the one-GPU reference runs it compares against: about two minutes
# after the build, TARGETS=automoe_cli): EP = 2 over NCCL and auto, the overlapped all-reduce
# bit for bit the one after the backward, ZeRO-1 and ZeRO-3 over NCCL, the memory-saving mode,
# a stopped rank.
ep_gpu2_stages() {
  # a GPU per rank; EP rows over NCCL unless said
  gpu2=(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1
        -x NVSHMEM_DISABLE_NVLS=1)
  nmpi=("${gpu2[@]}" -x AUTOMOE_EP_TRANSPORT=nccl)
  stage ep_model_nccl2 "${nmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
    --output.dir "$BUILD/ep_model_nccl2"
  stage ep_model_cmp_nccl python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
    "$BUILD/ep_model_nccl2/metrics.jsonl"
  # the overlapped gradient all-reduce (ncclAllReduce per bucket on the comm stream, beside
  # the EP all-to-alls on the compute stream) against the sum after the backward: bit-identical
  stage ep_model_nccl2_noov "${nmpi[@]}" -x AUTOMOE_GRAD_OVERLAP=0 "$BUILD/automoe" "${run[@]}" \
    --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/ep_model_nccl2_noov"
  stage ep_model_cmp_nccl_ov_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_nccl2_noov/metrics.jsonl" "$BUILD/ep_model_nccl2/metrics.jsonl"
  # the default transport (auto: CUDA IPC between the GPUs, gradients over NCCL)
  stage ep_model_auto2 "${gpu2[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
    --output.dir "$BUILD/ep_model_auto2"
  stage ep_model_cmp_auto python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
    "$BUILD/ep_model_auto2/metrics.jsonl"
  # ZeRO-1 over NCCL (ncclReduceScatter / ncclAllGather) against its all-reduce, dp 2
  nrun=("${nmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 1 --data.micro_batch 8)
  stage ep_model_nccl2_dp "${nrun[@]}" --output.dir "$BUILD/ep_model_nccl2_dp"
  stage ep_model_nccl2_zero1 "${nrun[@]}" --train.zero 1 --output.dir "$BUILD/ep_model_nccl2_zero1"
  stage ep_model_cmp_nccl_zero1 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_nccl2_dp/metrics.jsonl" "$BUILD/ep_model_nccl2_zero1/metrics.jsonl"
  # ZeRO-3 over NCCL (ncclBroadcast / ncclReduce per block) against ZeRO-1 over NCCL, dp 2:
  # with two ranks both sums are a + b rounded once, so bit-identical
  stage ep_model_nccl2_zero3 "${nrun[@]}" --train.zero 3 --output.dir "$BUILD/ep_model_nccl2_zero3"
  stage ep_model_cmp_nccl_zero3 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
    "$BUILD/ep_model_nccl2_zero1/metrics.jsonl" "$BUILD/ep_model_nccl2_zero3/metrics.jsonl"
  # ZeRO-3's prefetch (gathers and reduces on its comm stream, overlapped with the blocks) against
  # its synchronous path (AUTOMOE_ZERO3_PREFETCH=0): the same collectives, so bit-identical; then
  # at EP 2, where the EP all-to-alls (their own communicator, compute stream) run beside them
  for e in 1 2; do
    tag=zero3
    if [ "$e" = 2 ]; then
      tag=ep2_zero3
      stage "ep_model_nccl2_$tag" "${nmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
        --data.micro_batch 8 --train.zero 3 --output.dir "$BUILD/ep_model_nccl2_$tag"
    fi
    stage "ep_model_nccl2_${tag}_sync" "${nmpi[@]}" -x AUTOMOE_ZERO3_PREFETCH=0 "$BUILD/automoe" \
      "${run[@]}" --train.ep "$e" --data.micro_batch 8 --train.zero 3 \
      --output.dir "$BUILD/ep_model_nccl2_${tag}_sync"
    stage "ep_model_cmp_nccl_${tag}_prefetch" python3 bench/compare_loss_curves.py \
      --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_nccl2_${tag}_sync/metrics.jsonl" "$BUILD/ep_model_nccl2_$tag/metrics.jsonl"
  done
  # the memory-saving mode's per-tensor reduces over NCCL against one GPU's memory-saving run
  # (ep_memsave_stages above wrote ep_model_1gpu_ms)
  stage ep_model_ms_nccl2 "${nmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
    --data.micro_batch 8 --train.memory_saving true --output.dir "$BUILD/ep_model_ms_nccl2"
  stage ep_model_cmp_ms_nccl python3 bench/compare_loss_curves.py \
    "$BUILD/ep_model_1gpu_ms/metrics.jsonl" "$BUILD/ep_model_ms_nccl2/metrics.jsonl"
  # a rank stopped (SIGSTOP) mid-run over NCCL: rank 0 must stop on AUTOMOE_DIST_TIMEOUT
  # (the NCCL waits take it too) and mpirun end the job, not hang (124); the stopped rank
  # is killed after
  STAGE_TIMEOUT=120 stage_must_fail ep_model_stall_nccl2 "${nmpi[@]}" -x KILL_RANK_SIGNAL=STOP \
    -x AUTOMOE_DIST_TIMEOUT=20 bash bench/kill_rank.sh 1 15 "$BUILD/automoe" "${run[@]}" \
    --train.steps 100000 --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/ep_model_stall_nccl2"
  pkill -KILL -f "ep_model_stall_nccl2" 2>/dev/null
}
if has ep_model; then
  if [ -x "$BUILD/automoe" ] && command -v mpirun >/dev/null 2>&1; then
    # the transport and the EP block first, two processes on GPU 0 (small shapes: seconds)
    stage ep_model_check_mpi2 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      "$BUILD/ep_check" --transport mpi --no-bench --tokens 1024 --hidden 512 --inter 256 --experts 16 --topk 4
    stage ep_model_1gpu "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 --output.dir "$BUILD/ep_model_1gpu"
    # two ranks on ONE GPU: NCCL refuses that, so the rows go through host memory and MPI
    stage ep_model_mpi2 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
      --output.dir "$BUILD/ep_model_mpi2"
    stage ep_model_cmp_mpi python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
      "$BUILD/ep_model_mpi2/metrics.jsonl"
    # The gradient all-reduce in the last micro-batch's backward, bucket by bucket on a second
    # stream (the default; over MPI staging host-staged per bucket), against the sum after the
    # backward (AUTOMOE_GRAD_OVERLAP=0): with two ranks every sum is a + b rounded to bf16 once
    # either way, so the curves must be bit-identical; then the same pair with
    # train.grad_accum 2 (only the last micro-batch's backward may sum).
    ovrun=(mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0
           -x AUTOMOE_EP_TRANSPORT=mpi)
    stage ep_model_mpi2_noov "${ovrun[@]}" -x AUTOMOE_GRAD_OVERLAP=0 "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/ep_model_mpi2_noov"
    stage ep_model_cmp_ov_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2_noov/metrics.jsonl" "$BUILD/ep_model_mpi2/metrics.jsonl"
    stage ep_model_mpi2_ga "${ovrun[@]}" -x AUTOMOE_GRAD_OVERLAP=1 "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 4 --train.grad_accum 2 --output.dir "$BUILD/ep_model_mpi2_ga"
    stage ep_model_mpi2_ga_noov "${ovrun[@]}" -x AUTOMOE_GRAD_OVERLAP=0 "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 4 --train.grad_accum 2 --output.dir "$BUILD/ep_model_mpi2_ga_noov"
    stage ep_model_cmp_ov_ga_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2_ga_noov/metrics.jsonl" "$BUILD/ep_model_mpi2_ga/metrics.jsonl"
    # The EP backward's expert weight gradients on a side stream beside the dx combine (the
    # default; joined before the overlapped all-reduce of their layer and at the end of the
    # backward) against AUTOMOE_EP_WGRAD_OVERLAP=0 (all on the compute stream): the same kernels
    # on the same inputs, so the curve must equal ep_model_mpi2's bit for bit (the
    # memory-saving mode's pair is in ep_memsave_stages)
    stage ep_model_mpi2_nowg "${ovrun[@]}" -x AUTOMOE_EP_WGRAD_OVERLAP=0 "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/ep_model_mpi2_nowg"
    stage ep_model_cmp_wg_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2_nowg/metrics.jsonl" "$BUILD/ep_model_mpi2/metrics.jsonl"
    # train.ep_recompute experts: the EP backward rebuilds gate|up and the expert outputs instead
    # of keeping them (ep_model_check_mpi2's "rc=" lines check the block bitwise: ep_check runs
    # every recompute option by default). The same bits, so the curve must equal
    # ep_model_mpi2's exactly (cmp_rc_exact), and follow one GPU's (cmp_rc)
    stage ep_model_mpi2_rc mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
      --train.ep_recompute experts --output.dir "$BUILD/ep_model_mpi2_rc"
    stage ep_model_cmp_rc python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
      "$BUILD/ep_model_mpi2_rc/metrics.jsonl"
    stage ep_model_cmp_rc_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2/metrics.jsonl" "$BUILD/ep_model_mpi2_rc/metrics.jsonl"
    # train.ep_dispatch padded (no host sync in the MoE forward; needs ep_recompute experts):
    # the same rows reach the same expert GEMMs in the same order as in counts mode
    # (ep_model_check_mpi2's "= counts" and "arena padded" lines check the block bitwise), so
    # the curve must equal ep_model_mpi2_rc's exactly (cmp_padded_exact) and follow one GPU's
    stage ep_model_mpi2_padded mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
      --train.ep_recompute experts --train.ep_dispatch padded --output.dir "$BUILD/ep_model_mpi2_padded"
    stage ep_model_cmp_padded python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
      "$BUILD/ep_model_mpi2_padded/metrics.jsonl"
    stage ep_model_cmp_padded_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2_rc/metrics.jsonl" "$BUILD/ep_model_mpi2_padded/metrics.jsonl"
    # train.ep_chunks 2: each EP block pipelines its tokens in two chunks, the all-to-alls on a
    # comm stream beside the expert GEMMs (ep_model_check_mpi2's "chunks=" lines check the
    # block: out, dx and dtopk_w bit for bit, the expert weight gradients, summed over the
    # chunks in fp32 and rounded once, within NMSE 1e-6). Those gradients may differ from one
    # chunk's in a last bit now and then, so the curves are compared within bf16 noise limits,
    # against ep_model_mpi2 and one GPU's.
    stage ep_model_mpi2_chunks "${ovrun[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
      --data.micro_batch 8 --train.ep_chunks 2 --output.dir "$BUILD/ep_model_mpi2_chunks"
    stage ep_model_cmp_chunks python3 bench/compare_loss_curves.py "$BUILD/ep_model_mpi2/metrics.jsonl" \
      "$BUILD/ep_model_mpi2_chunks/metrics.jsonl"
    stage ep_model_cmp_chunks_1gpu python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
      "$BUILD/ep_model_mpi2_chunks/metrics.jsonl"
    # ZeRO-1 on the GPU (train.zero 1, dist/zero_cuda.h), two ranks on GPU 0 over MPI staging:
    # pure data parallelism (ep 1 x dp 2) against train.zero 0 on the same ranks, and ep 2 x dp 1
    # against ep_model_mpi2; with two ranks every sum is a + b, rounded to bf16 once either way,
    # so the losses and grad norms must be bit-identical (compare_loss_curves.py --exact). The
    # zero 1 run also checkpoints at EP_STEPS/2; ep_model_zero1_resume deletes its last
    # checkpoint, resumes from the middle (the per-rank moment shards) and must end identically.
    zrun=(mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0
          -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" "${run[@]}" --data.micro_batch 8)
    half=$(( ${EP_STEPS:-50} / 2 ))
    zdir="$BUILD/ep_model_dp2_zero1"
    stage ep_model_dp2 "${zrun[@]}" --train.ep 1 --output.dir "$BUILD/ep_model_dp2"
    stage ep_model_dp2_zero1 "${zrun[@]}" --train.ep 1 --train.zero 1 \
      --train.checkpoint_every "$half" --train.keep_checkpoints 2 --output.dir "$zdir"
    stage ep_model_cmp_zero1 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_dp2/metrics.jsonl" "$zdir/metrics.jsonl"
    stage ep_model_ep2_zero1 "${zrun[@]}" --train.ep 2 --train.zero 1 \
      --output.dir "$BUILD/ep_model_ep2_zero1"
    stage ep_model_cmp_ep2_zero1 python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/ep_model_mpi2/metrics.jsonl" "$BUILD/ep_model_ep2_zero1/metrics.jsonl"
    if [ -f "$zdir/metrics.jsonl" ] && [ "$half" -gt 0 ]; then
      cp "$zdir/metrics.jsonl" "$zdir/metrics-full.jsonl"
      rm -rf "$zdir/checkpoints/step-$(printf %07d "${EP_STEPS:-50}")"
      ls "$zdir/checkpoints"
      stage ep_model_zero1_resume "${zrun[@]}" --train.ep 1 --train.zero 1 \
        --train.checkpoint_every "$half" --train.keep_checkpoints 2 --output.dir "$zdir" \
        --output.resume true
      stage ep_model_cmp_zero1_resume python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
        "$zdir/metrics-full.jsonl" "$zdir/metrics.jsonl"
    fi
    fx=tests/fixtures/hf/tiny_a
    stage ep_model_fwd1 "$BUILD/automoe" forward --model $fx/model --batch $fx/reference.safetensors \
      --out "$BUILD/ep_fwd1.safetensors" --grads --device cuda --dtype bf16
    stage ep_model_fwd_mpi2 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      -x AUTOMOE_EP_TRANSPORT=mpi "$BUILD/automoe" forward --model $fx/model \
      --batch $fx/reference.safetensors --out "$BUILD/ep_fwd_mpi2.safetensors" --grads --device cuda \
      --dtype bf16 --ep 2
    stage ep_model_fwd_cmp python3 bench/compare_forward.py "$BUILD/ep_fwd_mpi2.safetensors" \
      "$BUILD/ep_fwd1.safetensors"
    ep_memsave_stages
    ep_zero3_stages
    # The same over CUDA IPC buffers (both ranks on GPU 0), after the stages above (a hang here
    # must not cost them): the transport alone (seconds, with its train.ep_chunks 2 and 3
    # checks; 180 s at most), then, only if it passed, the training run and its loss curve.
    f0=$fails
    STAGE_TIMEOUT=180 stage ep_model_check_ipc2 mpirun --allow-run-as-root --oversubscribe -np 2 \
      -x CUDA_VISIBLE_DEVICES=0 "$BUILD/ep_check" --transport ipc --no-bench --tokens 1024 \
      --hidden 512 --inter 256 --experts 16 --topk 4
    if [ "$fails" -eq "$f0" ]; then
      stage ep_model_ipc2 mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
        -x AUTOMOE_EP_TRANSPORT=ipc "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
        --output.dir "$BUILD/ep_model_ipc2"
      stage ep_model_cmp_ipc python3 bench/compare_loss_curves.py "$BUILD/ep_model_1gpu/metrics.jsonl" \
        "$BUILD/ep_model_ipc2/metrics.jsonl"
      # the same rows in the same places as MPI staging: bit for bit its curve, in counts mode
      # and in padded mode (ep_recompute experts, as ep_model_mpi2_padded)
      stage ep_model_cmp_ipc_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
        "$BUILD/ep_model_mpi2/metrics.jsonl" "$BUILD/ep_model_ipc2/metrics.jsonl"
      stage ep_model_ipc2_padded mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
        -x AUTOMOE_EP_TRANSPORT=ipc "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
        --train.ep_recompute experts --train.ep_dispatch padded --output.dir "$BUILD/ep_model_ipc2_padded"
      stage ep_model_cmp_ipc_padded_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
        "$BUILD/ep_model_mpi2_padded/metrics.jsonl" "$BUILD/ep_model_ipc2_padded/metrics.jsonl"
      # train.ep_chunks 2 over IPC (the comm stream's device waits beside the compute stream):
      # the same rows in the same places as MPI staging's chunks, so bit for bit its curve
      stage ep_model_ipc2_chunks mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
        -x AUTOMOE_EP_TRANSPORT=ipc "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
        --train.ep_chunks 2 --output.dir "$BUILD/ep_model_ipc2_chunks"
      stage ep_model_cmp_ipc_chunks_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
        "$BUILD/ep_model_mpi2_chunks/metrics.jsonl" "$BUILD/ep_model_ipc2_chunks/metrics.jsonl"
    else
      echo "device.sh: ep_model_check_ipc2 failed: no training run over IPC"
    fi
    # The kill drill on the trainer: rank 1 gets SIGKILL mid-run; the job must end non-zero,
    # not hang (mpirun stops rank 0, which waits in a collective).
    STAGE_TIMEOUT=120 stage_must_fail ep_model_kill mpirun --allow-run-as-root --oversubscribe -np 2 \
      -x CUDA_VISIBLE_DEVICES=0 -x AUTOMOE_EP_TRANSPORT=mpi bash bench/kill_rank.sh 1 "${KILL_AFTER:-20}" \
      "$BUILD/automoe" "${run[@]}" --train.steps 100000 --train.ep 2 --data.micro_batch 8 \
      --output.dir "$BUILD/ep_model_kill"
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
    if [ "$ngpu" -ge 2 ]; then
      ep_gpu2_stages
    else
      echo "device.sh: $ngpu GPU: the NCCL run of stage ep_model needs 2 GPUs (skipped)"
    fi
  else
    echo "device.sh: no $BUILD/automoe or no mpirun: no ep_model stage"
    fails=$((fails + 1))
  fi
else  # the parts of ep_model that also run alone
  for part in ep_memsave ep_zero3; do
    has "$part" || continue
    if [ -x "$BUILD/automoe" ] && command -v mpirun >/dev/null 2>&1; then
      "${part}_stages"
    else
      echo "device.sh: no $BUILD/automoe or no mpirun: no $part stage"
      fails=$((fails + 1))
    fi
  done
fi
if has ep_gpu2 && ! has ep_model; then
  if [ "$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")" -ge 2 ] && [ -x "$BUILD/automoe" ]; then
    stage ep_model_1gpu "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 --output.dir "$BUILD/ep_model_1gpu"
    stage ep_model_1gpu_ms "$BUILD/automoe" "${run[@]}" --data.micro_batch 16 \
      --train.memory_saving true --output.dir "$BUILD/ep_model_1gpu_ms"
    ep_gpu2_stages
  else
    echo "device.sh: stage ep_gpu2 needs 2 GPUs and $BUILD/automoe"
    fails=$((fails + 1))
  fi
fi
if has launch; then
  # torchrun (no MPI in the processes: ranks from RANK/WORLD_SIZE/LOCAL_RANK, host collectives
  # over the TCP backend, dist/comm_tcp.cpp) against mpirun on the same runs: on the CPU
  # (tiny-moe, ep 2) and on GPU 0 (the demo recipe, ep 2, both ranks on GPU 0: EP rows over
  # IPC, gradients host-staged through the TCP collectives). With two ranks every sum is a + b,
  # so the curves must be bit-identical to mpirun's.
  if [ -x "$BUILD/automoe" ] && command -v mpirun >/dev/null 2>&1 && python3 -c 'import torch' 2>/dev/null; then
    # One CPU thread per rank on both sides (AUTOMOE_THREADS=0 above means every core: mpirun
    # binds each rank to a core, torchrun does not, and the CPU backend's sums follow the
    # thread count, so the CPU curves would differ in the last bits, and 2 x 16 threads crawl).
    trun=(env AUTOMOE_THREADS=1 CUDA_VISIBLE_DEVICES=0
          python3 -m torch.distributed.run --standalone --nproc-per-node 2 --no-python)
    mrun=(mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 -x AUTOMOE_THREADS=1)
    cpu=(finetune --model.builtin tiny-moe --data.builtin addition --train.ep 2 --train.steps 20
         --train.log_every 5 --train.checkpoint_every 0)
    stage launch_cpu_mpi "${mrun[@]}" "$BUILD/automoe" "${cpu[@]}" --output.dir "$BUILD/launch_cpu_mpi"
    stage launch_cpu_torchrun "${trun[@]}" "$BUILD/automoe" "${cpu[@]}" \
      --output.dir "$BUILD/launch_cpu_torchrun"
    stage launch_cmp_cpu_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/launch_cpu_mpi/metrics.jsonl" "$BUILD/launch_cpu_torchrun/metrics.jsonl"
    stage launch_gpu_mpi "${mrun[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 --data.micro_batch 8 \
      --output.dir "$BUILD/launch_gpu_mpi"
    stage launch_gpu_torchrun "${trun[@]}" "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/launch_gpu_torchrun"
    stage launch_cmp_gpu_exact python3 bench/compare_loss_curves.py --exact loss,ce_loss,aux_loss,grad_norm \
      "$BUILD/launch_gpu_mpi/metrics.jsonl" "$BUILD/launch_gpu_torchrun/metrics.jsonl"
    # a rank that dies under torchrun: the job must end non-zero, soon
    stage_must_fail launch_kill "${trun[@]}" bash bench/kill_rank.sh 1 10 \
      "$BUILD/automoe" "${run[@]}" --train.steps 100000 --train.ep 2 --data.micro_batch 8 \
      --output.dir "$BUILD/launch_kill"
  else
    echo "device.sh: stage launch needs the CLI, mpirun and torch (skipped)"
  fi
fi
if has gpu2; then
  stage gpu2 bash bench/gpu2_checks.sh
fi
if has push; then
  if [ -x "$BUILD/ep_check" ] && [ -x "$BUILD/automoe" ] && command -v mpirun >/dev/null 2>&1; then
    pmpi=(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1
          -x NVSHMEM_DISABLE_NVLS=1 -x AUTOMOE_EP_TRANSPORT=ipc)
    pcheck=(--modes counts --recompute none --chunks 1 --tokens "${PUSH_TOKENS:-4096}" --iters 10)
    if [ "$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")" -lt 2 ]; then  # two processes, one GPU
      pmpi+=(--oversubscribe -x CUDA_VISIBLE_DEVICES=0)
      pcheck+=(--no-bench)
    fi
    stage push_ep_check "${pmpi[@]}" "$BUILD/ep_check" --transport ipc "${pcheck[@]}"
    # the reference run: the direct dispatch with the broadcast layout (opt-in, so forced here)
    # and its rows ahead of the routing; every run below takes the packed layout
    stage push_train_on "${pmpi[@]}" -x AUTOMOE_EP_BROADCAST=1 "$BUILD/automoe" "${run[@]}" \
      --train.ep 2 --data.micro_batch 8 --output.dir "$BUILD/push_train_on"
    # the demo recipe again with other settings (mpirun -x options), bit for bit against
    # push_train_on: push_train_<name>, then push_cmp_<name>_exact
    push_exact() {
      local name=$1
      shift
      stage "push_train_$name" "${pmpi[@]}" "$@" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
        --data.micro_batch 8 --output.dir "$BUILD/push_train_$name"
      stage "push_cmp_${name}_exact" python3 bench/compare_loss_curves.py \
        --exact loss,ce_loss,aux_loss,grad_norm \
        "$BUILD/push_train_$name/metrics.jsonl" "$BUILD/push_train_on/metrics.jsonl"
    }
    push_exact off -x AUTOMOE_EP_PUSH=0  # the pack and the rows' all-to-all after the plan
    # the combine read in place (AUTOMOE_EP_INPLACE) against its gather, and the IPC copies by
    # the SMs (AUTOMOE_IPC_SM_COPY) against the copy engines
    push_exact gather -x AUTOMOE_EP_INPLACE=0 -x AUTOMOE_IPC_SM_COPY=0
    # the compute stream at the default priority (AUTOMOE_CTX_PRIORITY=0) and the weight
    # gradients' grids on every SM of an H200 (AUTOMOE_EP_WGRAD_SMS=132); then their grids with
    # 8x more CTAs than SMs (each output tile is still one CTA's: the same sums)
    push_exact noprio -x AUTOMOE_CTX_PRIORITY=0 -x AUTOMOE_EP_WGRAD_SMS=132
    push_exact wgrid -x AUTOMOE_EP_WGRAD_SMS=1056
    # the packed layout with the rows pushed after the routing (AUTOMOE_EP_BROADCAST=0, the
    # default), against the broadcast layout with the rows ahead of it (forced on above)
    push_exact nobcast -x AUTOMOE_EP_BROADCAST=0
  else
    echo "device.sh: stage push needs $BUILD/ep_check, $BUILD/automoe and mpirun"
    fails=$((fails + 1))
  fi
fi
if has dispatch_bw; then
  # The forward's dispatch and combine bandwidth (ep_check --bench-only, a GPU per rank) over each
  # of DISPATCH_TRANSPORTS (default "ipc nccl") at DISPATCH_TOKENS tokens per rank (default
  # "4096 8192"), with an idle start and a queued one (--queued-start: the call's work enqueued
  # before the GPU reaches it, as in a step); each BW line also times ncclAlltoAll of its bytes.
  if [ -x "$BUILD/ep_check" ] && [ "$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")" -ge 2 ]; then
    for n in ${DISPATCH_TOKENS:-4096 8192}; do
      for tr in ${DISPATCH_TRANSPORTS:-ipc nccl}; do
        for q in "" --queued-start; do
          # shellcheck disable=SC2086
          stage "dispatch_bw_${tr}_N${n}${q:+_queued}" mpirun --allow-run-as-root -np 2 \
            -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 -x NVSHMEM_DISABLE_NVLS=1 \
            "$BUILD/ep_check" --transport "$tr" --modes counts --bench-only --tokens "$n" --iters 20 $q
        done
      done
    done
  else
    echo "device.sh: stage dispatch_bw needs $BUILD/ep_check and two GPUs"
    fails=$((fails + 1))
  fi
fi
if has halves; then
  # train.ep_halves (the two-half overlap) against the whole micro-batch: 50 steps of the demo
  # recipe with EP = 2 over IPC (two GPUs, or two processes on GPU 0), the same loss curve
  # within bf16 rounding (the halves' weight gradients add two sums, so not the same bits)
  if [ -x "$BUILD/automoe" ] && command -v mpirun >/dev/null 2>&1; then
    hmpi=(mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1
          -x NVSHMEM_DISABLE_NVLS=1 -x AUTOMOE_EP_TRANSPORT=ipc -x CUDA_DEVICE_MAX_CONNECTIONS=32)
    [ "$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")" -lt 2 ] &&
      hmpi+=(--oversubscribe -x CUDA_VISIBLE_DEVICES=0)
    stage halves_train_off "${hmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
      --data.micro_batch 8 --output.dir "$BUILD/halves_train_off"
    stage halves_train_on "${hmpi[@]}" "$BUILD/automoe" "${run[@]}" --train.ep 2 \
      --data.micro_batch 8 --train.ep_halves true --output.dir "$BUILD/halves_train_on"
    stage halves_cmp python3 bench/compare_loss_curves.py \
      "$BUILD/halves_train_off/metrics.jsonl" "$BUILD/halves_train_on/metrics.jsonl"
  else
    echo "device.sh: stage halves needs $BUILD/automoe and mpirun"
    fails=$((fails + 1))
  fi
fi
if has multi; then
  # Several GPUs: cuda_bench under mpirun (a rank per GPU, EP over all of them, transport auto)
  # beside native Transformers + FSDP2 (.deps/bench/hf_moe_fsdp.py, all GPUs), per layer count
  # in MULTI_LAYERS (default "12 24": W2; W4 is MULTI_LAYERS=48 MBS=1 on four GPUs). With one
  # GPU: two ranks on GPU 0 at small shapes, which checks the path, not its speed.
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
  MPIM=(mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1
        -x NVSHMEM_DISABLE_NVLS=1)
  if [ "$ngpu" -ge 2 ]; then
    for L in ${MULTI_LAYERS:-12 24}; do
      # shellcheck disable=SC2086
      stage "multi_automoe_L$L" "${MPIM[@]}" -np "$ngpu" "$BUILD/cuda_bench" --layers "$L" \
        --seq "${SEQ:-4096}" --mbs "${MBS:-2}" ${BENCH_ARGS:-}
      # train.ep_chunks 2 beside it (the all-to-alls pipelined with the expert GEMMs): the
      # phases fwd_ep_* / bwd_ep_* are then the transport calls alone, overlapping the GEMMs
      # shellcheck disable=SC2086
      [ "${MULTI_CHUNKS:-1}" = 0 ] ||
        stage "multi_automoe_L${L}_chunks2" "${MPIM[@]}" -np "$ngpu" "$BUILD/cuda_bench" --layers "$L" \
          --seq "${SEQ:-4096}" --mbs "${MBS:-2}" --ep-chunks 2 ${BENCH_ARGS:-}
      # train.ep_halves beside it (the two-half overlap; needs the IPC transport)
      # shellcheck disable=SC2086
      [ "${MULTI_HALVES:-1}" = 0 ] ||
        stage "multi_automoe_L${L}_halves" "${MPIM[@]}" -np "$ngpu" -x AUTOMOE_EP_TRANSPORT=ipc \
          -x CUDA_DEVICE_MAX_CONNECTIONS=32 \
          "$BUILD/cuda_bench" --layers "$L" --seq "${SEQ:-4096}" --mbs "${MBS:-2}" --ep-halves \
          ${BENCH_ARGS:-}
      if [ -f .deps/bench/hf_moe_fsdp.py ] && [ "${MULTI_FSDP:-1}" != 0 ]; then
        stage "multi_fsdp_L$L" env LAYERS="$L" SEQ="${SEQ:-4096}" MBS="${MBS:-2}" STEPS=8 WARM=3 \
          NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
          PYTHONPATH=.deps/bench python3 .deps/bench/hf_moe_fsdp.py
      fi
    done
  else
    stage multi_smoke "${MPIM[@]}" --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 "$BUILD/cuda_bench" \
      --layers 2 --seq 1024 --mbs 1 --warmup 1 --steps 2
    stage multi_smoke_padded "${MPIM[@]}" --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      "$BUILD/cuda_bench" --layers 2 --seq 1024 --mbs 1 --warmup 1 --steps 2 --ep-recompute experts \
      --ep-dispatch padded
    stage multi_smoke_chunks2 "${MPIM[@]}" --oversubscribe -np 2 -x CUDA_VISIBLE_DEVICES=0 \
      "$BUILD/cuda_bench" --layers 2 --seq 1024 --mbs 1 --warmup 1 --steps 2 --ep-chunks 2
  fi
fi
if has profile; then
  # Nsight Compute on one W1-shaped step (PROFILE_LAYERS layers, default 1): every kernel's time,
  # its SM throughput and its DRAM throughput as % of the device's peak (its own roofline).
  if command -v ncu >/dev/null 2>&1; then
    stage profile ncu --clock-control none --csv --print-units base \
      --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed \
      "$BUILD/cuda_bench" --layers "${PROFILE_LAYERS:-1}" --seq "${SEQ:-4096}" --mbs "${MBS:-2}" --warmup 0 --steps 1
    python3 bench/kernel_table.py "$BUILD/profile.log" "${PROFILE_TOP:-10}" > "$BUILD/kernels.log" && cat "$BUILD/kernels.log"
    LOGS+=("$BUILD/kernels.log")
  else
    echo "device.sh: no ncu on this machine: no kernel profile"
  fi
fi
if has baseline; then
  if [ -f .deps/bench/hf_moe_baseline.py ]; then
    # Parameters are created on the GPU (torch's default device) instead of on the CPU and then
    # moved: the same model, step and timing, minutes less of random init on the host.
    stage baseline env LAYERS="${LAYERS:-12}" SEQ="${SEQ:-4096}" MBS="${MBS:-2}" STEPS=8 WARM=3 \
      IMPLS="${IMPLS:-grouped_mm}" python3 -c "import runpy, sys, torch; torch.set_default_device('cuda'); \
sys.argv = ['hf_moe_baseline.py']; runpy.run_path('.deps/bench/hf_moe_baseline.py', run_name='__main__')"
  else
    echo "device.sh: no .deps/bench/hf_moe_baseline.py (run bench/fetch_deps.sh here first)"
    fails=$((fails + 1))
  fi
fi

# The short table, last.
echo
echo "== device.sh summary (exit $fails) =="
printf '%s\n' "${SUMMARY[@]}"
has profile && [ -f "$BUILD/kernels.log" ] && head -n 14 "$BUILD/kernels.log"
if [ -f "$BUILD/op_check.log" ] && has ops; then
  grep -E "^FAIL" "$BUILD/op_check.log" | head -n 20
  grep -E "cuda_op_check: [0-9]+ failures" "$BUILD/op_check.log"
fi
if has sweep; then  # the fastest correct configuration per GEMM, and what went wrong
  if grep -q "^BEST " "$BUILD/sweep.log" 2>/dev/null; then
    grep -E "^BEST " "$BUILD/sweep.log"
  else  # cut short (DEADLINE, STAGE_TIMEOUT): the GEMMs it finished
    grep -E "^-- BEST " "$BUILD/sweep.log" 2>/dev/null | sed 's/^-- //'
    echo "sweep: no final summary (cut short?); rerun the rest with SWEEP_ARGS=\"--only GEMM\""
  fi
  grep -E "WRONG|FAILED|skip:" "$BUILD/sweep.log" 2>/dev/null | head -n 20
fi
if has ep; then
  cat "$BUILD"/ep_*.log 2>/dev/null | grep -E "^FAIL|^BW|^ep_check .*checks|error" | head -n 40
fi
if has parity; then
  grep -E "HF bf16 vs fp32" "$BUILD/hf_bf16.log" 2>/dev/null
  grep -E "logits rel-L2|gradients, worst|^FAIL|loss curves|failed check|memory-saving vs" "$BUILD/parity.log" | head -n 48
fi
if has ep_model || has ep_memsave || has ep_zero3 || has ep_gpu2; then
  for f in "$BUILD"/ep_model_cmp_*.log "$BUILD"/ep_model_fwd_cmp.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log):" && grep -hE "^(ok|FAIL)" "$f"
  done
  grep -hE "expert parallel on the GPU|share .* GPU|error" "$BUILD"/ep_model_*.log 2>/dev/null | sort -u | head -n 8
  for f in "$BUILD"/ep_model_{mpi2,ms_mpi2,mpi2_noclip,ms_mpi2_noclip,ipc2,nccl2,dp2_zero3,ep2_zero3}.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log): $(grep -m1 -hE "replicas identical|error" "$f" \
      || echo "no replica check line")"
  done
fi
if has launch; then
  for f in "$BUILD"/launch_cmp_*.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log):" && grep -hE "^(ok|FAIL)" "$f"
  done
  grep -hE "replicas identical|automoe: error|torchrun|launcher" "$BUILD"/launch_*.log 2>/dev/null | sort -u | head -n 12
fi
if has halves; then  # the two halves against the whole micro-batch
  [ -f "$BUILD/halves_cmp.log" ] && echo "halves_cmp:" && grep -hE "^(ok|FAIL)" "$BUILD/halves_cmp.log"
  grep -hE "automoe: error|error:" "$BUILD"/halves_train_*.log 2>/dev/null | sort -u | head -n 4
fi
if has dispatch_bw; then  # rank 0's lines: dispatch and combine, and where the dispatch's time goes
  grep -h "^BW .* rank 0/" "$BUILD"/dispatch_bw_*.log 2>/dev/null | sed 's/(payload[^)]*) //'
fi
if has multi; then  # per GPU, automoe against Transformers + FSDP2 in this call
  python3 - "$BUILD" <<'PY'
import glob, json, os, re, sys
def res(path):
    try:
        return [json.loads(l[7:]) for l in open(path) if l.startswith("RESULT ")]
    except OSError:
        return []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "multi_*.log"))):
    for r in res(f):
        name = os.path.basename(f)[:-4]
        fb = r.get("fwd_bwd_tok_per_s", r.get("fwd_bwd_tok_per_s_per_gpu"))
        tf = r.get("fwd_bwd_tflops", r.get("fwd_bwd_tflops_per_gpu"))
        st = r.get("tok_per_s", r.get("tok_per_s_per_gpu"))
        pk = r.get("peak_used_GiB", r.get("peak_GiB"))
        print(f"{name:22s} fwd+bwd {fb:>8} tok/s/GPU {tf:>6} TFLOP/s  step {st:>8} tok/s/GPU  peak {pk} GiB")
        ph = r.get("phases_ms")
        if ph:  # one step's phases (ms, rank 0); fwd_ep_* are inside fwd_mlp
            print(f"{'':22s} ms: " + ", ".join(f"{k} {v}" for k, v in sorted(ph.items())))
PY
fi
if has cli; then
  grep -hE "^(ok|FAIL) " "$BUILD/cli_forward.log" 2>/dev/null
  for mode in default memsave; do
    echo "cli finetune $mode: $(grep -E "step +[0-9]+" "$BUILD/cli_finetune_$mode.log" 2>/dev/null | tail -n 1)"
    grep -E "held-out accuracy" "$BUILD/cli_finetune_$mode.log" 2>/dev/null
  done
fi
python3 - "$BUILD/bench_w1.log" "$BUILD/baseline.log" "$BUILD/bench_w1_memsave.log" "$BUILD/bench_w1_unfused.log" <<'PY'
import json, sys
def results(path):
    try:
        return [json.loads(l[7:]) for l in open(path) if l.startswith("RESULT ")]
    except OSError:
        return []
ours, hf, ms, fu = results(sys.argv[1]), results(sys.argv[2]), results(sys.argv[3]), results(sys.argv[4])
keys = ("fwd_bwd_tok_per_s", "fwd_bwd_tflops", "tok_per_s", "model_tflops")
rows = [("automoe", r) for r in ours] + [("automoe unfused norms", r) for r in fu] + \
       [("automoe memory-saving", r) for r in ms] + \
       [("transformers " + r.get("impl", ""), r) for r in hf]
if rows:
    print(f"{'W1':24s} {'fwd+bwd tok/s':>14s} {'TFLOP/s':>8s} {'step tok/s':>11s} {'TFLOP/s':>8s} {'peak GiB':>9s}")
    for name, r in rows:
        peak = r.get("peak_used_GiB", r.get("peak_GiB", "?"))
        print(f"{name:24s} " + " ".join(f"{str(r.get(k, '?')):>{w}s}" for k, w in zip(keys, (14, 8, 11, 8))) + f" {str(peak):>9s}")
if ours and hf:
    best = max(hf, key=lambda r: r["fwd_bwd_tok_per_s"])
    o = ours[-1]
    print(f"ratio vs transformers ({best.get('impl')}): fwd+bwd {o['fwd_bwd_tok_per_s'] / best['fwd_bwd_tok_per_s']:.2f}x, "
          f"step {o['tok_per_s'] / best['tok_per_s']:.2f}x, peak memory {o.get('peak_used_GiB', 0) / best['peak_GiB']:.2f}x")
    for o in ms:  # its fwd+bwd already holds AdamW: the step is the fair comparison
        print(f"memory-saving vs transformers: step {o['tok_per_s'] / best['tok_per_s']:.2f}x, fwd+bwd(+AdamW) "
              f"{o['fwd_bwd_tok_per_s'] / best['fwd_bwd_tok_per_s']:.2f}x, peak memory {o.get('peak_used_GiB', 0) / best['peak_GiB']:.2f}x")
PY
# one archive: the device tool brings back at most 8 files
[ -n "${OUT:-}" ] && tar czf "$OUT/device-logs.tgz" "${LOGS[@]}" 2>/dev/null
exit "$fails"
