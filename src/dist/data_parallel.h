// dist/data_parallel.h: what makes N ranks train like one process on the concatenated batch:
// the load-balancing loss over the global batch, gradient all-reduce (dense over the world,
// experts over the ranks holding the same experts) and the global gradient norm.
// Every function is collective over the groups it names; with world size 1 none communicates.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/process_group.h"
#include "model/params.h"

namespace automoe::dist {

// aux = E * sum_{k,e} f[k,e] * P[e] as ops' aux_loss_fwd on the batch of all ranks together:
// counts of picks and sums of probabilities are all-reduced over `world`. Fills fsum[E]
// (sum_k f[k,e], global) and *n_global (rows of all ranks) for the backward.
float aux_loss_global_fwd(double* fsum, double* n_global, const float* probs /*[N,E]*/,
                          const int32_t* topk_idx /*[N,K]*/, int64_t N, int64_t E, int64_t K,
                          const Comm& world);
// dprobs[N,E] (=) = daux * E * fsum[e] / n_global: this rank's share of the global gradient.
void aux_loss_global_bwd(float* dprobs, float daux, const double* fsum, double n_global, int64_t N,
                         int64_t E);

// Sums the gradient arena: non-expert parameters over the world, expert shards over the DP group.
void allreduce_grads(std::vector<float>& grads, const ParamLayout& layout, const Groups& g);
// The L2 norm of the whole model's gradient (each expert counted once: shards summed over the EP
// group), clipped to max_norm (> 0) as torch.nn.utils.clip_grad_norm_; returns the norm before.
float clip_grad_norm_global(std::vector<float>& grads, const ParamLayout& layout, const Groups& g,
                            float max_norm);

// The replicas agree bit for bit: the replicated parameters on every rank of the world, each
// expert shard on every rank of its DP group (a 64-bit FNV-1a hash of each group's bits per rank,
// all-gathered, then any mismatch all-reduced over the world). A gradient left out of the
// all-reduce would let them drift apart silently; this throws on every rank, naming two world
// ranks that differ. Returns the replicated parameters' hash.
uint64_t check_replicas(const std::vector<float>& params, const ParamLayout& layout,
                        const Groups& g);

}  // namespace automoe::dist
