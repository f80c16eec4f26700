// The GGUF block packers (Q8_0, Q4_0, Q2_K..Q6_K), byte-identical to llama.cpp's reference
// quantizers (`ggml_quantize_chunk` without an importance matrix), written once for the CPU
// (csrc/cpu/kquant_cpu.cpp) and the GPU (csrc/cuda/kquant_cuda.cu). Both compile this header, so
// the arithmetic cannot drift between them; only the orchestration differs.
//
// A K-quant super-block of 256 values is packed in four phases:
//   1. fit_group      each group of 16 or 32 values on its own: a scale search (kquant_search.h)
//                     giving a float scale (and min) and the group's integer levels
//   2. store_scales   all groups' scales at once: the super-block scale(s) as fp16 and the
//                     quantized per-group scales; false when the block is finished (all zero)
//   3. relevel_group  each group again: levels re-derived from the scales *as stored* (so they agree
//                     with what a reader reconstructs); a group whose stored scale is 0 keeps the
//                     fit's levels
//   4. pack           the levels into the block's bit fields; output bytes [part, part + parts, ...)
//                     so that several threads can share the work (each byte is written whole)
// `quantize_superblock` runs them in order on one thread (the CPU); the CUDA kernel runs phases 1
// and 3 with one thread per group and phase 2 on one thread per super-block, which is the same
// computation: no phase reads anything another group's phase 1 or 3 writes.
//
// Exactness on both sides rests on: IEEE fp32 division and square root (nvcc's defaults
// -prec-div=true -prec-sqrt=true, no fast math; the square root is __fsqrt_rn explicitly), no FMA
// contraction (--fmad=false for nvcc, -ffp-contract=off for the C++ compilers), subnormals kept
// (-ftz=false), every reduction in index order on one thread, and the same rounding helpers. Host and
// device code differ only inside those helpers, and only in how, not what: bit casts (memcpy vs
// intrinsics), fabs, sqrt, roundf (the C library's on the host, an exact equivalent on the device,
// checked against it for all 2^32 inputs) and round_magic of a NaN (gguf_blocks.h: the GPU's NaN has
// other bits than the CPU's). Sub-block scales are rounded with round_magic and narrowed to bytes by
// plain truncation, exactly as ggml does, because those choices show in the bytes.
#pragma once
#include <cstdint>

#include "loraforge/gguf_blocks.h"
#include "loraforge/kquant_search.h"

#if defined(__CUDACC__) && defined(__USE_FAST_MATH__)
#error "kquant_blocks.h needs IEEE division, square root and subnormals: do not build it with --use_fast_math"
#endif

namespace loraforge {
namespace gguf {

using u8 = std::uint8_t;

// C converts an out-of-range float to an integer with undefined behaviour; llama.cpp's reference
// does so for Q4_0 / Q8_0 blocks whose scale is so small that its reciprocal overflows (|max| below
// about 1e-37). x86-64 compilers emit cvttss2si there, which yields INT32_MIN for NaN, +-inf and
// anything beyond int32; we spell that out so the result depends on neither compiler nor device.
LF_HD_INLINE std::int32_t truncate_like_cvtt(float v) {
  if (!(v > -2147483904.0f && v < 2147483648.0f)) return -2147483647 - 1;
  return static_cast<std::int32_t>(v);
}

// roundf: halfway cases away from zero. The host calls the C library's (exactly specified, and what
// ggml calls). The device does not depend on its math library: the same function from operations
// that are exact everywhere (the sign of a zero result aside, which no caller sees: each converts to
// an integer). Below 2^23 the int32 conversion truncates exactly, v - t is exact (Sterbenz: same
// sign, |t| <= |v| < |t| + 1, or |v| < 1) and so is t +- 1; from 2^23 on every float is an integer,
// and inf and NaN come back as they are.
LF_HD_INLINE float round_half_away(float v) {
#if defined(__CUDA_ARCH__)
  const bool small = abs_value(v) < 8388608.0f;  // false for inf and NaN too
  const float s = small ? v : 0.0f;
  const float t = static_cast<float>(static_cast<std::int32_t>(s));
  const float fraction = s - t;
  const float rounded = t + (fraction >= 0.5f ? 1.0f : (fraction <= -0.5f ? -1.0f : 0.0f));
  return small ? rounded : v;
#else
  return __builtin_roundf(v);
#endif
}

LF_HD_INLINE void zero_bytes(u8* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = 0;
}

// ---- Q8_0: d = max|x| / 127, q = round-half-away(x / d) ------------------------------------------
struct Q8_0Block {
  static constexpr int kElems = kLegacyBlock, kBytes = 34;

