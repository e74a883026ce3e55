// text/dataset.h: training examples as token ids with loss labels, and the packer that turns
// them into fixed-length rows with document boundaries (no token attends across documents).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace automoe {

struct Example {
  std::vector<int64_t> ids;
  std::vector<int64_t> labels;  // same length; -100 = no loss on this token
};

// Reads pre-tokenized JSONL: one object per line with "input_ids" (ints) and optional "labels"
// (same length; default = input_ids). A malformed line is an error naming file and line.
std::vector<Example> load_tokenized_jsonl(const std::string& path, int64_t vocab_size);

// Deterministic order over examples: a fresh permutation per epoch from (seed, epoch).
// Its position (epoch, cursor) is what checkpoints save.
struct DataOrder {
  uint64_t seed = 0;
  int64_t n = 0;
  int64_t epoch = 0, cursor = 0;
  std::vector<int64_t> perm;

  void reset(uint64_t seed, int64_t n);  // epoch 0, cursor 0
  void seek(int64_t epoch, int64_t cursor);
  int64_t next();  // the next example index; advances epochs as needed
};

struct PackedBatch {
  int64_t B = 0, T = 0;
  std::vector<int64_t> ids, labels;  // [B,T]
  std::vector<int32_t> pos, doc;     // [B,T] positions restart at 0 in each document
  int64_t real_tokens = 0;           // non-padding tokens
};

// Greedy packing: examples are taken in order and placed into rows of T tokens; an example
// that does not fit the current row's rest starts a new row; examples longer than T are
// truncated to T. The first token of each document gets label -100 (its shifted target belongs
// to the previous document). Padding: id pad_id, label -100, its own document.
PackedBatch pack_rows(const std::vector<Example>& data, DataOrder& order, int64_t B, int64_t T,
                      int64_t pad_id);

}  // namespace automoe
