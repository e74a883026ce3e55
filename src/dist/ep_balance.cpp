// dist/ep_balance.cpp: the plan that moves (expert, source) units of expert work from the busiest
// EP rank to the idlest (see ep_balance.h). Plain loops over E * P units: a few thousand.
#include "dist/ep_balance.h"

#include <algorithm>
#include <cstdlib>

#include "core/check.h"

namespace automoe::dist {

bool EpBalance::moved() const {
  for (int64_t u = 0; u < int64_t(host.size()); ++u)
    if (host[size_t(u)] != owner(u / P)) return true;
  return false;
}

int32_t EpBalance::local_index(int d, int64_t e) const {
  if (owner(e) == d) return int32_t(e - int64_t(d) * El);
  const std::vector<int32_t>& b = borrowed[size_t(d)];
  const auto it = std::lower_bound(b.begin(), b.end(), int32_t(e));
  if (it == b.end() || *it != e) return -1;
  return int32_t(El + (it - b.begin()));
}

EpBalance ep_balance_none(const int64_t* counts, int P, int64_t E) {
  AM_CHECK(P >= 1 && E >= P && E % P == 0,
           "[ep_balance] {} experts cannot be split evenly over {} expert-parallel ranks", E, P);
  EpBalance b;
  b.P = P;
  b.E = E;
  b.El = E / P;
  b.host.resize(size_t(E * P));
  b.borrowed.assign(size_t(P), {});
  b.load.assign(size_t(P), 0);
  for (int64_t e = 0; e < E; ++e)
    for (int s = 0; s < P; ++s) {
      const int64_t c = counts[int64_t(s) * E + e];
      AM_CHECK(c >= 0, "internal: [ep_balance] rank {} routes {} picks to expert {}", s, c, e);
      b.host[size_t(e * P + s)] = b.owner(e);
      b.load[size_t(b.owner(e))] += c;
    }
  return b;
}

EpBalance ep_balance_plan(const int64_t* counts, int P, int64_t E, double tol, int max_borrowed) {
  AM_CHECK(tol >= 0 && max_borrowed >= 0,
           "internal: [ep_balance] tolerance {} and {} borrowed experts per rank", tol,
           max_borrowed);
  EpBalance b = ep_balance_none(counts, P, E);
  int64_t total = 0;
  for (int64_t l : b.load) total += l;
  const double limit = double(total) / P * (1 + tol);
  for (int64_t step = 0; step < E * P; ++step) {  // a unit moves at most once
    const auto most = std::max_element(b.load.begin(), b.load.end());
    const auto least = std::min_element(b.load.begin(), b.load.end());
    const int hi = int(most - b.load.begin()), lo = int(least - b.load.begin());
    if (hi == lo || double(*most) <= limit) break;
    const int64_t gap = *most - *least;
    std::vector<int32_t>& to = b.borrowed[size_t(lo)];
    int64_t best = -1, best_dist = 0;
    for (int64_t e = int64_t(hi) * b.El; e < int64_t(hi + 1) * b.El; ++e) {
      const bool room = int(to.size()) < max_borrowed ||
                        std::binary_search(to.begin(), to.end(), int32_t(e));
      if (!room) continue;
      for (int s = 0; s < P; ++s) {
        const int64_t u = e * P + s, c = counts[int64_t(s) * E + e];
        if (b.host[size_t(u)] != hi || c <= 0 || c >= gap) continue;  // at its owner, and helps
        const int64_t dist = std::abs(2 * c - gap);
        if (best < 0 || dist < best_dist) {
          best = u;
          best_dist = dist;
        }
      }
    }
    if (best < 0) break;
    const int64_t e = best / P, c = counts[(best % P) * E + e];
    b.host[size_t(best)] = lo;
    b.load[size_t(hi)] -= c;
    b.load[size_t(lo)] += c;
    if (!std::binary_search(to.begin(), to.end(), int32_t(e)))
      to.insert(std::upper_bound(to.begin(), to.end(), int32_t(e)), int32_t(e));
  }
  return b;
}

}  // namespace automoe::dist