  LF_HD_INLINE static void quantize(const float* x, u8* block) {
    float amax = 0.0f;
    LF_UNROLL
    for (int j = 0; j < kLegacyBlock; ++j) {
      const float a = abs_value(x[j]);
      amax = amax > a ? amax : a;
    }
    const float d = amax / 127;
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;  // multiply by a reciprocal, as ggml does
    store_fp16(block, d);
    LF_UNROLL
    for (int j = 0; j < kLegacyBlock; ++j) {
      block[2 + j] = static_cast<u8>(truncate_like_cvtt(round_half_away(x[j] * inv)));
    }
  }
};

// ---- Q4_0: d = (signed value of max magnitude) / -8, q = trunc(x / d + 8.5) capped at 15 ---------
// Dividing by -8 puts the extreme value on level 0 (-8), so the other side reaches only +7.
struct Q4_0Block {
  static constexpr int kElems = kLegacyBlock, kBytes = 18;

  LF_HD_INLINE static int level(float v, float inv) {
    // (int8_t) of the truncated value, then min with 15: both as ggml narrows them.
    const int l = static_cast<std::int8_t>(truncate_like_cvtt(v * inv + 8.5f));
    return l < 15 ? l : 15;
  }

  LF_HD_INLINE static void quantize(const float* x, u8* block) {
    float amax = 0.0f;
    float extreme = 0.0f;
    LF_UNROLL
    for (int j = 0; j < kLegacyBlock; ++j) {
      if (amax < abs_value(x[j])) {
        amax = abs_value(x[j]);
        extreme = x[j];
      }
    }
    const float d = extreme / -8;
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
    store_fp16(block, d);
    LF_UNROLL
    for (int j = 0; j < kLegacyBlock / 2; ++j) {
      const int lo = level(x[j], inv), hi = level(x[j + 16], inv);
      block[2 + j] = static_cast<u8>(static_cast<u8>(lo) | static_cast<u8>(static_cast<unsigned>(hi) << 4));
    }
  }
};

// ---- bit fields shared by the K types ------------------------------------------------------------

// 2-bit levels of 256 values in 64 bytes: each 128-value half fills 32 bytes, value (half, i + 32k)
// in bits 2k..2k+1 of byte i. Q3_K's levels 0..7 keep bit 2 elsewhere: kDropBit2 takes it off.
template <bool kDropBit2>
LF_HD_INLINE int low_2bit(u8 level) {
  const int l = level;
  return kDropBit2 && l > 3 ? l - 4 : l;
}

template <bool kDropBit2>
LF_HD_INLINE u8 pack_2bit_byte(const u8* levels, int byte) {
  const u8* l = levels + 128 * (byte / 32);
  const int i = byte % 32;
  return static_cast<u8>(low_2bit<kDropBit2>(l[i]) | (low_2bit<kDropBit2>(l[i + 32]) << 2) |
                         (low_2bit<kDropBit2>(l[i + 64]) << 4) | (low_2bit<kDropBit2>(l[i + 96]) << 6));
}

// Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes. Groups 0-3 sit whole in bytes
// 0-3 (scale) and 4-7 (min); groups 4-7 keep their low nibbles in bytes 8-11 and their top two bits
// in the spare top bits of bytes 0-3 (scale) and 4-7 (min).
LF_HD_INLINE void pack_scale_min_k4(const u8* scales, const u8* mins, u8* packed) {
  for (int j = 0; j < 4; ++j) {
    packed[j] = scales[j];
    packed[j + 4] = mins[j];
  }
  for (int j = 4; j < 8; ++j) {
    packed[j + 4] = static_cast<u8>((scales[j] & 0x0f) | ((mins[j] & 0x0f) << 4));
    packed[j - 4] = static_cast<u8>(packed[j - 4] | ((scales[j] >> 4) << 6));
    packed[j] = static_cast<u8>(packed[j] | ((mins[j] >> 4) << 6));
  }
}

LF_HD_INLINE void unpack_scale_min_k4(const u8* packed, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4);
    *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// Q3_K: sixteen 6-bit scales (stored biased by +32) in 12 bytes. Low nibbles: scales 0-7 in the low
// halves of bytes 0-7, scales 8-15 in their high halves; top two bits of scale j in bits
// 2*(j/4)..2*(j/4)+1 of byte 8 + j%4.
LF_HD_INLINE void pack_scales_q3(const int* biased, u8* packed) {
  zero_bytes(packed, 12);
  for (int j = 0; j < 16; ++j) {
    const int low = biased[j] & 0x0f;
    if (j < 8) {
      packed[j] = static_cast<u8>(low);
    } else {
      packed[j - 8] = static_cast<u8>(packed[j - 8] | (low << 4));
    }
    packed[8 + j % 4] = static_cast<u8>(packed[8 + j % 4] | ((biased[j] >> 4) << (2 * (j / 4))));
  }
}

LF_HD_INLINE int unpack_scale_q3(const u8* packed, int j) {
  const int low = j < 8 ? (packed[j] & 0x0f) : (packed[j - 8] >> 4);
  const int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// ---- Q2_K: 16 groups of 16, value = d*s_j*q - dmin*m_j, 4-bit s_j and m_j ----------------------
struct Q2_KBlock {
  static constexpr int kGroups = 16, kGroupSize = 16, kBytes = 84;
  static constexpr int kScales = 0, kQs = 16, kD = 80, kDmin = 82;

  LF_HD_INLINE static void fit_group(const float* g, u8* levels, float* scale, float* min) {
    float weights[16];
    LF_UNROLL
    for (int l = 0; l < 16; ++l) weights[l] = abs_value(g[l]);
    *scale = fit_affine_weighted<16>(3, g, weights, levels, min, -0.5f, 0.1f, 15, true);
  }

  LF_HD_INLINE static bool store_scales(const float* scales, const float* mins, u8* block) {
    float max_scale = 0.0f, max_min = 0.0f;  // both >= 0: the fit subtracts the min
    for (int j = 0; j < 16; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    u8* packed = block + kScales;
    if (max_scale > 0) {
      const float inv = 15.0f / max_scale;
      for (int j = 0; j < 16; ++j) packed[j] = static_cast<u8>(round_magic(inv * scales[j]));
      store_fp16(block + kD, max_scale / 15.0f);
    } else {
      zero_bytes(packed, 16);
      store_fp16(block + kD, 0.0f);
    }
    if (max_min > 0) {
      const float inv = 15.0f / max_min;
      for (int j = 0; j < 16; ++j) {
        const unsigned m = static_cast<unsigned>(round_magic(inv * mins[j]));
        packed[j] = static_cast<u8>(packed[j] | (m << 4));
      }
      store_fp16(block + kDmin, max_min / 15.0f);
    } else {
      store_fp16(block + kDmin, 0.0f);
    }
    return true;
  }

  LF_HD_INLINE static void relevel_group(const float* g, int j, const u8* block, u8* levels) {
    const float d = load_fp16(block + kD) * (block[kScales + j] & 0x0f);
    if (d == 0.0f) return;
    const float dm = load_fp16(block + kDmin) * (block[kScales + j] >> 4);
    LF_UNROLL
    for (int l = 0; l < 16; ++l) levels[l] = static_cast<u8>(clamp_level(round_magic((g[l] + dm) / d), 0, 3));
  }

  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    for (int b = part; b < 64; b += parts) block[kQs + b] = pack_2bit_byte<false>(levels, b);
  }
};

// ---- Q3_K: 16 groups of 16, value = d*s_j*(q-4), signed 6-bit s_j, 3-bit q ----------------------
struct Q3_KBlock {
  static constexpr int kGroups = 16, kGroupSize = 16, kBytes = 110;
  static constexpr int kHmask = 0, kQs = 32, kScales = 96, kD = 108;

  LF_HD_INLINE static void fit_group(const float* g, u8* levels, float* scale, float* min) {
    *scale = fit_symmetric_refined<16>(4, g, levels);
    *min = 0.0f;
  }

  LF_HD_INLINE static bool store_scales(const float* scales, const float*, u8* block) {
    float amax = 0.0f, max_scale = 0.0f;  // the scale of largest magnitude, with its sign
    for (int j = 0; j < 16; ++j) {
      const float a = abs_value(scales[j]);
      if (a > amax) {
        amax = a;
        max_scale = scales[j];
      }
    }
    if (max_scale != 0.0f) {
      // -32 / max_scale maps the largest scale to -32, the end of the 6-bit signed range with room.
      const float inv = -32.0f / max_scale;
      int biased[16];
      for (int j = 0; j < 16; ++j) {
        const int l = static_cast<std::int8_t>(round_magic(inv * scales[j]));  // narrowed first, as ggml
        biased[j] = clamp_level(l, -32, 31) + 32;
      }
      pack_scales_q3(biased, block + kScales);
      store_fp16(block + kD, 1 / inv);
    } else {
      zero_bytes(block + kScales, 12);
      store_fp16(block + kD, 0.0f);
    }
    return true;
  }

  LF_HD_INLINE static void relevel_group(const float* g, int j, const u8* block, u8* levels) {
    const float d = load_fp16(block + kD) * unpack_scale_q3(block + kScales, j);
    if (d == 0.0f) return;
    LF_UNROLL
    for (int l = 0; l < 16; ++l) levels[l] = static_cast<u8>(clamp_level(round_magic(g[l] / d), -4, 3) + 4);
  }

  // Levels 0..7: bit 2 goes to hmask (value v -> byte v%32, bit v/32), bits 0-1 to qs as in Q2_K.
  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    for (int b = part; b < 32 + 64; b += parts) {
      if (b < 32) {
        int mask = 0;
        for (int k = 0; k < 8; ++k) mask |= (levels[b + 32 * k] > 3 ? 1 : 0) << k;
        block[kHmask + b] = static_cast<u8>(mask);
      } else {
        block[kQs + b - 32] = pack_2bit_byte<true>(levels, b - 32);
      }
    }
  }
};

// ---- Q4_K / Q5_K: 8 groups of 32, value = d*s_j*q - dmin*m_j, 6-bit s_j and m_j ----------------
// Kind holds the search grid of the type (nmax, rmin, rdelta, nstep) and its level layout.
template <class Kind>
struct Groups32Block {
  static constexpr int kGroups = 8, kGroupSize = 32, kBytes = Kind::kBytes;
  static constexpr int kD = 0, kDmin = 2, kScales = 4;

