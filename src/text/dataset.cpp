// text/dataset.cpp: pre-tokenized JSONL loading, deterministic order and greedy packing.
#include "text/dataset.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/check.h"

namespace automoe {

std::vector<Example> load_tokenized_jsonl(const std::string& path, int64_t vocab_size) {
  std::ifstream f(path);
  AM_CHECK(f.good(), "cannot open dataset file '{}'", path);
  std::vector<Example> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      AM_FAIL("{}:{}: not valid JSON ({})", path, lineno, e.what());
    }
    AM_CHECK(j.is_object() && j.contains("input_ids") && j["input_ids"].is_array(),
             "{}:{}: expected an object with an \"input_ids\" array of token ids", path, lineno);
    Example ex;
    for (auto& v : j["input_ids"]) {
      AM_CHECK(v.is_number_integer(), "{}:{}: input_ids must hold integers", path, lineno);
      int64_t id = v.get<int64_t>();
      AM_CHECK(id >= 0 && id < vocab_size,
               "{}:{}: token id {} is outside the model's vocabulary [0, {})", path, lineno, id,
               vocab_size);
      ex.ids.push_back(id);
    }
    if (j.contains("labels")) {
      AM_CHECK(j["labels"].is_array() && j["labels"].size() == ex.ids.size(),
               "{}:{}: \"labels\" must be an array as long as input_ids ({})", path, lineno,
               ex.ids.size());
      for (auto& v : j["labels"]) {
        AM_CHECK(v.is_number_integer(), "{}:{}: labels must hold integers", path, lineno);
        int64_t y = v.get<int64_t>();
        AM_CHECK(y == -100 || (y >= 0 && y < vocab_size),
                 "{}:{}: label {} is neither -100 nor inside the vocabulary", path, lineno, y);
        ex.labels.push_back(y);
      }
    } else {
      ex.labels = ex.ids;
    }
    AM_CHECK(!ex.ids.empty(), "{}:{}: input_ids is empty", path, lineno);
    out.push_back(std::move(ex));
  }
  AM_CHECK(!out.empty(), "dataset file '{}' holds no examples", path);
  return out;
}

void DataOrder::reset(uint64_t s, int64_t count) {
  seed = s;
  n = count;
  seek(0, 0);
}

void DataOrder::seek(int64_t e, int64_t c) {
  epoch = e;
  cursor = c;
  perm.resize(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  Rng rng(seed * 1000003ull + uint64_t(epoch));
  for (int64_t i = n - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(uint64_t(i + 1))]);
}

int64_t DataOrder::next() {
  if (cursor >= n) seek(epoch + 1, 0);
  return perm[cursor++];
}

PackedBatch pack_rows(const std::vector<Example>& data, DataOrder& order, int64_t B, int64_t T,
                      int64_t pad_id) {
  PackedBatch pb;
  pb.B = B;
  pb.T = T;
  pb.ids.assign(B * T, pad_id);
  pb.labels.assign(B * T, -100);
  pb.pos.assign(B * T, 0);
  pb.doc.assign(B * T, -1);
  for (int64_t r = 0; r < B; ++r) {
    int64_t t = 0, d = 0;
    while (t < T) {
      // Peek: the next example goes into this row only if it fits (or the row is empty).
      int64_t save_epoch = order.epoch, save_cursor = order.cursor;
      const Example& ex = data[order.next()];
      int64_t len = std::min<int64_t>(int64_t(ex.ids.size()), T);
      if (t > 0 && t + len > T) {
        if (order.epoch == save_epoch) order.cursor = save_cursor;  // leave it for the next row
        else order.seek(save_epoch, save_cursor);
        break;
      }
      for (int64_t i = 0; i < len; ++i) {
        int64_t k = r * T + t + i;
        pb.ids[k] = ex.ids[i];
        pb.labels[k] = i == 0 ? -100 : ex.labels[i];
        pb.pos[k] = int32_t(i);
        pb.doc[k] = int32_t(d);
      }
      t += len;
      pb.real_tokens += len;
      ++d;
    }
    for (int64_t i = t; i < T; ++i) {  // padding: its own document, positions continue
      pb.pos[r * T + i] = int32_t(i - t);
      pb.doc[r * T + i] = int32_t(d);
    }
  }
  return pb;
}

}  // namespace automoe
