// tests/dist/test_comm.cpp: every dist::Comm collective on the job's backend, with its result
// visible in the data (rank r contributes values made of r). tests/dist.cmake runs them on the
// TCP mesh with 3 and 4 ranks (tools/launch_local.sh) and on MPI under mpirun: odd sizes, every
// root, a large all-to-all-v (tens of MB both ways at once: the TCP backend must not deadlock),
// the EP and DP sub-communicators, and float sums with the same bits on every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "dist/dist_testing.h"
#include "dist/process_group.h"

using namespace automoe;
using namespace automoe::dist_test;

namespace {

// Every rank's copy of `x` is the same bytes (checked by gathering them all on every rank).
template <class T>
bool same_on_every_rank(const dist::Comm& c, const std::vector<T>& x) {
  std::vector<T> all(x.size() * size_t(c.size()));
  c.allgather(all.data(), x.data(), int64_t(x.size() * sizeof(T)));
  for (int r = 0; r < c.size(); ++r)
    if (std::memcmp(all.data() + r * x.size(), x.data(), x.size() * sizeof(T)) != 0) return false;
  return true;
}

}  // namespace

TEST(Comm, BackendIsTheOneTheLauncherAsksFor) {
  NEEDS_RANKS();
  const char* want = std::getenv("AUTOMOE_EXPECT_BACKEND");  // set by tests/dist.cmake
  if (g_rank == 0) std::printf("[comm] %d ranks on %s\n", g_world, dist::backend_name());
  if (want && *want) {
    EXPECT_STREQ(dist::backend_name(), want);
  }
}

TEST(Comm, ReductionsOfOddSizes) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(1);
  const dist::Comm& w = g.world;
  const int P = w.size(), me = w.rank();
  for (int64_t n : {0, 1, 2, 7, 1001}) {
    const size_t un = size_t(n);
    std::vector<float> f(un);
    std::vector<double> d(un), dm(un);
    std::vector<int64_t> i(un), im(un);
    for (int64_t k = 0; k < n; ++k) {
      f[k] = float(me + 1) * float(k % 13);  // small integers: the sum is exact
      d[k] = double(me) * 0.5 + double(k);
      i[k] = int64_t(me) * 1000000007 + k;
      dm[k] = (k + me) % P == 0 ? 100.0 + double(k) : -double(me);
      im[k] = -int64_t(me) * k;
    }
    w.allreduce_sum(f.data(), n);
    w.allreduce_sum(d.data(), n);
    w.allreduce_sum(i.data(), n);
    w.allreduce_max(dm.data(), n);
    w.allreduce_max(im.data(), n);
    const double ranks_sum = double(P) * (P - 1) / 2;
    for (int64_t k = 0; k < n; ++k) {
      ASSERT_EQ(f[k], float(P * (P + 1) / 2) * float(k % 13)) << "n " << n << " k " << k;
      ASSERT_EQ(d[k], ranks_sum * 0.5 + double(P) * double(k)) << "n " << n << " k " << k;
      ASSERT_EQ(i[k], int64_t(ranks_sum) * 1000000007 + int64_t(P) * k) << "n " << n << " k " << k;
      ASSERT_EQ(dm[k], 100.0 + double(k)) << "n " << n << " k " << k;
      ASSERT_EQ(im[k], 0) << "n " << n << " k " << k;
    }
  }
}

TEST(Comm, FloatSumsHaveTheSameBitsOnEveryRank) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(1);
  const int64_t n = 100003;  // not a multiple of any rank count
  std::vector<float> x(n);
  uint32_t s = 12345u + 977u * uint32_t(g_rank);
  for (float& v : x) {
    s = s * 1664525u + 1013904223u;
    v = float(int32_t(s >> 8) - (1 << 23)) * 1e-7f;  // rounding in every add
  }
  std::vector<float> want = x;  // the sum in rank order, in double as a sanity bound
  g.world.allreduce_sum(x.data(), n);
  EXPECT_TRUE(same_on_every_rank(g.world, x));
  std::vector<double> wide(want.begin(), want.end());
  g.world.allreduce_sum(wide.data(), n);
  double worst = 0;
  for (int64_t k = 0; k < n; ++k) worst = std::max(worst, std::fabs(double(x[k]) - wide[k]));
  EXPECT_LE(worst, 1e-5);
}

TEST(Comm, ReduceScatterGivesEachRankItsBlock) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(1);
  const int P = g_world;
  for (int64_t n : {1, 5, 333}) {
    std::vector<float> send(static_cast<size_t>(P * n)), recv(static_cast<size_t>(n), -1.f);
    for (int d = 0; d < P; ++d)
      for (int64_t k = 0; k < n; ++k) send[d * n + k] = float(g_rank * 100 + d * 10) + float(k % 7);
    g.world.reduce_scatter_sum(recv.data(), send.data(), n);
    for (int64_t k = 0; k < n; ++k)
      ASSERT_EQ(recv[k], float(100 * P * (P - 1) / 2 + P * (g_rank * 10 + k % 7))) << "n " << n << " k " << k;
  }
}