  LF_HD_INLINE static void fit_group(const float* g, u8* levels, float* scale, float* min) {
    // Weights favour large values over an rms floor: relative error matters most where |x| is large.
    float sum_x2 = 0.0f;
    LF_UNROLL
    for (int l = 0; l < 32; ++l) sum_x2 += g[l] * g[l];
#if defined(__CUDA_ARCH__)
    const float rms = __fsqrt_rn(sum_x2 / 32);
#else
    const float rms = __builtin_sqrtf(sum_x2 / 32);
#endif
    float weights[32];
    LF_UNROLL
    for (int l = 0; l < 32; ++l) weights[l] = rms + abs_value(g[l]);
    *scale = fit_affine_weighted<32>(Kind::kNmax, g, weights, levels, min, Kind::kRmin, 0.1f, Kind::kNstep, false);
  }

  LF_HD_INLINE static bool store_scales(const float* scales, const float* mins, u8* block) {
    float max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    u8 qscales[8], qmins[8];
    for (int j = 0; j < 8; ++j) {
      // ggml narrows to a byte before capping at 63, so a negative rounded value (a degenerate group's
      // fit) wraps to a large byte and ends up as 63; we narrow the same way.
      const u8 s = static_cast<u8>(round_magic(inv_scale * scales[j]));
      const u8 m = static_cast<u8>(round_magic(inv_min * mins[j]));
      qscales[j] = s < 63 ? s : 63;
      qmins[j] = m < 63 ? m : 63;
    }
    pack_scale_min_k4(qscales, qmins, block + kScales);
    store_fp16(block + kD, max_scale / 63.0f);
    store_fp16(block + kDmin, max_min / 63.0f);
    return true;
  }

