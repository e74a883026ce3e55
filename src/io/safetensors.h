// io/safetensors.h: read (mmap, zero-copy, validated) and write (atomic, sharded) safetensors
// files and Hugging Face model directories (model.safetensors or model.safetensors.index.json).
// Format: [u64 little-endian header length N][N bytes of JSON header][data]; the header maps
// each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} relative to the data.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace automoe {

struct TensorInfo {
  DType dtype = DType::F32;
  Shape shape;
};

using SafetensorsMetadata = std::map<std::string, std::string>;  // the header's "__metadata__"
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// One .safetensors file, mapped read-only (copy-on-write: a write to a view never reaches the
// file). Every check happens in the constructor; errors name the file. Copies share the mapping.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<std::string>& names() const { return names_; }  // sorted
  const SafetensorsMetadata& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  TensorInfo info(const std::string& name) const;
  // Zero-copy view into the mapping; the tensor keeps the mapping alive.
  Tensor view(const std::string& name) const;
  // A fresh F32 copy of an F32/BF16/F16/F64 tensor.
  Tensor load_f32(const std::string& name) const;

 private:
  struct Entry {
    TensorInfo info;
    uint64_t begin = 0, end = 0;  // byte range inside the data section
  };
  const Entry& entry(const std::string& name) const;

  std::string path_;
  std::shared_ptr<void> map_;  // the mapping (munmap on last release)
  const uint8_t* data_ = nullptr;  // first byte after the header
  std::map<std::string, Entry> entries_;
  std::vector<std::string> names_;
  SafetensorsMetadata metadata_;
};

// A Hugging Face model directory: `model.safetensors`, or `model.safetensors.index.json` whose
// weight_map sends each tensor name to a shard file inside the directory.
class SafetensorsModel {
 public:
  explicit SafetensorsModel(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const std::vector<std::string>& names() const { return names_; }  // sorted, over all shards
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const;
  TensorInfo info(const std::string& name) const { return file_of(name).info(name); }
  Tensor view(const std::string& name) const { return file_of(name).view(name); }
  Tensor load_f32(const std::string& name) const { return file_of(name).load_f32(name); }

 private:
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
  std::vector<std::string> names_;
};

// Writes one file (tensors keep their dtype) to `path + ".tmp"`, fsyncs, then renames it over
// `path`, so a crash never leaves a half-written file. Header entries and data are ordered by
// element size (largest first, so every tensor stays aligned) then name; the header is padded
// with spaces to a multiple of 8 bytes, as the reference implementation does.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const SafetensorsMetadata& metadata = {});

// Writes a model directory as transformers' save_pretrained does: one `model.safetensors` when
// everything fits in `max_shard_bytes`, else `model-0000i-of-0000N.safetensors` shards (filled in
// the given order; a tensor larger than the limit gets a shard of its own) plus
// `model.safetensors.index.json`. Weight files of the other layout left in `dir` are removed.
void save_sharded(const std::string& dir, const NamedTensors& tensors, int64_t max_shard_bytes,
                  const SafetensorsMetadata& metadata = {});

// save_sharded, streamed: add() tensors in order; a shard is written as soon as it is full (under
// a temporary name), so only one shard is held at a time; finish() names the shards, writes the
// index and removes weight files of the other layout. The files equal save_sharded's.
class ShardedWriter {
 public:
  ShardedWriter(std::string dir, int64_t max_shard_bytes, SafetensorsMetadata metadata = {});
  void add(const std::string& name, const Tensor& t);  // keeps `t` (shares its storage) until written
  void finish();

 private:
  void flush();
  std::string dir_;
  int64_t max_;
  SafetensorsMetadata meta_;
  std::set<std::string> seen_;                    // names added, for the duplicate check
  NamedTensors cur_;                              // the shard being filled
  int64_t cur_bytes_ = 0, total_ = 0;
  std::vector<std::vector<std::string>> written_;  // names of each shard already written
};

}  // namespace automoe
