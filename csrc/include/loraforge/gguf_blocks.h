// GGUF quantization blocks as llama.cpp (ggml) lays them out, and the scalar helpers whose exact
// rounding the packers depend on. Everything here compiles for the host and (under nvcc) for the
// device, so the CPU and CUDA packers run the same code (kquant_blocks.h says what that requires).
//
// Every type cuts a row into blocks of `elems` consecutive values and stores each block as `bytes`
// bytes; rows are whole numbers of blocks, so a [rows, cols] matrix is rows * cols / elems blocks
// back to back. Type ids are ggml's (the numbers gguf files and gguf-py's GGMLQuantizationType use).
//
// Byte layouts (fp16 values little-endian; "K" types use super-blocks of 256 values):
//   Q4_0  (18 B / 32):   d fp16 | qs[16]: value j in the low nibble of byte j, value j+16 in the high
//   Q8_0  (34 B / 32):   d fp16 | qs[32] int8
//   Q2_K  (84 B / 256):  scales[16] (low nibble scale, high nibble min) | qs[64] | d fp16 | dmin fp16
//   Q3_K  (110 B / 256): hmask[32] | qs[64] | scales[12] (16 six-bit scales) | d fp16
//   Q4_K  (144 B / 256): d fp16 | dmin fp16 | scales[12] (8 six-bit scales + 8 six-bit mins) | qs[128]
//   Q5_K  (176 B / 256): d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]
//   Q6_K  (210 B / 256): ql[128] | qh[64] | scales[16] int8 | d fp16
#pragma once
#include <cstdint>
#include <cstring>

// LF_HD_INLINE: an inline function for host and device. Forced inline on the device so that the
// small per-group arrays of the packers stay in registers once their loops are unrolled.
#if defined(__CUDACC__)
#define LF_HD_INLINE __host__ __device__ __forceinline__
#define LF_UNROLL _Pragma("unroll")
#define LF_NO_UNROLL _Pragma("unroll 1")
#else
#define LF_HD_INLINE inline
#define LF_UNROLL
#define LF_NO_UNROLL
#endif

namespace loraforge {
namespace gguf {

enum QType : int {
  kQ4_0 = 2,
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
};

constexpr int kSuperBlock = 256;  // values per K-quant block (ggml's QK_K)
constexpr int kLegacyBlock = 32;  // values per Q4_0 / Q8_0 block

struct BlockInfo {
  int elems = 0;  // values per block
  int bytes = 0;  // bytes per block
};

// False for a type id we do not pack.
inline bool block_info(int qtype, BlockInfo* info) {
  switch (qtype) {
    case kQ4_0: *info = {kLegacyBlock, 2 + 16}; return true;
    case kQ8_0: *info = {kLegacyBlock, 2 + 32}; return true;
    case kQ2_K: *info = {kSuperBlock, 16 + 64 + 2 + 2}; return true;
    case kQ3_K: *info = {kSuperBlock, 32 + 64 + 12 + 2}; return true;
    case kQ4_K: *info = {kSuperBlock, 2 + 2 + 12 + 128}; return true;
    case kQ5_K: *info = {kSuperBlock, 2 + 2 + 12 + 32 + 128}; return true;
    case kQ6_K: *info = {kSuperBlock, 128 + 64 + 16 + 2}; return true;
    default: return false;
  }
}

// ---- fp16 as ggml converts it ------------------------------------------------------------------
// Round to nearest even, overflow to +-inf, subnormals kept; every NaN becomes the quiet NaN 0x7e00
// with the input's sign. Written with integer arithmetic so the result never depends on the
// compiler's or the CPU's own half-precision support.
// The bits of a float and back (std::memcpy on the host, the intrinsics on the device).
LF_HD_INLINE std::uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

LF_HD_INLINE float float_from_bits(std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

LF_HD_INLINE std::uint16_t fp16_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (magnitude >= 0x38800000u) {  // normal in fp16: rebias the exponent, round 13 mantissa bits away
    const std::uint32_t rebiased = magnitude - ((127u - 15u) << 23);
    const std::uint32_t half = 0xfffu + ((rebiased >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | ((rebiased + half) >> 13));
  }
  if (magnitude < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
  // Subnormal in fp16: make the implicit bit explicit and shift it into place, rounding to even.
  const std::uint32_t exponent = magnitude >> 23;
  const std::uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exponent;  // 14..24
  const std::uint32_t kept = mantissa >> shift;
  const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  const std::uint32_t round_up = (rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u;
  return static_cast<std::uint16_t>(sign | (kept + round_up));
}

// Exact (every fp16 value is an fp32 value).
LF_HD_INLINE float fp16_to_float(std::uint16_t half) {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  std::uint32_t mantissa = half & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN, payload kept
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    std::uint32_t e = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
  }
  return float_from_bits(bits);
}

LF_HD_INLINE void store_fp16(std::uint8_t* dst, float value) {
  const std::uint16_t half = fp16_from_float(value);
  dst[0] = static_cast<std::uint8_t>(half & 0xffu);
  dst[1] = static_cast<std::uint8_t>(half >> 8);
}

LF_HD_INLINE float load_fp16(const std::uint8_t* src) {
  return fp16_to_float(static_cast<std::uint16_t>(src[0] | (src[1] << 8)));
}

// ---- rounding to an integer as the K-quant search does it -------------------------------------
// Adding 1.5 * 2^23 leaves the rounded-to-nearest-even integer in the low mantissa bits. llama.cpp
// rounds every K-quant level this way, and only for |v| < 2^22 does it equal rint(v); outside that
// range (huge or infinite ratios) it yields deterministic garbage, which we must reproduce too, so
// we use the same trick rather than std::nearbyint.
//
// A NaN is where host and device part ways. Our inputs are finite, so every NaN here is generated
// by an invalid operation (inf - inf, 0 * inf: huge inputs), and CPUs produce the default NaN, whose
// low 23 bits are 0x400000 (x86: 0xffc00000, Arm: 0x7fc00000), and carry it through later
// arithmetic: ggml's result is 0. NVIDIA GPUs produce the canonical NaN 0x7fffffff, which would give
// 0x3fffff; so the device returns the CPU's 0 explicitly.
LF_HD_INLINE int round_magic(float v) {
  const float shifted = v + 12582912.0f;
#if defined(__CUDA_ARCH__)
  if (shifted != shifted) return 0;
#endif
  return static_cast<std::int32_t>(float_bits(shifted) & 0x007fffffu) - 0x00400000;
}

}  // namespace gguf
}  // namespace loraforge
