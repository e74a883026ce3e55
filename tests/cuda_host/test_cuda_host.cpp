// tests/cuda_host/test_cuda_host.cpp: host-side code of the CUDA backend, run without a GPU (CI
// builds it wherever nvcc is found): the packed-attention segment table the model uploads with
// each batch (backend/cuda/attention.cu, attention_segments_build), its buckets and sizes.
// Registered by tests/cuda_host.cmake; links automoe_cuda, calls nothing that needs a device.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "backend/cuda/ops_cuda.h"

namespace cu = automoe::cuda;

namespace {

// The table's layout (backend/cuda/attention_cudnn.h): C = its capacity of sequences; int64
// offsets of Q, KV and Stats, then int32 lengths.
struct Table {
  std::vector<int64_t> buf;
  int64_t C = 0;
  const int64_t* off_q() const { return buf.data(); }
  const int64_t* off_kv() const { return buf.data() + C; }
  const int64_t* off_st() const { return buf.data() + 2 * C; }
  const int32_t* len() const { return reinterpret_cast<const int32_t*>(buf.data() + 3 * C); }
};

Table make_table(int64_t B, int64_t T) {
  Table t;
  const size_t bytes = cu::attention_segments_bytes(B, T);
  t.buf.assign((bytes + 7) / 8, -7);
  t.C = int64_t((bytes) / (3 * sizeof(int64_t) + sizeof(int32_t)));
  return t;
}

}  // namespace

TEST(CudaHost, SegmentBucketsArePowersOfTwoFromEight) {
  EXPECT_EQ(cu::attention_segment_bucket(1), 8);
  EXPECT_EQ(cu::attention_segment_bucket(8), 8);
  EXPECT_EQ(cu::attention_segment_bucket(9), 16);
  EXPECT_EQ(cu::attention_segment_bucket(66), 128);
  EXPECT_EQ(cu::attention_segment_bucket(8192), 8192);
}

TEST(CudaHost, SegmentTableDescribesEachRowsDocuments) {
  const int64_t B = 2, T = 8, nH = 4, nKV = 2, D = 16;
  // row 0: documents of 3, 1 and 4 tokens; row 1: one document
  const std::vector<int32_t> doc = {5, 5, 5, 9, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0};
  Table t = make_table(B, T);
  ASSERT_GE(t.C, cu::attention_segment_bucket(B * T));
  const int64_t S = cu::attention_segments_build(t.buf.data(), doc.data(), B, T, nH, nKV, D);
  ASSERT_EQ(S, 4);
  const int64_t starts[4] = {0, 3, 4, 8}, lens[4] = {3, 1, 4, 8};
  for (int64_t s = 0; s < S; ++s) {
    EXPECT_EQ(t.off_q()[s], starts[s] * nH * D) << s;
    EXPECT_EQ(t.off_kv()[s], starts[s] * nKV * D) << s;
    EXPECT_EQ(t.off_st()[s], starts[s] * nH) << s;
    EXPECT_EQ(t.len()[s], lens[s]) << s;
  }
  // the bucket's unused slots: empty sequences at the end of the buffers
  for (int64_t s = S; s < cu::attention_segment_bucket(S); ++s) {
    EXPECT_EQ(t.len()[s], 0) << s;
    EXPECT_EQ(t.off_q()[s], B * T * nH * D) << s;
    EXPECT_EQ(t.off_kv()[s], B * T * nKV * D) << s;
    EXPECT_EQ(t.off_st()[s], B * T * nH) << s;
  }
}

TEST(CudaHost, ADocumentThatComesBackInItsRowHasNoTable) {
  // id 1 reappears after id 2 in row 0: not contiguous runs, only the fallback describes it
  const std::vector<int32_t> doc = {1, 1, 2, 1};
  Table t = make_table(1, 4);
  EXPECT_EQ(cu::attention_segments_build(t.buf.data(), doc.data(), 1, 4, 2, 1, 8), 0);
  // the same id in two different rows is two documents
  const std::vector<int32_t> doc2 = {3, 3, 3, 3};
  Table t2 = make_table(2, 2);
  EXPECT_EQ(cu::attention_segments_build(t2.buf.data(), doc2.data(), 2, 2, 2, 1, 8), 2);
}
