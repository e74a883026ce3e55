"""bench/memory_plan.py: GPU memory per rank of a Qwen3-MoE training layout, computed from the
model config and the layout with the CUDA model's own accounting (src/model/qwen3_moe_cuda.cpp:
its parameter/gradient/moment arenas and its planned activation arena, buffer by buffer).

    python3 bench/memory_plan.py --preset w1                      # check: the measured W1 arenas
    python3 bench/memory_plan.py --preset qwen3-30b-a3b --ep 4 --world 4 --seq 4096 --mbs 1
    python3 bench/memory_plan.py --config path/to/config.json --ep 8 --world 8
    python3 bench/memory_plan.py --preset w1 --memory-saving       # train.memory_saving
    python3 bench/memory_plan.py --preset qwen3-30b-a3b --ep 4 --world 8 --mbs 1 --zero 3
    python3 bench/memory_plan.py --preset qwen3-30b-a3b --ep 4 --mbs 1 --ep-recompute experts

Layout: experts split over `ep` ranks; everything else data-parallel over `world` ranks, its
AdamW moments replicated or sharded (--zero 1: what the GPU's ZeRO-1 allocates), gradients too
(--zero 2: a projection, ZeRO-2 is CPU-only so far), parameters too (--zero 3: what the GPU's
ZeRO-3 allocates, dist/zero3_cuda.h: the weights are this rank's shard plus ZERO3_WINDOWS
windows of the largest block, the gradients the shard plus ZERO3_GRAD_WINDOWS windows (the
prefetch's two, block b's gradients in slot b % 2 while block b+1's are reduced), plus one round
buffer). Precision: the
default policy, bf16 weights, gradients and moments. Activations: one micro-batch of mbs x seq
tokens per rank. With EP (ep > 1) the model keeps no expert rows of its own; the EP block
(src/dist/expert_parallel_cuda.h, dist/ep_arena.h) adds
  ep_arena    every MoE layer's saved state (received rows, routing, gate|up and expert
              outputs), carved per step by the received counts from one arena of
              --ep-capacity (train.ep_capacity, default 2) x the balanced load: per layer
              R = P*N*(1 - C(E-E/P, K)/C(E, K)) received rows and N*K expert rows.
              --ep-recompute (train.ep_recompute): outputs drops the expert outputs from each
              carve, experts drops gate|up too (the backward recomputes them).
              --ep-dispatch padded (train.ep_dispatch): no host sync, so every carve is the
              worst case (ep_arena_padded_bytes: layers x the worst carve; no capacity); the
              trainer requires --ep-recompute experts with it
  ep_scratch  the per-call buffers, for the worst routing of ONE layer (P*N rows,
              P*N*min(K, E/P) expert rows): the expert GEMMs' inputs and gradients, send and
              receive staging (send rows: N*min(P, K) counts, P*N padded); with
              --ep-recompute experts also one gate|up buffer
Every layout adds workspace_context (1.25 GiB: the ops' workspace and the CUDA context) and, with
several ranks, comm_buffers: 0.5 GiB per peer (NCCL communicators, IPC staging, the gradient
reducer's buckets), fitted to the measured peaks on 2 and 4 H200s (bench/RESULTS.md: within
0.15 GiB of every one); beyond 4 ranks an extrapolation, capped at the 7 peers of one node.
--memory-saving: train.memory_saving (model/qwen3_moe_cuda.h): no gradient arena (a scratch of
the largest tensor), one shared set of the recomputed activations instead of one per layer.
"""
import argparse, json, math

PRESETS = {
    # Qwen3-30B-A3B layer shapes with 12 layers: workload W1 (ARCHITECTURE.md)
    "w1": dict(hidden_size=2048, num_hidden_layers=12, num_attention_heads=32, num_key_value_heads=4,
               head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
               intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False, mlp_only_layers=[],
               decoder_sparse_step=1),
    # the real model: Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936,
                          tie_word_embeddings=False, mlp_only_layers=[], decoder_sparse_step=1),
}
GiB = 2 ** 30
# ZeRO-3 on the GPU (dist/zero3_cuda.h): two parameter windows, the running block's and the
# next one's (a layer's forward ends with the next layer's ln1 or ln_f, fused with its residual
# add; the next one is gathered while the running one computes); two gradient windows with the
# prefetch (the default; model/qwen3_moe_cuda.cpp, State::z3_prefetch): a block's backward
# writes one while the block after it is reduced out of the other. 1 with
# AUTOMOE_ZERO3_PREFETCH=0 or over MPI staging.
ZERO3_WINDOWS = 2
ZERO3_GRAD_WINDOWS = 2


