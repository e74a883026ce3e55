// core/tensor.h: a host tensor: dtype, shape (row-major, contiguous) and shared storage.
// Used for I/O (safetensors), batches and CPU parameters. Views share storage with an offset.
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"

namespace automoe {

enum class DType { F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", "I64", ...
bool dtype_from_name(const std::string& s, DType* out);

using Shape = std::vector<int64_t>;
int64_t numel_of(const Shape& s);
std::string shape_str(const Shape& s);  // "[2, 13]"

struct Tensor {
  DType dtype = DType::F32;
  Shape shape;
  std::shared_ptr<uint8_t[]> storage;  // owner (may be null for a borrowed buffer)
  uint8_t* ptr = nullptr;               // first element

  static Tensor empty(DType t, Shape s);
  static Tensor zeros(DType t, Shape s);
  // Borrow memory owned by someone else (e.g. an mmap or a parameter arena); `keep` holds it alive.
  static Tensor borrow(DType t, Shape s, void* p, std::shared_ptr<void> keep = nullptr);

  int64_t numel() const { return numel_of(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  bool defined() const { return ptr != nullptr || numel() == 0; }

  template <class T> T* data() { return reinterpret_cast<T*>(ptr); }
  template <class T> const T* data() const { return reinterpret_cast<const T*>(ptr); }
  float* f32() { AM_CHECK(dtype == DType::F32, "expected an F32 tensor, got {}", dtype_name(dtype)); return data<float>(); }
  const float* f32() const { AM_CHECK(dtype == DType::F32, "expected an F32 tensor, got {}", dtype_name(dtype)); return data<float>(); }
  int64_t* i64() { AM_CHECK(dtype == DType::I64, "expected an I64 tensor, got {}", dtype_name(dtype)); return data<int64_t>(); }
  const int64_t* i64() const { AM_CHECK(dtype == DType::I64, "expected an I64 tensor, got {}", dtype_name(dtype)); return data<int64_t>(); }

  Tensor clone() const;
  Tensor to_f32() const;  // converts F16/BF16/F64 (and integer types) to F32
  std::shared_ptr<void> keepalive;  // for borrowed tensors
};

// bf16/f16 <-> f32 (round to nearest even for bf16).
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace automoe