  LF_HD_INLINE static void relevel_group(const float* g, int j, const u8* block, u8* levels) {
    int s, m;
    unpack_scale_min_k4(block + kScales, j, &s, &m);
    const float d = load_fp16(block + kD) * s;
    if (d == 0.0f) return;  // keep the fit's levels
    const float dm = load_fp16(block + kDmin) * m;
    LF_UNROLL
    for (int l = 0; l < 32; ++l) {
      levels[l] = static_cast<u8>(clamp_level(round_magic((g[l] + dm) / d), 0, Kind::kNmax));
    }
  }

  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    Kind::pack(levels, block, part, parts);
  }
};

struct Q4_KLayout {
  static constexpr int kNmax = 15, kNstep = 20, kBytes = 144, kQs = 16;
  static constexpr float kRmin = -1.0f;
  // Groups 2k and 2k+1 share 32 bytes: low nibbles then high nibbles.
  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    for (int b = part; b < 128; b += parts) {
      const u8* l = levels + 64 * (b / 32);
      const int i = b % 32;
      block[kQs + b] = static_cast<u8>(l[i] | (l[i + 32] << 4));
    }
  }
};

struct Q5_KLayout {
  static constexpr int kNmax = 31, kNstep = 15, kBytes = 176, kQh = 16, kQs = 48;
  static constexpr float kRmin = -0.5f;
  // As Q4_K for the low 4 bits; bit 4 of group g's value i goes to bit g of qh[i].
  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    for (int b = part; b < 32 + 128; b += parts) {
      if (b < 32) {
        int high = 0;
        for (int pair = 0; pair < 4; ++pair) {
          const u8* l = levels + 64 * pair;
          high |= ((l[b] >> 4) << (2 * pair)) | ((l[b + 32] >> 4) << (2 * pair + 1));
        }
        block[kQh + b] = static_cast<u8>(high);
      } else {
        const int q = b - 32;
        const u8* l = levels + 64 * (q / 32);
        const int i = q % 32;
        block[kQs + q] = static_cast<u8>((l[i] & 0x0f) | ((l[i + 32] & 0x0f) << 4));
      }
    }
  }
};