TEST(Comm, BroadcastGatherAllgatherFromEveryRoot) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(1);
  const dist::Comm& w = g.world;
  const int P = w.size();
  const int64_t B = 13;  // odd bytes
  auto mine = [](int r, int64_t k) { return char(r * 31 + k); };
  std::vector<char> x(B), all(static_cast<size_t>(P * B));
  for (int root = 0; root < P; ++root) {
    for (int64_t k = 0; k < B; ++k) x[k] = w.rank() == root ? mine(root, k) : 0;
    w.broadcast(x.data(), B, root);
    for (int64_t k = 0; k < B; ++k) ASSERT_EQ(x[k], mine(root, k)) << "root " << root;
    for (int64_t k = 0; k < B; ++k) x[k] = mine(w.rank(), k);
    std::fill(all.begin(), all.end(), 0);
    w.gather(w.rank() == root ? all.data() : nullptr, x.data(), B, root);
    for (int r = 0; r < P && w.rank() == root; ++r)
      for (int64_t k = 0; k < B; ++k) ASSERT_EQ(all[r * B + k], mine(r, k)) << "gather to " << root;
  }
  std::fill(all.begin(), all.end(), 0);
  w.allgather(all.data(), x.data(), B);
  for (int r = 0; r < P; ++r)
    for (int64_t k = 0; k < B; ++k) ASSERT_EQ(all[r * B + k], mine(r, k)) << "all-gather";
  w.barrier();
}

// Rank s sends rank d (s + 2*d) % 5 rows (some none) plus, in the large round, about 12 MB,
// every byte a function of (s, d, k): both directions at once, far beyond a socket's buffer.
TEST(Comm, AlltoallAndALargeAlltoallv) {
  NEEDS_RANKS();
  dist::Groups g = dist::make_groups(1);
  const dist::Comm& w = g.world;
  const int P = w.size(), me = w.rank();
  const int64_t row = 1003;  // bytes, odd
  for (int64_t big : {int64_t(0), int64_t(12000)}) {
    auto rows = [&](int s, int d) { return int64_t((s + 2 * d) % 5) + (s != d ? big : 0); };
    std::vector<int64_t> sc(P), rc(P), expect_rc(P);
    for (int d = 0; d < P; ++d) sc[d] = rows(me, d);
    w.alltoall(rc.data(), sc.data());
    for (int s = 0; s < P; ++s) {
      expect_rc[s] = rows(s, me);
      ASSERT_EQ(rc[s], expect_rc[s]) << "all-to-all from " << s;
    }
    auto byte = [&](int s, int d, int64_t k) { return char((s * 7 + d * 13 + k * 3) % 251); };
    const int64_t ns = std::accumulate(sc.begin(), sc.end(), int64_t(0));
    const int64_t nr = std::accumulate(rc.begin(), rc.end(), int64_t(0));
    std::vector<char> send(static_cast<size_t>(ns * row)), recv(static_cast<size_t>(nr * row), 0);
    for (int d = 0, o = 0; d < P; o += int(sc[d] * row), ++d)
      for (int64_t k = 0; k < sc[d] * row; ++k) send[o + k] = byte(me, d, k);
    w.alltoallv(recv.data(), rc.data(), send.data(), sc.data(), row);
    int64_t o = 0;
    for (int s = 0; s < P; o += rc[s] * row, ++s)
      for (int64_t k = 0; k < rc[s] * row; ++k)
        ASSERT_EQ(recv[o + k], byte(s, me, k)) << "from " << s << " byte " << k << " (big " << big << ")";
    if (big && me == 0) std::printf("[comm] all-to-all-v: %.1f MB out, %.1f MB in per rank\n", ns * row / 1e6, nr * row / 1e6);
  }
}

// Each layout ep x dp of the world: a collective on the EP (or DP) group sums its members alone,
// numbered from 0 in world-rank order.
TEST(Comm, SubCommunicatorsOfEveryLayout) {
  NEEDS_RANKS();
  for (int ep = 1; ep <= g_world; ++ep) {
    if (g_world % ep) continue;
    dist::Groups g = dist::make_groups(ep);
    ASSERT_EQ(g.ep.size(), ep);
    ASSERT_EQ(g.dp.size(), g_world / ep);
    EXPECT_EQ(g.ep.rank(), g_rank % ep);
    EXPECT_EQ(g.dp.rank(), g_rank / ep);
    int64_t v[2] = {g_rank, 1};
    g.ep.allreduce_sum(v, 2);
    const int first = g_rank / ep * ep;
    EXPECT_EQ(v[0], int64_t(ep) * first + ep * (ep - 1) / 2) << "ep " << ep;
    EXPECT_EQ(v[1], ep);
    int64_t u = g_rank;
    g.dp.allreduce_max(&u, 1);
    EXPECT_EQ(u, g_rank % ep + (g_world / ep - 1) * ep) << "ep " << ep;
    std::vector<int64_t> ids(static_cast<size_t>(g.dp.size()));
    int64_t mine = g_rank;
    g.dp.allgather(ids.data(), &mine, sizeof mine);
    for (int r = 0; r < g.dp.size(); ++r) EXPECT_EQ(ids[r], g_rank % ep + r * ep) << "ep " << ep;
    g.world.barrier();
  }
}
