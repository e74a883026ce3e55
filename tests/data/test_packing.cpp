// tests/data/test_packing.cpp: pre-tokenized JSONL loading and greedy packing with document
// boundaries; deterministic order that resumes from a saved position.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "core/check.h"
#include "text/dataset.h"

using namespace automoe;

namespace {
std::string write_tmp(const std::string& name, const std::string& text) {
  auto p = std::filesystem::temp_directory_path() / (name + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(p) << text;
  return p.string();
}
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Jsonl, LoadsIdsAndLabels) {
  auto p = write_tmp("ok", "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [4, 5], \"labels\": [-100, 5]}\n");
  auto ex = load_tokenized_jsonl(p, 10);
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[0].labels, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(ex[1].labels, (std::vector<int64_t>{-100, 5}));
}

TEST(Jsonl, ErrorsNameFileAndLine) {
  auto p = write_tmp("bad", "{\"input_ids\": [1]}\n{\"input_ids\": [1, 2,\n");
  std::string e = error_of([&] { load_tokenized_jsonl(p, 10); });
  EXPECT_NE(e.find(p + ":2"), std::string::npos) << e;
  p = write_tmp("vocab", "{\"input_ids\": [1, 12]}\n");
  e = error_of([&] { load_tokenized_jsonl(p, 10); });
  EXPECT_NE(e.find(":1: token id 12 is outside"), std::string::npos) << e;
  p = write_tmp("labels", "{\"input_ids\": [1, 2], \"labels\": [1]}\n");
  e = error_of([&] { load_tokenized_jsonl(p, 10); });
  EXPECT_NE(e.find("as long as input_ids"), std::string::npos) << e;
}

TEST(Packing, DocumentsKeepBoundariesAndFirstLabelIsMasked) {
  std::vector<Example> data = {{{1, 2, 3}, {1, 2, 3}}, {{4, 5}, {4, 5}}, {{6, 7, 8, 9}, {6, 7, 8, 9}}};
  DataOrder order;
  order.reset(0, 3);
  order.perm = {0, 1, 2};  // fixed order for the check
  PackedBatch b = pack_rows(data, order, 2, 6, 0);
  // row 0: [1 2 3 | 4 5 | pad]; row 1: [6 7 8 9 | pad pad]
  EXPECT_EQ(b.ids, (std::vector<int64_t>{1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0, 0}));
  EXPECT_EQ(b.labels, (std::vector<int64_t>{-100, 2, 3, -100, 5, -100, -100, 7, 8, 9, -100, -100}));
  EXPECT_EQ(b.pos, (std::vector<int32_t>{0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 1}));
  EXPECT_EQ(b.doc, (std::vector<int32_t>{0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1, 1}));
  EXPECT_EQ(b.real_tokens, 9);
}

TEST(Packing, OrderIsDeterministicAndSeekable) {
  DataOrder a, b;
  a.reset(42, 100);
  b.reset(42, 100);
  std::vector<int64_t> first;
  for (int i = 0; i < 250; ++i) first.push_back(a.next());  // crosses two epochs
  for (int i = 0; i < 250; ++i) EXPECT_EQ(first[i], b.next());
  DataOrder c;
  c.reset(42, 100);
  c.seek(1, 30);
  EXPECT_EQ(c.next(), first[130]);
  std::vector<int64_t> epoch0(first.begin(), first.begin() + 100);
  std::sort(epoch0.begin(), epoch0.end());
  for (int i = 0; i < 100; ++i) EXPECT_EQ(epoch0[i], i) << "an epoch is a permutation";
}