using Q4_KBlock = Groups32Block<Q4_KLayout>;
using Q5_KBlock = Groups32Block<Q5_KLayout>;

// ---- Q6_K: 16 groups of 16, value = d*s_j*(q-32), signed 8-bit s_j, 6-bit q ---------------------
struct Q6_KBlock {
  static constexpr int kGroups = 16, kGroupSize = 16, kBytes = 210;
  static constexpr int kQl = 0, kQh = 128, kScales = 192, kD = 208;
  static constexpr float kZeroBlock = 1e-15f;  // ggml's GROUP_MAX_EPS

  LF_HD_INLINE static void fit_group(const float* g, u8* levels, float* scale, float* min) {
    *scale = fit_symmetric_weighted<16>(32, g, levels);
    *min = 0.0f;
  }

  LF_HD_INLINE static bool store_scales(const float* scales, const float*, u8* block) {
    float max_abs = 0.0f, max_scale = 0.0f;
    for (int j = 0; j < 16; ++j) {
      const float a = abs_value(scales[j]);
      if (a > max_abs) {
        max_abs = a;
        max_scale = scales[j];
      }
    }
    if (max_abs < kZeroBlock) {
      zero_bytes(block, kBytes);  // d = +0 too; nothing left to pack
      return false;
    }
    // -128 / max_scale puts the largest scale on -128 (capped at 127 on the other side).
    const float inv = -128.0f / max_scale;
    store_fp16(block + kD, 1 / inv);
    for (int j = 0; j < 16; ++j) {
      const int s = round_magic(inv * scales[j]);
      block[kScales + j] = static_cast<u8>(static_cast<std::int8_t>(s < 127 ? s : 127));
    }
    return true;
  }

  LF_HD_INLINE static void relevel_group(const float* g, int j, const u8* block, u8* levels) {
    const float d = load_fp16(block + kD) * static_cast<std::int8_t>(block[kScales + j]);
    if (d == 0.0f) return;
    LF_UNROLL
    for (int l = 0; l < 16; ++l) levels[l] = static_cast<u8>(clamp_level(round_magic(g[l] / d), -32, 31) + 32);
  }

  // Per 128-value half h: value (h, i + 32k), k = 0..3, has its low nibble in ql[64h + i + 32*(k%2)]
  // (k < 2 low half of the byte, else high half) and its top two bits in bits 2k..2k+1 of qh[32h + i].
  LF_HD_INLINE static void pack(const u8* levels, u8* block, int part, int parts) {
    for (int b = part; b < 128 + 64; b += parts) {
      if (b < 128) {
        const u8* l = levels + 128 * (b / 64) + 32 * ((b % 64) / 32);
        const int i = b % 32;
        block[kQl + b] = static_cast<u8>((l[i] & 0x0f) | ((l[i + 64] & 0x0f) << 4));
      } else {
        const int q = b - 128;
        const u8* l = levels + 128 * (q / 32);
        const int i = q % 32;
        block[kQh + q] = static_cast<u8>((l[i] >> 4) | ((l[i + 32] >> 4) << 2) | ((l[i + 64] >> 4) << 4) |
                                         ((l[i + 96] >> 4) << 6));
      }
    }
  }
};

// All four phases of one super-block on the calling thread (the CPU packer's path).
template <class K>
LF_HD_INLINE void quantize_superblock(const float* x, u8* block) {
  constexpr int kN = K::kGroupSize;
  u8 levels[kSuperBlock];
  float scales[K::kGroups], mins[K::kGroups];
  for (int j = 0; j < K::kGroups; ++j) K::fit_group(x + kN * j, levels + kN * j, &scales[j], &mins[j]);
  if (!K::store_scales(scales, mins, block)) return;
  for (int j = 0; j < K::kGroups; ++j) K::relevel_group(x + kN * j, j, block, levels + kN * j);
  K::pack(levels, block, 0, 1);
}

}  // namespace gguf
}  // namespace loraforge
