// backend/cuda/trace.cpp: see trace.h.
#include "backend/cuda/trace.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

#include "backend/cuda/common.cuh"

namespace automoe::cuda {

namespace {
struct Point {
  cudaEvent_t ev;
  cudaStream_t stream;
  std::string label;
};
struct Trace {
  std::vector<cudaEvent_t> pool;
  std::vector<Point> points;
};
Trace& trace() {
  static Trace t;
  return t;
}
constexpr size_t kMaxPoints = 65536;
}  // namespace

bool trace_on() {
  static const bool on = [] {
    const char* v = std::getenv("AUTOMOE_TRACE");
    return v && *v;
  }();
  return on;
}

void trace_mark(cudaStream_t stream, const std::string& who, const char* what) {
  if (!trace_on()) return;
  std::string label = who + ": " + what;
  Trace& t = trace();
  if (t.points.size() >= kMaxPoints) return;
  while (t.pool.size() <= t.points.size()) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    t.pool.push_back(e);
  }
  cudaEvent_t e = t.pool[t.points.size()];
  CUDA_CHECK(cudaEventRecord(e, stream));
  t.points.push_back({e, stream, std::move(label)});
}

void trace_reset() { trace().points.clear(); }

std::string trace_dump(const std::string& suffix) {
  if (!trace_on()) return "";
  Trace& t = trace();
  const std::string path = std::string(std::getenv("AUTOMOE_TRACE")) + suffix;
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return "";
  std::map<cudaStream_t, int> ids;  // streams numbered in order of first use
  for (const Point& p : t.points) {
    CUDA_CHECK(cudaEventSynchronize(p.ev));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, t.points.front().ev, p.ev));
    const int id = ids.emplace(p.stream, int(ids.size())).first->second;
    std::fprintf(f, "%.4f\ts%d\t%s\n", ms, id, p.label.c_str());
  }
  std::fclose(f);
  t.points.clear();
  return path;
}

}  // namespace automoe::cuda
