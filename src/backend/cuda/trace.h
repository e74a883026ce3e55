// backend/cuda/trace.h: an optional GPU timeline of labelled points, for finding where a step's
// streams wait on each other (the machine has no Nsight Systems). With AUTOMOE_TRACE set (a
// file path), trace_mark() records a timing event on a stream with a label; trace_dump() writes
// one line per point: milliseconds after the window's first point, the stream, the label. A
// point's time is when the stream reached it, so a gap between two points of one stream is
// that stream waiting (for another stream, a peer, or the host's launches). Off: every call is
// a no-op. For benchmarks only (cuda_bench traces its last step); not thread-safe.
#pragma once
#include <cuda_runtime.h>

#include <string>

namespace automoe::cuda {

bool trace_on();                                     // AUTOMOE_TRACE is set
// The point's label is "who: what" (built only when tracing is on); at most 65,536 per window.
void trace_mark(cudaStream_t stream, const std::string& who, const char* what);
void trace_reset();                                  // a new window: the points so far dropped
// Waits for the points, writes them to AUTOMOE_TRACE + suffix; returns the file's path.
std::string trace_dump(const std::string& suffix);

}  // namespace automoe::cuda
