// backend/cpu/threads.cpp: thread count of the CPU backend (OpenMP loops and OpenBLAS).
// Small models run fastest single-threaded: threads fighting over two cores cost 10x.
#include <omp.h>

#include <cstdlib>

#include "ops/ops.h"

extern "C" void openblas_set_num_threads(int);

namespace automoe::cpu {

int set_num_threads_from_env() {
  const char* s = std::getenv("AUTOMOE_THREADS");
  int n = s ? std::atoi(s) : 1;
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
  return n;
}

}  // namespace automoe::cpu
