// tests/io/test_safetensors.cpp: safetensors read/write round trips, sharded model directories,
// one test per malformed input (the message must name the file and the problem), and
// compatibility with the reference Python implementation when it is installed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

using namespace automoe;
namespace fs = std::filesystem;

namespace {

std::string tmpdir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / ("automoe_test_io_" + std::to_string(::getpid())) / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d.string();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A hand-made file: u64 header length, header text, `data_bytes` zero bytes.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes, int64_t claimed_len = -1) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = claimed_len >= 0 ? uint64_t(claimed_len) : header.size();
  for (int i = 0; i < 8; ++i) f.put(char(n >> (8 * i)));
  f << header << std::string(data_bytes, '\0');
}

Tensor f32_tensor(Shape s, float start) {
  Tensor t = Tensor::empty(DType::F32, std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = start + 0.5f * float(i);
  return t;
}

// Expects opening `path` to fail with a message that names the file and contains `what`.
void expect_bad_file(const std::string& path, const std::string& what) {
  std::string e = error_of([&] { SafetensorsFile f(path); });
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find(what), std::string::npos) << e;
}

}  // namespace

TEST(Safetensors, RoundTripF32Bf16I64) {
  std::string d = tmpdir("roundtrip"), path = d + "/t.safetensors";
  Tensor a = f32_tensor({2, 3}, -1.0f);
  Tensor b = Tensor::empty(DType::BF16, {5});
  for (int i = 0; i < 5; ++i) b.data<uint16_t>()[i] = f32_to_bf16(0.25f * float(i) - 0.5f);
  Tensor c = Tensor::empty(DType::I64, {1, 4});
  for (int i = 0; i < 4; ++i) c.i64()[i] = int64_t(1) << (40 + i);
  Tensor e = Tensor::empty(DType::F32, {0, 7});
  save_safetensors(path, {{"zeta.weight", a}, {"b", b}, {"ids", c}, {"empty", e}}, {{"format", "pt"}});
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"b", "empty", "ids", "zeta.weight"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.info("zeta.weight").shape, (Shape{2, 3}));
  EXPECT_EQ(f.info("b").dtype, DType::BF16);
  Tensor a2 = f.view("zeta.weight");
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a2.f32()[i], a.f32()[i]);
  Tensor b2 = f.load_f32("b");
  for (int i = 0; i < 5; ++i) EXPECT_EQ(b2.f32()[i], 0.25f * float(i) - 0.5f);
  Tensor c2 = f.view("ids");
  EXPECT_EQ(c2.shape, (Shape{1, 4}));
  for (int i = 0; i < 4; ++i) EXPECT_EQ(c2.i64()[i], int64_t(1) << (40 + i));
  EXPECT_EQ(f.view("empty").numel(), 0);
  EXPECT_NE(error_of([&] { f.load_f32("ids"); }).find("not a floating-point tensor"), std::string::npos);
  EXPECT_NE(error_of([&] { f.info("nope"); }).find("has no tensor 'nope'"), std::string::npos);

  // Header padded to 8 bytes; views stay valid after the file object is gone.
  std::ifstream raw(path, std::ios::binary);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(raw.get())) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  Tensor kept;
  { kept = SafetensorsFile(path).view("zeta.weight"); }
  EXPECT_EQ(kept.f32()[5], a.f32()[5]);
}

TEST(Safetensors, LoadF32ConvertsF16AndF64) {
  std::string path = tmpdir("convert") + "/t.safetensors";
  Tensor h = Tensor::empty(DType::F16, {3}), g = Tensor::empty(DType::F64, {3});
  for (int i = 0; i < 3; ++i) {
    h.data<uint16_t>()[i] = f32_to_f16(1.5f * float(i));
    g.data<double>()[i] = -2.0 * i;
  }
  save_safetensors(path, {{"h", h}, {"g", g}});
  SafetensorsFile f(path);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(f.load_f32("h").f32()[i], 1.5f * float(i));
    EXPECT_EQ(f.load_f32("g").f32()[i], -2.0f * float(i));
  }
}

