// io/safetensors.cpp: safetensors reader (mmap + full header validation), atomic writer,
// sharded model directories (model.safetensors.index.json) as transformers reads and writes them.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace automoe {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kCorrupt = "the file is corrupt or was not fully written: download or save it again";
constexpr uint64_t kMaxHeader = 100'000'000;  // the reference implementation's limit

// Writes `pieces` to path.tmp, fsyncs, renames over path, fsyncs the folder.
void atomic_write(const std::string& path, const std::vector<std::pair<const void*, size_t>>& pieces) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  AM_CHECK(fd >= 0, "cannot create '{}': {}; check that the folder exists and is writable", tmp,
           std::strerror(errno));
  auto fail = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    AM_FAIL("cannot write '{}' ({}: {}); check free disk space and permissions", path, what, std::strerror(err));
  };
  for (auto [p, n] : pieces) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, std::min(n, size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) fail("write");
      c += w;
      n -= size_t(w);
    }
  }
  if (::fsync(fd) != 0) fail("fsync");
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    AM_FAIL("cannot rename '{}' to '{}': {}", tmp, path, std::strerror(err));
  }
  fs::path parent = fs::absolute(path).parent_path();
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the rename itself durable; best effort (some filesystems refuse)
    ::fsync(dfd);
    ::close(dfd);
  }
}

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16 || t == DType::F64; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  AM_CHECK(fd >= 0, "cannot open safetensors file '{}': {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    AM_FAIL("'{}' is not a regular file; expected a .safetensors file", path);
  }
  uint64_t size = uint64_t(st.st_size);
  if (size < 8) {
    ::close(fd);
    AM_FAIL("safetensors file '{}' is truncated: {} bytes, shorter than the 8-byte header length; {}", path, size, kCorrupt);
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping stays valid
  AM_CHECK(base != MAP_FAILED, "cannot mmap safetensors file '{}': {}", path, std::strerror(err));
  map_ = std::shared_ptr<void>(base, [size](void* p) { ::munmap(p, size); });
  const uint8_t* bytes = static_cast<const uint8_t*>(base);

  uint64_t n = 0;  // header length, u64 little-endian
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  AM_CHECK(n <= size - 8, "safetensors file '{}': header length {} goes beyond the end of the file ({} bytes); {}",
           path, n, size, kCorrupt);
  AM_CHECK(n <= kMaxHeader, "safetensors file '{}': header length {} is larger than the 100 MB limit; {}", path, n, kCorrupt);
  data_ = bytes + 8 + n;
  uint64_t data_size = size - 8 - n;

  json h;
  try {
    h = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::parse_error& e) {
    AM_FAIL("safetensors file '{}': the header is not valid JSON ({}); {}", path, e.what(), kCorrupt);
  }
  AM_CHECK(h.is_object(), "safetensors file '{}': the header must be a JSON object; {}", path, kCorrupt);

  std::vector<std::tuple<uint64_t, uint64_t, std::string>> ranges;  // non-empty (begin, end, name)
  for (auto& [name, v] : h.items()) {
    if (name == "__metadata__") {
      AM_CHECK(v.is_object(), "safetensors file '{}': __metadata__ must be an object of strings; {}", path, kCorrupt);
      for (auto& [k, s] : v.items()) {
        AM_CHECK(s.is_string(), "safetensors file '{}': __metadata__ value '{}' must be a string; {}", path, k, kCorrupt);
        metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    AM_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
             "safetensors file '{}': tensor '{}' must have dtype, shape and data_offsets; {}", path, name, kCorrupt);
    Entry e;
    const json &jd = v["dtype"], &js = v["shape"], &jo = v["data_offsets"];
    AM_CHECK(jd.is_string() && dtype_from_name(jd.get<std::string>(), &e.info.dtype),
             "safetensors file '{}': tensor '{}' has dtype {}, which automoe cannot read (supported: F64, F32, "
             "F16, BF16, I64, I32, I16, I8, U8, BOOL); convert the tensor with the safetensors Python package",
             path, name, jd.dump());
    AM_CHECK(js.is_array(), "safetensors file '{}': tensor '{}' has shape {}, expected a list of integers; {}", path,
             name, js.dump(), kCorrupt);
    uint64_t numel = 1;
    for (auto& d : js) {
      AM_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0,
               "safetensors file '{}': tensor '{}' has shape {} with a negative or non-integer dimension; {}", path,
               name, js.dump(), kCorrupt);
      uint64_t di = d.get<uint64_t>();
      AM_CHECK(di == 0 || numel <= (uint64_t(1) << 62) / di, "safetensors file '{}': tensor '{}' has shape {}, too "
               "large to be real; {}", path, name, js.dump(), kCorrupt);
      numel *= di;
      e.info.shape.push_back(int64_t(di));
    }
    AM_CHECK(jo.is_array() && jo.size() == 2 && jo[0].is_number_unsigned() && jo[1].is_number_unsigned(),
             "safetensors file '{}': tensor '{}' has data_offsets {}, expected [begin, end]; {}", path, name, jo.dump(),
             kCorrupt);
    e.begin = jo[0].get<uint64_t>();
    e.end = jo[1].get<uint64_t>();
    AM_CHECK(e.begin <= e.end && e.end <= data_size,
             "safetensors file '{}': tensor '{}' has data_offsets [{}, {}] out of range (the data section holds {} "
             "bytes); {}", path, name, e.begin, e.end, data_size, kCorrupt);
    uint64_t want = numel * dtype_size(e.info.dtype);
    AM_CHECK(e.end - e.begin == want,
             "safetensors file '{}': tensor '{}' is {} {} = {} bytes, but its data_offsets [{}, {}] span {} bytes "
             "(size mismatch); {}", path, name, dtype_name(e.info.dtype), shape_str(e.info.shape), want, e.begin,
             e.end, e.end - e.begin, kCorrupt);
    if (e.end > e.begin) ranges.emplace_back(e.begin, e.end, name);
    entries_.emplace(name, std::move(e));
    names_.push_back(name);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    AM_CHECK(std::get<0>(ranges[i]) >= std::get<1>(ranges[i - 1]),
             "safetensors file '{}': tensors '{}' and '{}' have overlapping data_offsets; {}", path,
             std::get<2>(ranges[i - 1]), std::get<2>(ranges[i]), kCorrupt);
  std::sort(names_.begin(), names_.end());
}

const SafetensorsFile::Entry& SafetensorsFile::entry(const std::string& name) const {
  auto it = entries_.find(name);
  AM_CHECK(it != entries_.end(), "safetensors file '{}' has no tensor '{}'", path_, name);
  return it->second;
}

TensorInfo SafetensorsFile::info(const std::string& name) const { return entry(name).info; }

Tensor SafetensorsFile::view(const std::string& name) const {
  const Entry& e = entry(name);
  // The mapping is read-only: clone() a view before writing to it.
  return Tensor::borrow(e.info.dtype, e.info.shape, const_cast<uint8_t*>(data_ + e.begin), map_);
}

Tensor SafetensorsFile::load_f32(const std::string& name) const {
  const Entry& e = entry(name);
  AM_CHECK(is_float(e.info.dtype), "safetensors file '{}': tensor '{}' is {}, not a floating-point tensor; read it "
           "with view()", path_, name, dtype_name(e.info.dtype));
  return view(name).to_f32();
}

// ---------------------------------------------------------------------------------------------
// SafetensorsModel

SafetensorsModel::SafetensorsModel(const std::string& dir) : dir_(dir) {
  AM_CHECK(fs::is_directory(dir), "model directory '{}' does not exist; pass the folder that holds config.json and "
           "the *.safetensors weights", dir);
  fs::path single = fs::path(dir) / "model.safetensors", index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {  // transformers also prefers the single file when both exist
    files_.emplace_back(single.string());
    for (auto& n : files_[0].names()) where_[n] = 0;
  } else if (fs::exists(index)) {
    std::ifstream f(index);
    std::stringstream ss;
    ss << f.rdbuf();
    json j;
    try {
      j = json::parse(ss.str());
    } catch (const json::parse_error& e) {
      AM_FAIL("'{}' is not valid JSON ({}); save the model again", index.string(), e.what());
    }
    AM_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             "'{}' has no \"weight_map\" object; it is not a safetensors index", index.string());
    fs::path root = fs::canonical(dir);
    std::map<std::string, size_t> opened;  // shard name -> index into files_
    for (auto& [name, v] : j["weight_map"].items()) {
      AM_CHECK(v.is_string(), "'{}': weight_map entry '{}' must be a file name", index.string(), name);
      std::string shard = v.get<std::string>();
      if (!opened.count(shard)) {
        fs::path rel(shard);
        bool escapes = shard.empty() || rel.has_root_path();
        for (auto& part : rel) escapes = escapes || part == "..";
        AM_CHECK(!escapes, "'{}': shard '{}' (for '{}') is outside the model directory; shard names must be plain "
                 "file names next to the index", index.string(), shard, name);
        fs::path full = fs::path(dir) / rel;
        AM_CHECK(fs::exists(full), "'{}' lists shard '{}', but '{}' is missing; download the complete model",
                 index.string(), shard, full.string());
        fs::path real = fs::canonical(full);
        auto [ri, fi] = std::mismatch(root.begin(), root.end(), real.begin(), real.end());
        AM_CHECK(ri == root.end(), "'{}': shard '{}' is a link to '{}', outside the model directory; copy the file "
                 "into the directory instead", index.string(), shard, real.string());
        opened[shard] = files_.size();
        files_.emplace_back(full.string());
      }
      size_t i = opened[shard];
      AM_CHECK(files_[i].has(name), "'{}' says tensor '{}' is in '{}', but that shard has no such tensor; the "
               "checkpoint is incomplete or mixed up", index.string(), name, shard);
      where_[name] = i;
    }
  } else {
    AM_FAIL("model directory '{}' has neither model.safetensors nor model.safetensors.index.json; automoe reads "
            "safetensors weights only (convert .bin checkpoints with transformers' save_pretrained)", dir);
  }
  for (auto& [n, i] : where_) names_.push_back(n);
}

