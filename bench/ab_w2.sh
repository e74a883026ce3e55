# bench/ab_w2.sh: A/B runs of cuda_bench at W2 on two GPUs (EP = 2 over IPC) in one device call:
# builds cuda_bench through bench/device.sh, then runs the variants in AB (default "default
# halves") and prints one line each (fwd+bwd tok/s per GPU, TFLOP/s, the phases, loss, grad
# norm). Variants (24 layers, micro-batch 2 unless said):
#   default, halves   the whole micro-batch; train.ep_halves (both trace the last step's
#                     timeline with AUTOMOE_TRACE into $OUT/tr_*)
#   default_nt, halves_nt   the same, untraced
#   default4, halves4       12 layers, micro-batch 4
#   noprio            AUTOMOE_CTX_PRIORITY=0 (the compute stream at the weight gradients'
#                     priority, as before 2026-11-30), traced into $OUT/tr_noprio
#   bcast             AUTOMOE_EP_BROADCAST=1: the broadcast layout (every token to every rank),
#                     its rows sent ahead of the routing by the copy engines (traced into
#                     $OUT/tr_bcast)
#   bcast_sm          the same with the rows ahead by the SMs' copy kernel (AUTOMOE_EP_AHEAD_SM=1)
#   wsms<N>           AUTOMOE_EP_WGRAD_SMS=N: the weight gradients' persistent grids of N CTAs
#                     (the side stream; default: the SMs but 8, the compute stream's the rest;
#                     N above the SMs: more CTAs than fit, each retiring after fewer tiles)
#   default1, halves1 micro-batch 1: the whole sequence; train.ep_halves' sequence split
# AB_FLAGS: more cuda_bench flags for every variant (e.g. "--warmup 0 --steps 1": the first
# step's loss and grad norm, before any optimizer step, to compare numerics).
# Speed figures from it are A/B only: no Transformers run beside them (bench/device.sh's multi
# stage does that). The two-half overlap's measurements came from it (bench/RESULTS.md).
#   AB="default noprio" bash bench/ab_w2.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TARGETS="cuda_bench" STAGES="none" bash bench/device.sh > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
M="mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x TORCH_SYMM_MEM_DISABLE_MULTICAST=1 -x NVSHMEM_DISABLE_NVLS=1 -x AUTOMOE_EP_TRANSPORT=ipc -x CUDA_DEVICE_MAX_CONNECTIONS=32"
run() {  # name, extra env (k=v,...), cuda_bench flags
  local envs=(); IFS=, read -r -a kv <<< "$2"; for e in "${kv[@]}"; do [ -n "$e" ] && envs+=(-x "$e"); done
  # shellcheck disable=SC2086
  timeout 150 $M "${envs[@]}" build-device/cuda_bench --seq 4096 $3 ${AB_FLAGS:-} > "$OUT/ab_$1.log" 2>&1
  python3 - "$OUT/ab_$1.log" "$1" <<'PY'
import json, sys
r = [json.loads(l[7:]) for l in open(sys.argv[1]) if l.startswith("RESULT ")]
if not r: print(f"{sys.argv[2]}: no result"); sys.exit()
r = r[0]; p = r["phases_ms"]
print(f"{sys.argv[2]:28s} {r['fwd_bwd_tok_per_s']:>8.0f} tok/s {r['fwd_bwd_tflops']:>6} TF  "
      f"fwd {p['fwd_layers']:.1f} bwd {p['bwd_layers']:.1f} lm {p['lm_head_ce']:.1f}  "
      f"loss {r['loss']!r} grad_norm {r['grad_norm']!r}")
PY
}
for v in ${AB:-default halves}; do
  case $v in
    default) run default "AUTOMOE_TRACE=$OUT/tr_default" "--layers 24 --mbs 2" ;;
    halves) run halves "AUTOMOE_TRACE=$OUT/tr_halves" "--layers 24 --mbs 2 --ep-halves" ;;
    default4) run default4 "" "--layers 12 --mbs 4" ;;
    halves4) run halves4 "" "--layers 12 --mbs 4 --ep-halves" ;;
    default_nt) run default_nt "" "--layers 24 --mbs 2" ;;
    halves_nt) run halves_nt "" "--layers 24 --mbs 2 --ep-halves" ;;
    noprio) run noprio "AUTOMOE_CTX_PRIORITY=0,AUTOMOE_TRACE=$OUT/tr_noprio" "--layers 24 --mbs 2" ;;
    bcast) run bcast "AUTOMOE_EP_BROADCAST=1,AUTOMOE_TRACE=$OUT/tr_bcast" "--layers 24 --mbs 2" ;;
    bcast_sm) run bcast_sm "AUTOMOE_EP_BROADCAST=1,AUTOMOE_EP_AHEAD_SM=1" "--layers 24 --mbs 2" ;;
    wsms*) run "$v" "AUTOMOE_EP_WGRAD_SMS=${v#wsms}" "--layers 24 --mbs 2" ;;
    default1) run default1 "" "--layers 24 --mbs 1" ;;
    halves1) run halves1 "" "--layers 24 --mbs 1 --ep-halves" ;;
    *) echo "ab_w2.sh: unknown variant $v (default halves default4 halves4 default_nt halves_nt noprio bcast bcast_sm wsms<N> default1 halves1)"; exit 2 ;;
  esac
done