TEST(Safetensors, OverwriteIsAtomicAndDuplicateNamesAreRefused) {
  std::string d = tmpdir("atomic"), path = d + "/t.safetensors";
  save_safetensors(path, {{"x", f32_tensor({4}, 0)}});
  save_safetensors(path, {{"x", f32_tensor({2}, 7)}});
  EXPECT_EQ(SafetensorsFile(path).info("x").shape, (Shape{2}));
  for (auto& e : fs::directory_iterator(d)) EXPECT_EQ(e.path().filename(), "t.safetensors");
  std::string e = error_of([&] { save_safetensors(path, {{"x", f32_tensor({1}, 0)}, {"x", f32_tensor({1}, 0)}}); });
  EXPECT_NE(e.find("appears twice"), std::string::npos) << e;
  e = error_of([&] { save_safetensors(d + "/no/such/dir/t.safetensors", {}); });
  EXPECT_NE(e.find("no/such/dir"), std::string::npos) << e;
}

TEST(Safetensors, ShardedRoundTripWithIndex) {
  std::string d = tmpdir("sharded");
  NamedTensors ts;
  for (int i = 0; i < 5; ++i) ts.emplace_back("layers." + std::to_string(i) + ".w", f32_tensor({10, 10}, float(i)));
  Tensor big = Tensor::empty(DType::BF16, {1000});
  for (int i = 0; i < 1000; ++i) big.data<uint16_t>()[i] = f32_to_bf16(float(i));
  ts.emplace_back("embed", big);  // 2000 bytes: larger than a shard, gets its own
  save_sharded(d, ts, 900, {{"format", "pt"}});  // 400-byte tensors: two per shard

  EXPECT_FALSE(fs::exists(d + "/model.safetensors"));
  auto index = nlohmann::json::parse(std::ifstream(d + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 5 * 400 + 2000);
  EXPECT_EQ(index["weight_map"]["layers.0.w"], "model-00001-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.4.w"], "model-00003-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["embed"], "model-00004-of-00004.safetensors");

  SafetensorsModel m(d);
  ASSERT_EQ(m.names().size(), 6u);
  EXPECT_EQ(m.info("embed").dtype, DType::BF16);
  EXPECT_EQ(m.load_f32("embed").f32()[999], bf16_to_f32(f32_to_bf16(999.0f)));  // bf16 rounds 999 to 1000
  EXPECT_EQ(m.view("layers.3.w").f32()[99], 3.0f + 0.5f * 99);
  EXPECT_EQ(SafetensorsFile(d + "/model-00002-of-00004.safetensors").metadata().at("format"), "pt");
  EXPECT_NE(error_of([&] { m.info("nope"); }).find("has no tensor 'nope'"), std::string::npos);

  // Saving again in one file removes the shards and the index (no stale weights left behind).
  save_sharded(d, ts, 1 << 20);
  EXPECT_TRUE(fs::exists(d + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(d + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(d + "/model-00001-of-00004.safetensors"));
  EXPECT_EQ(SafetensorsModel(d).names().size(), 6u);
}

// --- malformed files -------------------------------------------------------------------------

TEST(SafetensorsBad, TruncatedFile) {
  std::string p = tmpdir("bad") + "/short.safetensors";
  std::ofstream(p) << "abc";
  expect_bad_file(p, "truncated");
}

TEST(SafetensorsBad, HeaderLengthBeyondFile) {
  std::string p = tmpdir("bad") + "/hlen.safetensors";
  write_raw(p, "{}", 0, 4096);
  expect_bad_file(p, "header length 4096 goes beyond the end of the file");
}

TEST(SafetensorsBad, HeaderNotJson) {
  std::string p = tmpdir("bad") + "/json.safetensors";
  write_raw(p, "{\"a\": ", 0);
  expect_bad_file(p, "not valid JSON");
}

TEST(SafetensorsBad, UnknownDtype) {
  std::string p = tmpdir("bad") + "/dtype.safetensors";
  write_raw(p, R"({"x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2);
  expect_bad_file(p, "dtype \"F8_E4M3\"");
}

TEST(SafetensorsBad, NegativeDimension) {
  std::string p = tmpdir("bad") + "/neg.safetensors";
  write_raw(p, R"({"x":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}})", 8);
  expect_bad_file(p, "negative");
}

TEST(SafetensorsBad, OffsetsOutOfRange) {
  std::string p = tmpdir("bad") + "/range.safetensors";
  write_raw(p, R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_bad_file(p, "'x' has data_offsets [0, 16] out of range");
}

TEST(SafetensorsBad, OverlappingOffsets) {
  std::string p = tmpdir("bad") + "/overlap.safetensors";
  write_raw(p, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  expect_bad_file(p, "tensors 'a' and 'b' have overlapping data_offsets");
}

TEST(SafetensorsBad, SizeMismatch) {
  std::string p = tmpdir("bad") + "/size.safetensors";
  write_raw(p, R"({"x":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,8]}})", 8);
  expect_bad_file(p, "BF16 [3, 2] = 12 bytes, but its data_offsets [0, 8] span 8 bytes");
}

// --- model directories -----------------------------------------------------------------------

namespace {
std::string model_with_index(const std::string& name, const std::string& shard) {
  std::string d = tmpdir(name);
  save_safetensors(d + "/good.safetensors", {{"a", f32_tensor({2}, 0)}});
  nlohmann::json j = {{"metadata", {{"total_size", 8}}}, {"weight_map", {{"a", "good.safetensors"}, {"b", shard}}}};
  std::ofstream(d + "/model.safetensors.index.json") << j.dump();
  return d;
}

void expect_bad_model(const std::string& d, const std::vector<std::string>& parts) {
  std::string e = error_of([&] { SafetensorsModel m(d); });
  EXPECT_NE(e.find(d), std::string::npos) << e;
  for (auto& p : parts) EXPECT_NE(e.find(p), std::string::npos) << e;
}
}  // namespace

TEST(SafetensorsModelBad, ShardPathEscapingTheDirectory) {
  expect_bad_model(model_with_index("dotdot", "../evil.safetensors"),
                   {"'../evil.safetensors'", "outside the model directory"});
  expect_bad_model(model_with_index("absolute", "/etc/passwd"), {"'/etc/passwd'", "outside the model directory"});
  std::string d = model_with_index("symlink", "link.safetensors");
  std::string outside = tmpdir("symlink_target") + "/x.safetensors";
  save_safetensors(outside, {{"b", f32_tensor({1}, 0)}});
  fs::create_symlink(outside, d + "/link.safetensors");
  expect_bad_model(d, {"'link.safetensors' is a link to", "outside the model directory"});
}

TEST(SafetensorsModelBad, MissingShardFile) {
  expect_bad_model(model_with_index("missing", "model-00002-of-00002.safetensors"),
                   {"model-00002-of-00002.safetensors", "is missing"});
}

TEST(SafetensorsModelBad, IndexNamesATensorTheShardLacks) {
  std::string d = model_with_index("lacks", "good.safetensors");  // "b" is not in good.safetensors
  expect_bad_model(d, {"tensor 'b' is in 'good.safetensors'", "no such tensor"});
}

TEST(SafetensorsModelBad, NoWeightsOrNoDirectory) {
  expect_bad_model(tmpdir("noweights"), {"neither model.safetensors nor model.safetensors.index.json"});
  expect_bad_model("/nonexistent/automoe/model", {"does not exist"});
}

// --- the reference implementation --------------------------------------------------------------

TEST(Safetensors, CompatibleWithPythonSafetensors) {
  if (std::system("python3 -c 'import safetensors, numpy' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with the safetensors and numpy modules is not installed";
  std::string d = tmpdir("python");
  // Python writes, we read.
  std::string py = "python3 -c \"import numpy as np; from safetensors.numpy import save_file; "
                   "save_file({'w': np.arange(6, dtype=np.float32).reshape(2, 3), "
                   "'h': np.array([0.5, -2], dtype=np.float16), 'ids': np.array([[7, 8]], dtype=np.int64)}, '" +
                   d + "/py.safetensors', metadata={'format': 'np'})\"";
  ASSERT_EQ(std::system(py.c_str()), 0) << py;
  SafetensorsFile f(d + "/py.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "np");
  EXPECT_EQ(f.info("w").shape, (Shape{2, 3}));
  EXPECT_EQ(f.view("w").f32()[5], 5.0f);
  EXPECT_EQ(f.load_f32("h").f32()[1], -2.0f);
  EXPECT_EQ(f.view("ids").i64()[1], 8);
  // We write, Python reads.
  save_safetensors(d + "/ours.safetensors", {{"w", f32_tensor({2, 2}, 1)}, {"ids", f.view("ids")}}, {{"k", "v"}});
  py = "python3 -c \"from safetensors.numpy import load_file; from safetensors import safe_open; "
       "t = load_file('" + d + "/ours.safetensors'); "
       "m = safe_open('" + d + "/ours.safetensors', 'np').metadata(); "
       "assert t['w'].tolist() == [[1, 1.5], [2, 2.5]], t; assert t['ids'].tolist() == [[7, 8]]; "
       "assert m == {'k': 'v'}, m\"";
  EXPECT_EQ(std::system(py.c_str()), 0) << py;
}