const SafetensorsFile& SafetensorsModel::file_of(const std::string& name) const {
  auto it = where_.find(name);
  AM_CHECK(it != where_.end(), "model '{}' has no tensor '{}'", dir_, name);
  return files_[it->second];
}

// ---------------------------------------------------------------------------------------------
// Writers

void save_safetensors(const std::string& path, const NamedTensors& tensors, const SafetensorsMetadata& metadata) {
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    size_t sa = dtype_size(tensors[a].second.dtype), sb = dtype_size(tensors[b].second.dtype);
    return sa != sb ? sa > sb : tensors[a].first < tensors[b].first;
  });
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::vector<std::pair<const void*, size_t>> pieces(2);
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const auto& [name, t] = tensors[order[k]];
    AM_CHECK(name != "__metadata__" && !name.empty(), "cannot save a tensor named '{}' to '{}'", name, path);
    AM_CHECK(seen.insert(name).second, "cannot save '{}': tensor name '{}' appears twice", path, name);
    AM_CHECK(t.defined(), "cannot save '{}': tensor '{}' has no data", path, name);
    h[name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
    if (t.nbytes()) pieces.emplace_back(t.ptr, t.nbytes());
  }
  std::string header = h.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
  pieces[0] = {len, 8};
  pieces[1] = {header.data(), header.size()};
  atomic_write(path, pieces);
}

