// dist/ep_balance.h: moving expert work to the less loaded EP ranks within one step (the plan;
// docs/DISTRIBUTED.md, "Load balance", has the design). The unit of work is (expert e, source
// rank s): the picks of e that rank s routes. Its host runs them: the owner (rank e / El) unless
// the plan moved the unit to a helper, which then borrows e's weights for the step and returns
// its share of e's weight gradient. Every rank computes the same plan from the same counts.
//
// Legend: P EP ranks, E experts, El = E / P experts per rank.
#pragma once
#include <cstdint>
#include <vector>

namespace automoe::dist {

struct EpBalance {
  int P = 1;
  int64_t E = 0, El = 0;
  std::vector<int32_t> host;                   // [E*P] the rank running unit (e, s) at e*P + s
  std::vector<std::vector<int32_t>> borrowed;  // [P] experts rank d runs but does not own, ascending
  std::vector<int64_t> load;                   // [P] picks each rank runs under the plan

  int owner(int64_t e) const { return int(e / El); }
  bool moved() const;  // any unit away from its owner
  // Rank d's local expert index of e: e - d*El where d owns e, El + i where e is borrowed[d][i],
  // -1 where d runs none of e.
  int32_t local_index(int d, int64_t e) const;
};

// The plan for one MoE layer from counts[s*E + e] (picks of expert e routed by rank s, every
// rank's row; the same array on every rank). Greedy and deterministic: while the busiest rank
// runs more than (1 + tol) x the mean, move one of its own units to the idlest rank, the unit
// whose size is nearest half their gap and smaller than the gap (ties: lower e, then lower s).
// A unit moves at most once; a rank borrows at most max_borrowed experts. tol >= 0.
EpBalance ep_balance_plan(const int64_t* counts, int P, int64_t E, double tol, int max_borrowed);

// The plan that moves nothing (every unit at its owner), for P ranks and E experts.
EpBalance ep_balance_none(const int64_t* counts, int P, int64_t E);

}  // namespace automoe::dist