def is_moe(c, l):
    step = c.get("decoder_sparse_step", 1) or 1
    return l not in c.get("mlp_only_layers", []) and c["num_experts"] > 0 and (l + 1) % step == 0


def ep_align(b):
    return (int(b) + 255) // 256 * 256


EP_RECOMPUTE = ("none", "outputs", "experts")  # dist::EpRecompute
EP_DISPATCH = ("counts", "padded")  # dist::EpMode, train.ep_dispatch


def ep_carve(N, P, R, M, H, I, K, El, rc="none"):
    """bytes of one layer's saved state on one rank (dist/ep_arena.cpp, ep_saved_layout)"""
    parts = [N * P * 4, (El + 1) * 4, R * K * 4, R * K * 4, R * H * 2]
    if rc != "experts":
        parts.append(M * 2 * I * 2)  # gu
    if rc == "none":
        parts.append(M * H * 2)  # ys
    return sum(ep_align(b) for b in parts)


def ep_buffers(N, P, H, I, E, K, layers, capacity, rc="none", dispatch="counts", chunks=1):
    """(arena, worst-case arena, scratch) bytes of the EP block (dist/ep_arena.cpp, EpMoeScratch)"""
    El = E // P
    none = 1.0
    for i in range(K):
        none *= (E - El - i) / (E - i) if E - El - i > 0 else 0.0
    rows, picks = P * N * (1 - none), N * K
    expected = ep_carve(N, P, math.ceil(rows), math.ceil(picks), H, I, K, El, rc)
    worst = layers * ep_carve(N, P, P * N, P * N * min(K, El), H, I, K, El, rc)
    arena = min(worst, ep_align(math.ceil(capacity * expected * layers)))
    if dispatch == "padded":  # ep_arena_padded_bytes
        arena = worst
    # train.ep_chunks C: the expert buffers for one chunk of ceil(N/C) tokens, the send/receive
    # buffers once per chunk (about C = 1's in all), and C > 1 adds the fp32 weight-gradient
    # accumulators of one layer's local experts (EpMoeScratch::acc_gu, acc_down); the arena's
    # C carves per layer add only offsets and alignment (not counted)
    Nc = -(-N // chunks)
    Mcap, Rcap = P * Nc * min(K, El), P * Nc
    Scap = Rcap if dispatch == "padded" else Nc * min(P, K)
    scratch = Mcap * (H + I + H + I + 2 * I) * 2  # xs, act, dys, dact, dgu
    scratch += Mcap * 2 * I * 2 if rc == "experts" else 0  # gu, recomputed
    scratch += chunks * (Nc * P * 4 + Scap * H * 2 + 2 * Scap * K * 4 + 2 * Rcap * K * 4 + Rcap * H * 2)
    scratch += El * 3 * I * H * 4 if chunks > 1 else 0
    return arena, worst, scratch


def plan(c, ep, world, seq, mbs, zero, ep_capacity=2.0, memsave=False, ep_recompute="none",
         ep_dispatch="counts", ep_chunks=1):
    H, L, nH, nKV, D = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, K, I, F, V = c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"], c["intermediate_size"], c["vocab_size"]
    moe = [is_moe(c, l) for l in range(L)]
    M = sum(moe)
    assert E % ep == 0, f"{E} experts do not split over ep={ep}"
    # ---- parameters (elements): experts split over ep, the rest on every rank
    attn = H * nH * D + 2 * H * nKV * D + nH * D * H + 2 * H + 2 * D  # q,k,v,o, ln1, ln2, q/k norm
    dense = sum(attn + (H * E if moe[l] else 3 * H * F) for l in range(L))
    dense += V * H * (1 if c.get("tie_word_embeddings") else 2) + H  # embeddings, lm_head, ln_f
    experts = sum(3 * H * I * E for l in range(L) if moe[l])
    experts_rank = experts // ep
    # ZeRO-3's blocks (model/qwen3_moe.h, block_params): embedding, each layer with this rank's
    # experts, final norm + lm_head (tied: wte gathered again)
    blocks = [V * H, H + V * H] + [attn + (H * E + 3 * H * I * E // ep if moe[l] else 3 * H * F) for l in range(L)]
    window = max(blocks)
    # ZeRO (dist/zero_partition.h): the dense part sharded over the world, this rank's experts
    # over its DP group (world / ep ranks), each ceil(numel / ranks). ZeRO-1 (built on the GPU:
    # dist/zero_cuda.h) shards the AdamW moments and keeps the full-size gradient arena, plus one
    # NCCL bucket of min(2^24, ranks x shard) bf16 elements; ZeRO-2 (a projection on the GPU)
    # would shard the gradients too.
    dp = world // ep
    b = 2  # bf16
    shard = lambda n, r: -(-n // r)  # ceil
    if zero >= 3:  # the shard is the truth; the blocks in use are gathered into a workspace
        w = (shard(dense, world) + shard(experts_rank, dp) + ZERO3_WINDOWS * window) * b
    else:
        w = (dense + experts_rank) * b
    if zero >= 1:
        m = 2 * (shard(dense, world) + shard(experts_rank, dp)) * b
    else:
        m = 2 * (dense + experts_rank) * b
    if zero >= 2:
        g = (shard(dense, world) + shard(experts_rank, dp)) * b
        if zero == 3:  # blocks' gradients, whole, until their reduce; + the round buffer
            g += ZERO3_GRAD_WINDOWS * window * b  # (DeviceZero3: the largest owner part, <= 2^24)
            g += min(2 ** 24, window, max(shard(dense, world), shard(experts_rank, dp))) * b
    else:
        g = (dense + experts_rank) * b
        if zero == 1:  # the bucket of the largest group that communicates
            g += max([min(2 ** 24, r * shard(n, r)) for n, r in ((dense, world), (experts_rank, dp)) if r > 1] or [0]) * b
    if memsave:  # the gradient scratch: the largest tensor (an expert block or lm_head), + biases
        g = (max(2 * H * I * E // ep, V * H) + H) * b
        if ep > 1:  # + the EP block's down gradient, written with gate|up's in one call
            g += H * I * (E // ep) * b
    # ---- activations: the CUDA model's plan for N tokens (R = N*K expert rows; with EP the
    # EP block keeps them instead, below)
    N = mbs * seq
    R = 0 if ep > 1 else N * K
    # recomputable (per layer, or one shared set with memsave): ln1, q, k (+ rstds), ln2, gate|up,
    # expert outputs (memsave: in temporaries); kept per layer: q_pre, k_pre, v, attention out
    # and lse, x_mid, routing
    def recomputable(moe_l, dense_l, ys):
        a = N * H * 2 + N * 4 + N * nH * D * 2 + N * nH * 4 + N * nKV * D * 2 + N * nKV * 4
        a += N * H * 2 + N * 4
        a += max(R * 2 * I * 2 if moe_l else 0, N * 2 * F * 2 if dense_l else 0)
        return a + ((R * H * 2 + R * H * 2 + R * I * 2) if moe_l and ys else 0)  # ys, xs, act
    per_layer = []
    for l in range(L):
        a = 0 if memsave else recomputable(moe[l], not moe[l], True)
        a += N * nH * D * 2 + 2 * N * nKV * D * 2                  # q_pre, k_pre, v
        a += N * nH * D * 2 + mbs * nH * seq * 4 + N * H * 2       # attention out, lse, x_mid
        if moe[l]:
            a += N * K * 4 + (0 if ep > 1 else N * K * 4 + (E + 1) * 4)  # topk weights, rows, offsets
        per_layer.append(a)
    if memsave:
        per_layer.append(recomputable(M > 0, M < L, False))
    chunk = max(64, min(2048, (512 << 20) // (2 * V)) // 64 * 64)
    fixed = (L + 1) * N * H * 2 + M * N * E * 4 + M * N * K * 4 + 2 * N * H * 2 + N * 8 + N * 40
    Rt = R if memsave else 0  # expert rows in the temporaries (the default mode keeps xs, act)
    fwd_tmp = N * E * 2 + Rt * H * 2 + max(Rt * I, N * F) * 2 + N * H * 2 + min(chunk, N) * V * 2 + N * H * 2
    bwd_tail = max(R * I, N * F) * 2 + max(R * 2 * I, N * 2 * F) * 2 + N * E * 2 + N * K * 4 + M * N * E * 4
    rot = 0 if D % 2 == 0 and D <= 256 else 1  # dqn, dkn: only without the fused q/k backward
    bwd_tmp = (N * H + (2 + rot) * N * nH * D + (2 + rot) * N * nKV * D) * 2 + (R + Rt) * H * 2 \
        + max(Rt * I, N * F) * 2 \
        + bwd_tail + max(0, R * H * 2 - bwd_tail)  # memsave's expert outputs overlay the tail
    act = sum(per_layer) + fixed + max(fwd_tmp, bwd_tmp)
    ep_arena, ep_worst, ep_scratch = ep_buffers(N, ep, H, I, E, K, M, ep_capacity, ep_recompute,
                                                ep_dispatch, ep_chunks) \
        if ep > 1 else (0, 0, 0)
    ws = 0.25 * GiB + 1.0 * GiB  # measured op workspace (W1) + CUDA context, cuBLAS/cuDNN handles
    # Several ranks: NCCL communicators (their per-peer buffers), the IPC staging, the gradient
    # reducer's buckets. Fitted to the measured peaks (bench/RESULTS.md): the plan without this
    # term was low by 0.43 / 0.41 GiB at 2 ranks (W2, 12 / 24 layers) and 1.35-1.61 GiB at 4
    # (issue 7's five runs), i.e. about 0.5 GiB per peer. Beyond 4 ranks of one node it is an
    # extrapolation (capped at the 7 peers of an 8-GPU node: across nodes NCCL's buffers follow
    # its rings and trees, not every rank).
    comm = 0.5 * GiB * (min(world, 8) - 1)
    return dict(params_B=(dense + experts) / 1e9, dense_B=dense / 1e9, experts_rank_B=experts_rank / 1e9,
                weights=w, grads=g, moments=m, activations=act, ep_arena=ep_arena, ep_scratch=ep_scratch,
                ep_arena_worst=ep_worst, workspace_context=ws, comm_buffers=comm,
                total=w + g + m + act + ep_arena + ep_scratch + ws + comm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--config", help="a Hugging Face config.json (qwen3_moe)")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--world", type=int, default=0, help="ranks (default: ep)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--ep-capacity", type=float, default=2.0,
                    help="train.ep_capacity: the EP arena over the balanced load (ep > 1)")
    ap.add_argument("--ep-recompute", choices=EP_RECOMPUTE, default="none",
                    help="train.ep_recompute: what the EP backward recomputes instead of keeping (ep > 1)")
    ap.add_argument("--ep-dispatch", choices=EP_DISPATCH, default="counts",
                    help="train.ep_dispatch: counts (one host sync per MoE layer) or padded (none; "
                         "the EP arena at the worst case; the trainer needs --ep-recompute experts)")
    ap.add_argument("--ep-chunks", type=int, default=1,
                    help="train.ep_chunks: token chunks of the EP block (ep > 1; adds one layer's "
                         "local expert weight gradients in fp32 when > 1)")
    ap.add_argument("--gpu-gib", type=float, default=139.8, help="usable GPU memory (H200: 139.8 GiB)")
    ap.add_argument("--memory-saving", action="store_true", help="train.memory_saving")
    a = ap.parse_args()
    if bool(a.preset) == bool(a.config):
        ap.error("give one of --preset or --config")
    c = dict(PRESETS[a.preset]) if a.preset else json.load(open(a.config))
    world = a.world or a.ep
    if a.ep_capacity <= 0:
        ap.error("--ep-capacity must be positive")
    if not 1 <= a.ep_chunks <= 8:
        ap.error("--ep-chunks must be between 1 and 8 (train.ep_chunks)")
    p = plan(c, a.ep, world, a.seq, a.mbs, a.zero, a.ep_capacity, a.memory_saving, a.ep_recompute,
             a.ep_dispatch, a.ep_chunks)
    print(f"{a.preset or a.config}: {p['params_B']:.2f}B parameters ({p['dense_B']:.2f}B outside the experts), "
          f"EP={a.ep} over {world} ranks, ZeRO-{a.zero}, {a.mbs} x {a.seq} tokens per rank, "
          + ((f"EP arena {a.ep_capacity:g} x the balanced load" if a.ep_dispatch == "counts"
              else "ep_dispatch padded: the EP arena at the worst case")
             + f", ep_recompute {a.ep_recompute}" if a.ep > 1 else "one GPU's experts")
          + (", memory-saving mode" if a.memory_saving else ""))
    for k in ("weights", "grads", "moments", "activations", "ep_arena", "ep_scratch", "workspace_context",
              "comm_buffers", "total"):
        print(f"  {k:18s} {p[k] / GiB:7.2f} GiB")
    if a.ep > 1:
        print(f"  (the EP arena at the worst routing, every token of the group on this rank: "
              f"{p['ep_arena_worst'] / GiB:.2f} GiB)")
    verdict = "fits" if p["total"] / GiB <= a.gpu_gib else "does NOT fit"
    print(f"  per GPU {p['total'] / GiB:.1f} GiB of {a.gpu_gib:g} GiB: {verdict}")


if __name__ == "__main__":
    main()