void save_sharded(const std::string& dir, const NamedTensors& tensors, int64_t max_shard_bytes,
                  const SafetensorsMetadata& metadata) {
  ShardedWriter w(dir, max_shard_bytes, metadata);
  for (auto& [n, t] : tensors) w.add(n, t);
  w.finish();
}

namespace {
std::string partial_shard(const std::string& dir, size_t i) {
  return (fs::path(dir) / fmt::format(".automoe-shard-{:05d}.safetensors", i + 1)).string();
}
}  // namespace

ShardedWriter::ShardedWriter(std::string dir, int64_t max_shard_bytes, SafetensorsMetadata metadata)
    : dir_(std::move(dir)), max_(max_shard_bytes), meta_(std::move(metadata)) {
  AM_CHECK(max_ > 0, "max shard size must be positive, got {}", max_);
  fs::create_directories(dir_);
}

void ShardedWriter::add(const std::string& name, const Tensor& t) {
  AM_CHECK(seen_.insert(name).second, "cannot save '{}': tensor name '{}' appears twice", dir_, name);
  int64_t b = int64_t(t.nbytes());
  if (cur_bytes_ > 0 && cur_bytes_ + b > max_) flush();  // a tensor larger than max gets a shard of its own
  cur_.emplace_back(name, t);
  cur_bytes_ += b;
  total_ += b;
}

void ShardedWriter::flush() {
  save_safetensors(partial_shard(dir_, written_.size()), cur_, meta_);
  written_.emplace_back();
  for (auto& [n, t] : cur_) written_.back().push_back(n);
  cur_.clear();
  cur_bytes_ = 0;
}

void ShardedWriter::finish() {
  fs::path single = fs::path(dir_) / "model.safetensors", index = fs::path(dir_) / "model.safetensors.index.json";
  std::set<std::string> written;
  if (written_.empty()) {  // everything fits one file
    save_safetensors(single.string(), cur_, meta_);
    cur_.clear();
    fs::remove(index);
  } else {
    if (!cur_.empty()) flush();
    json weight_map = json::object();
    for (size_t i = 0; i < written_.size(); ++i) {
      std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, written_.size());
      fs::rename(partial_shard(dir_, i), fs::path(dir_) / file);
      for (auto& n : written_[i]) weight_map[n] = file;
      written.insert(file);
    }
    json j = {{"metadata", {{"total_size", total_}}}, {"weight_map", weight_map}};
    std::string text = j.dump(2) + "\n";
    atomic_write(index.string(), {{text.data(), text.size()}});
    fs::remove(single);
  }
  static const std::regex shard_re(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (auto& e : fs::directory_iterator(dir_)) {
    std::string f = e.path().filename().string();
    if (std::regex_match(f, shard_re) && !written.count(f)) fs::remove(e.path());
  }
}

}  // namespace automoe
