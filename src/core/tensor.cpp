// core/tensor.cpp: host tensor storage, dtype names and float conversions.
#include "core/tensor.h"

#include <cmath>

namespace automoe {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32"; case DType::F16: return "F16"; case DType::BF16: return "BF16";
    case DType::F64: return "F64"; case DType::I64: return "I64"; case DType::I32: return "I32";
    case DType::I16: return "I16"; case DType::I8: return "I8"; case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

bool dtype_from_name(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> table[] = {
      {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16}, {"F64", DType::F64},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16},   {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL}};
  for (auto& [n, t] : table)
    if (s == n) { *out = t; return true; }
  return false;
}

int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Tensor Tensor::empty(DType t, Shape s) {
  for (auto d : s) AM_CHECK(d >= 0, "negative dimension in shape {}", shape_str(s));
  Tensor x;
  x.dtype = t;
  x.shape = std::move(s);
  size_t n = x.nbytes();
  x.storage = std::shared_ptr<uint8_t[]>(new uint8_t[n > 0 ? n : 1]);
  x.ptr = x.storage.get();
  return x;
}

Tensor Tensor::zeros(DType t, Shape s) {
  Tensor x = empty(t, std::move(s));
  std::memset(x.ptr, 0, x.nbytes());
  return x;
}

Tensor Tensor::borrow(DType t, Shape s, void* p, std::shared_ptr<void> keep) {
  Tensor x;
  x.dtype = t;
  x.shape = std::move(s);
  x.ptr = static_cast<uint8_t*>(p);
  x.keepalive = std::move(keep);
  return x;
}

Tensor Tensor::clone() const {
  Tensor y = empty(dtype, shape);
  if (nbytes()) std::memcpy(y.ptr, ptr, nbytes());
  return y;
}

Tensor Tensor::to_f32() const {
  if (dtype == DType::F32) return clone();
  Tensor y = empty(DType::F32, shape);
  float* o = y.data<float>();
  int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::F16: o[i] = f16_to_f32(data<uint16_t>()[i]); break;
      case DType::BF16: o[i] = bf16_to_f32(data<uint16_t>()[i]); break;
      case DType::F64: o[i] = float(data<double>()[i]); break;
      case DType::I64: o[i] = float(data<int64_t>()[i]); break;
      case DType::I32: o[i] = float(data<int32_t>()[i]); break;
      case DType::I16: o[i] = float(data<int16_t>()[i]); break;
      case DType::I8: o[i] = float(data<int8_t>()[i]); break;
      case DType::U8: case DType::BOOL: o[i] = float(data<uint8_t>()[i]); break;
      case DType::F32: break;
    }
  }
  return y;
}

float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) u = sign;
    else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) u = sign | 0x7f800000u | man << 13;
  else u = sign | (exp + 112) << 23 | man << 13;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  int32_t exp = int32_t((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffff;
  if (((u >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = uint32_t(exp) << 10 | man >> 13, rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return uint16_t(sign | r);
}

}  // namespace automoe
