// GGUF block packing (Q4_0, Q8_0, Q2_K..Q6_K) and unpacking on the CPU, byte-identical to what
// llama.cpp's `ggml_quantize_chunk(type, src, dst, 0, rows, cols, /*imatrix=*/NULL)` writes and to
// its `to_float` dequantizers. Without an importance matrix llama.cpp runs its reference ("_ref")
// quantizers, which treat every block on its own, so threads may split the work anywhere on block
// boundaries. Block layouts are in gguf_blocks.h; the scale searches in kquant_search_cpu.cpp.
//
// Why the code looks fussy in places: the packers re-derive each level from the *stored* fp16
// scales (so levels agree with what a reader reconstructs), and keep the search's levels wherever
// the stored scale rounds to zero; sub-block scales are rounded with round_magic and converted to
// bytes by plain truncation, exactly as ggml does, because those choices are visible in the bytes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "loraforge/cpu_threads.h"
#include "loraforge/gguf_blocks.h"
#include "loraforge/kernels.h"

namespace loraforge {
namespace gguf {
namespace {

using u8 = std::uint8_t;

inline int clamp_int(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

// C converts an out-of-range float to an integer with undefined behaviour; llama.cpp's reference
// does so for Q4_0 / Q8_0 blocks whose scale is so small that its reciprocal overflows (|max| below
// about 1e-37). x86-64 compilers emit cvttss2si there, which yields INT32_MIN for NaN, +-inf and
// anything beyond int32; we spell that out so the result does not depend on our own compiler.
inline std::int32_t truncate_like_cvtt(float v) {
  if (!(v > -2147483904.0f && v < 2147483648.0f)) return INT32_MIN;
  return static_cast<std::int32_t>(v);
}

// ---- Q8_0: d = max|x| / 127, q = round-half-away(x / d) ------------------------------------------

void quantize_q8_0(const float* x, u8* block) {
  float amax = 0.0f;
  for (int j = 0; j < kLegacyBlock; ++j) {
    const float a = std::fabs(x[j]);
    amax = amax > a ? amax : a;
  }
  const float d = amax / 127;
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;  // multiply by a reciprocal, as ggml does
  store_fp16(block, d);
  for (int j = 0; j < kLegacyBlock; ++j) {
    block[2 + j] = static_cast<u8>(truncate_like_cvtt(std::round(x[j] * inv)));
  }
}

void dequantize_q8_0(const u8* block, float* y) {
  const float d = load_fp16(block);
  for (int j = 0; j < kLegacyBlock; ++j) y[j] = static_cast<std::int8_t>(block[2 + j]) * d;
}

// ---- Q4_0: d = (signed value of max magnitude) / -8, q = trunc(x / d + 8.5) capped at 15 ---------
// Dividing by -8 puts the extreme value on level 0 (-8), so the other side reaches only +7.

void quantize_q4_0(const float* x, u8* block) {
  float amax = 0.0f;
  float extreme = 0.0f;
  for (int j = 0; j < kLegacyBlock; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      extreme = x[j];
    }
  }
  const float d = extreme / -8;
  const float inv = d != 0.0f ? 1.0f / d : 0.0f;
  store_fp16(block, d);
  for (int j = 0; j < kLegacyBlock / 2; ++j) {
    // (int8_t) of the truncated value, then min with 15: both halves as ggml narrows them.
    const int lo = std::min(15, static_cast<int>(static_cast<std::int8_t>(truncate_like_cvtt(x[j] * inv + 8.5f))));
    const int hi =
        std::min(15, static_cast<int>(static_cast<std::int8_t>(truncate_like_cvtt(x[j + 16] * inv + 8.5f))));
    block[2 + j] = static_cast<u8>(static_cast<u8>(lo) | static_cast<u8>(static_cast<unsigned>(hi) << 4));
  }
}

void dequantize_q4_0(const u8* block, float* y) {
  const float d = load_fp16(block);
  for (int j = 0; j < kLegacyBlock / 2; ++j) {
    y[j] = ((block[2 + j] & 0x0f) - 8) * d;
    y[j + 16] = ((block[2 + j] >> 4) - 8) * d;
  }
}

// ---- shared bit packing of the K types ------------------------------------------------------------

// 2-bit levels of 256 values into 64 bytes: each 128-value half fills 32 bytes, value (half, l + 32k)
// in bits 2k..2k+1 of byte l.
void pack_2bit(const u8* levels, u8* qs) {
  for (int half = 0; half < 2; ++half) {
    const u8* l = levels + 128 * half;
    for (int i = 0; i < 32; ++i) {
      qs[32 * half + i] = static_cast<u8>(l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6));
    }
  }
}

// Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes. Groups 0-3 sit whole in bytes
// 0-3 (scale) and 4-7 (min); groups 4-7 keep their low nibbles in bytes 8-11 and their top two bits
// in the spare top bits of bytes 0-3 (scale) and 4-7 (min).
void pack_scale_min_k4(const u8* scales, const u8* mins, u8* packed) {
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

inline void unpack_scale_min_k4(const u8* packed, int j, int* scale, int* min) {
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
void pack_scales_q3(const int* biased, u8* packed) {
  std::memset(packed, 0, 12);
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

inline int unpack_scale_q3(const u8* packed, int j) {
  const int low = j < 8 ? (packed[j] & 0x0f) : (packed[j - 8] >> 4);
  const int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// ---- Q2_K: 16 groups of 16, value = d*s_j*q - dmin*m_j, 4-bit s_j and m_j ----------------------
constexpr int kQ2Scales = 0, kQ2Qs = 16, kQ2D = 80, kQ2Dmin = 82;

void quantize_q2_k(const float* x, u8* block) {
  u8 levels[kSuperBlock];
  float scales[16], mins[16], weights[16];
  float max_scale = 0.0f, max_min = 0.0f;  // both >= 0: the fit subtracts the min
  for (int j = 0; j < 16; ++j) {
    const float* g = x + 16 * j;
    for (int l = 0; l < 16; ++l) weights[l] = std::fabs(g[l]);
    scales[j] = fit_affine_weighted(16, 3, g, weights, levels + 16 * j, &mins[j], -0.5f, 0.1f, 15, true);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  u8* packed_scales = block + kQ2Scales;
  if (max_scale > 0) {
    const float inv = 15.0f / max_scale;
    for (int j = 0; j < 16; ++j) packed_scales[j] = static_cast<u8>(round_magic(inv * scales[j]));
    store_fp16(block + kQ2D, max_scale / 15.0f);
  } else {
    std::memset(packed_scales, 0, 16);
    store_fp16(block + kQ2D, 0.0f);
  }
  if (max_min > 0) {
    const float inv = 15.0f / max_min;
    for (int j = 0; j < 16; ++j) {
      const unsigned m = static_cast<unsigned>(round_magic(inv * mins[j]));
      packed_scales[j] = static_cast<u8>(packed_scales[j] | (m << 4));
    }
    store_fp16(block + kQ2Dmin, max_min / 15.0f);
  } else {
    store_fp16(block + kQ2Dmin, 0.0f);
  }
  // Re-level against the scales as stored; a group whose stored scale is 0 keeps the fit's levels.
  const float d_all = load_fp16(block + kQ2D);
  const float dmin_all = load_fp16(block + kQ2Dmin);
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * (packed_scales[j] & 0x0f);
    if (d == 0.0f) continue;
    const float dm = dmin_all * (packed_scales[j] >> 4);
    for (int l = 0; l < 16; ++l) {
      levels[16 * j + l] = static_cast<u8>(clamp_int(round_magic((x[16 * j + l] + dm) / d), 0, 3));
    }
  }
  pack_2bit(levels, block + kQ2Qs);
}

void dequantize_q2_k(const u8* block, float* y) {
  const float d = load_fp16(block + kQ2D);
  const float dmin = load_fp16(block + kQ2Dmin);
  const u8* scales = block + kQ2Scales;
  for (int j = 0; j < 16; ++j) {  // group j: half j/8, bit pair (j%8)/2, bytes 16*(j%2)..+16
    const float dl = d * (scales[j] & 0x0f);
    const float ml = dmin * (scales[j] >> 4);
    const u8* q = block + kQ2Qs + 32 * (j / 8) + 16 * (j % 2);
    const int shift = 2 * ((j % 8) / 2);
    for (int l = 0; l < 16; ++l) y[16 * j + l] = dl * ((q[l] >> shift) & 3) - ml;
  }
}

// ---- Q3_K: 16 groups of 16, value = d*s_j*(q-4), signed 6-bit s_j, 3-bit q ----------------------
constexpr int kQ3Hmask = 0, kQ3Qs = 32, kQ3Scales = 96, kQ3D = 108;

void quantize_q3_k(const float* x, u8* block) {
  std::int8_t levels[kSuperBlock];
  float scales[16];
  float amax = 0.0f, max_scale = 0.0f;  // the scale of largest magnitude, with its sign
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit_symmetric_refined(16, 4, x + 16 * j, levels + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > amax) {
      amax = a;
      max_scale = scales[j];
    }
  }
  u8* packed_scales = block + kQ3Scales;
  if (max_scale != 0.0f) {
    // -32 / max_scale maps the largest scale to -32, the end of the 6-bit signed range with room.
    const float inv = -32.0f / max_scale;
    int biased[16];
    for (int j = 0; j < 16; ++j) {
      const int l = static_cast<std::int8_t>(round_magic(inv * scales[j]));  // narrowed first, as ggml
      biased[j] = clamp_int(l, -32, 31) + 32;
    }
    pack_scales_q3(biased, packed_scales);
    store_fp16(block + kQ3D, 1 / inv);
  } else {
    std::memset(packed_scales, 0, 12);
    store_fp16(block + kQ3D, 0.0f);
  }
  const float d_all = load_fp16(block + kQ3D);
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * unpack_scale_q3(packed_scales, j);
    if (d == 0.0f) continue;
    for (int l = 0; l < 16; ++l) {
      levels[16 * j + l] = static_cast<std::int8_t>(clamp_int(round_magic(x[16 * j + l] / d), -4, 3) + 4);
    }
  }
  // Levels 0..7: bit 2 goes to hmask (value j -> byte j%32, bit j/32), bits 0-1 to qs.
  u8* hmask = block + kQ3Hmask;
  std::memset(hmask, 0, 32);
  u8 low[kSuperBlock];
  for (int j = 0; j < kSuperBlock; ++j) {
    int l = levels[j];
    if (l > 3) {
      hmask[j % 32] = static_cast<u8>(hmask[j % 32] | (1u << (j / 32)));
      l -= 4;
    }
    low[j] = static_cast<u8>(l);
  }
  pack_2bit(low, block + kQ3Qs);
}

void dequantize_q3_k(const u8* block, float* y) {
  const float d_all = load_fp16(block + kQ3D);
  const u8* hmask = block + kQ3Hmask;
  for (int j = 0; j < 16; ++j) {
    const float dl = d_all * unpack_scale_q3(block + kQ3Scales, j);
    const int offset = 32 * (j / 8) + 16 * (j % 2);  // same bit placement as Q2_K
    const u8* q = block + kQ3Qs + offset;
    const int shift = 2 * ((j % 8) / 2);
    const u8 high_bit = static_cast<u8>(1u << (j / 2));  // value 16j+l sits at hmask[(16j+l)%32], bit (16j+l)/32
    for (int l = 0; l < 16; ++l) {
      const int low = (q[l] >> shift) & 3;
      y[16 * j + l] = dl * (low - ((hmask[16 * (j % 2) + l] & high_bit) ? 0 : 4));
    }
  }
}

// ---- Q4_K / Q5_K: 8 groups of 32, value = d*s_j*q - dmin*m_j, 6-bit s_j and m_j ----------------
constexpr int kKD = 0, kKDmin = 2, kKScales = 4;
constexpr int kQ4Qs = 16;
constexpr int kQ5Qh = 16, kQ5Qs = 48;

// Fit all eight groups, store d, dmin and the 12 scale bytes, and return the levels re-derived from
// the stored values (each in [0, nmax]).
void fit_groups_of_32(const float* x, int nmax, float rmin, float rdelta, int nstep, u8* block, u8* levels) {
  float scales[8], mins[8], weights[32];
  float max_scale = 0.0f, max_min = 0.0f;
  for (int j = 0; j < 8; ++j) {
    const float* g = x + 32 * j;
    // Weights favour large values over an rms floor: relative error matters most where |x| is large.
    float sum_x2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum_x2 += g[l] * g[l];
    const float rms = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = rms + std::fabs(g[l]);
    scales[j] = fit_affine_weighted(32, nmax, g, weights, levels + 32 * j, &mins[j], rmin, rdelta, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  u8 qscales[8], qmins[8];
  for (int j = 0; j < 8; ++j) {
    // ggml narrows to a byte before capping at 63, so a negative rounded value (a degenerate group's
    // fit) wraps to a large byte and ends up as 63; we narrow the same way.
    qscales[j] = std::min<u8>(63, static_cast<u8>(round_magic(inv_scale * scales[j])));
    qmins[j] = std::min<u8>(63, static_cast<u8>(round_magic(inv_min * mins[j])));
  }
  pack_scale_min_k4(qscales, qmins, block + kKScales);
  store_fp16(block + kKD, max_scale / 63.0f);
  store_fp16(block + kKDmin, max_min / 63.0f);

  const float d_all = load_fp16(block + kKD);
  const float dmin_all = load_fp16(block + kKDmin);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    unpack_scale_min_k4(block + kKScales, j, &s, &m);
    const float d = d_all * s;
    if (d == 0.0f) continue;  // keep the fit's levels
    const float dm = dmin_all * m;
    for (int l = 0; l < 32; ++l) {
      levels[32 * j + l] = static_cast<u8>(clamp_int(round_magic((x[32 * j + l] + dm) / d), 0, nmax));
    }
  }
}

void quantize_q4_k(const float* x, u8* block) {
  u8 levels[kSuperBlock];
  fit_groups_of_32(x, 15, -1.0f, 0.1f, 20, block, levels);
  // Groups 2k and 2k+1 share 32 bytes: low nibbles then high nibbles.
  u8* qs = block + kQ4Qs;
  for (int pair = 0; pair < 4; ++pair) {
    const u8* l = levels + 64 * pair;
    for (int i = 0; i < 32; ++i) qs[32 * pair + i] = static_cast<u8>(l[i] | (l[i + 32] << 4));
  }
}

void quantize_q5_k(const float* x, u8* block) {
  u8 levels[kSuperBlock];
  fit_groups_of_32(x, 31, -0.5f, 0.1f, 15, block, levels);
  // As Q4_K for the low 4 bits; bit 4 of group g's value i goes to bit g of qh[i].
  u8* qh = block + kQ5Qh;
  u8* qs = block + kQ5Qs;
  std::memset(qh, 0, 32);
  for (int pair = 0; pair < 4; ++pair) {
    const u8* l = levels + 64 * pair;
    for (int i = 0; i < 32; ++i) {
      const int a = l[i], b = l[i + 32];
      qh[i] = static_cast<u8>(qh[i] | ((a >> 4) << (2 * pair)) | ((b >> 4) << (2 * pair + 1)));
      qs[32 * pair + i] = static_cast<u8>((a & 0x0f) | ((b & 0x0f) << 4));
    }
  }
}

void dequantize_q4_k(const u8* block, float* y) {
  const float d = load_fp16(block + kKD);
  const float dmin = load_fp16(block + kKDmin);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    unpack_scale_min_k4(block + kKScales, j, &s, &m);
    const float dl = d * s;
    const float ml = dmin * m;
    const u8* q = block + kQ4Qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * ((q[l] >> shift) & 0x0f) - ml;
  }
}

void dequantize_q5_k(const u8* block, float* y) {
  const float d = load_fp16(block + kKD);
  const float dmin = load_fp16(block + kKDmin);
  const u8* qh = block + kQ5Qh;
  for (int j = 0; j < 8; ++j) {
    int s, m;
    unpack_scale_min_k4(block + kKScales, j, &s, &m);
    const float dl = d * s;
    const float ml = dmin * m;
    const u8* q = block + kQ5Qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int value = ((q[l] >> shift) & 0x0f) + (((qh[l] >> j) & 1) ? 16 : 0);
      y[32 * j + l] = dl * value - ml;
    }
  }
}

// ---- Q6_K: 16 groups of 16, value = d*s_j*(q-32), signed 8-bit s_j, 6-bit q ---------------------
constexpr int kQ6Ql = 0, kQ6Qh = 128, kQ6Scales = 192, kQ6D = 208;
constexpr float kZeroBlock = 1e-15f;  // ggml's GROUP_MAX_EPS

void quantize_q6_k(const float* x, u8* block) {
  std::int8_t levels[kSuperBlock];
  float scales[16];
  float max_abs = 0.0f, max_scale = 0.0f;
  for (int j = 0; j < 16; ++j) {
    scales[j] = fit_symmetric_weighted(16, 32, x + 16 * j, levels + 16 * j);
    const float a = std::fabs(scales[j]);
    if (a > max_abs) {
      max_abs = a;
      max_scale = scales[j];
    }
  }
  if (max_abs < kZeroBlock) {
    std::memset(block, 0, 210);  // d = +0 too
    return;
  }
  // -128 / max_scale puts the largest scale on -128 (capped at 127 on the other side).
  const float inv = -128.0f / max_scale;
  store_fp16(block + kQ6D, 1 / inv);
  auto* packed_scales = reinterpret_cast<std::int8_t*>(block + kQ6Scales);
  for (int j = 0; j < 16; ++j) {
    packed_scales[j] = static_cast<std::int8_t>(std::min(127, round_magic(inv * scales[j])));
  }
  const float d_all = load_fp16(block + kQ6D);
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * packed_scales[j];
    if (d == 0.0f) continue;
    for (int l = 0; l < 16; ++l) {
      levels[16 * j + l] = static_cast<std::int8_t>(clamp_int(round_magic(x[16 * j + l] / d), -32, 31) + 32);
    }
  }
  // Per 128-value half h: value (h, i + 32k), k = 0..3, has its low nibble in ql[64h + i + 32*(k%2)]
  // (k < 2 low half of the byte, else high half) and its top two bits in bits 2k..2k+1 of qh[32h + i].
  for (int half = 0; half < 2; ++half) {
    const std::int8_t* l = levels + 128 * half;
    u8* ql = block + kQ6Ql + 64 * half;
    u8* qh = block + kQ6Qh + 32 * half;
    for (int i = 0; i < 32; ++i) {
      ql[i] = static_cast<u8>((l[i] & 0x0f) | ((l[i + 64] & 0x0f) << 4));
      ql[i + 32] = static_cast<u8>((l[i + 32] & 0x0f) | ((l[i + 96] & 0x0f) << 4));
      qh[i] = static_cast<u8>((l[i] >> 4) | ((l[i + 32] >> 4) << 2) | ((l[i + 64] >> 4) << 4) | ((l[i + 96] >> 4) << 6));
    }
  }
}

void dequantize_q6_k(const u8* block, float* y) {
  const float d = load_fp16(block + kQ6D);
  const auto* scales = reinterpret_cast<const std::int8_t*>(block + kQ6Scales);
  for (int half = 0; half < 2; ++half) {
    const u8* ql = block + kQ6Ql + 64 * half;
    const u8* qh = block + kQ6Qh + 32 * half;
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < 32; ++i) {
        const int low = (ql[i + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0f;
        const int q = (low | (((qh[i] >> (2 * k)) & 3) << 4)) - 32;
        // (d * scale) * q, in that order, as ggml multiplies.
        y[128 * half + 32 * k + i] = d * scales[8 * half + 2 * k + i / 16] * q;
      }
    }
  }
}

// ---- dispatch ---------------------------------------------------------------------------------------

struct Codec {
  void (*quantize)(const float* x, u8* block);
  void (*dequantize)(const u8* block, float* y);
  long long min_blocks_per_thread;  // so a thread gets at least ~0.1 ms of work
};

Codec codec_for(int qtype) {
  switch (qtype) {
    case kQ4_0: return {quantize_q4_0, dequantize_q4_0, 4096};
    case kQ8_0: return {quantize_q8_0, dequantize_q8_0, 4096};
    case kQ2_K: return {quantize_q2_k, dequantize_q2_k, 16};
    case kQ3_K: return {quantize_q3_k, dequantize_q3_k, 32};
    case kQ4_K: return {quantize_q4_k, dequantize_q4_k, 16};
    case kQ5_K: return {quantize_q5_k, dequantize_q5_k, 16};
    case kQ6_K: return {quantize_q6_k, dequantize_q6_k, 32};
    default: fail("unsupported GGUF quantization type id ", qtype);
  }
}

}  // namespace
}  // namespace gguf

void gguf_quantize_cpu(const float* src, long long rows, long long cols, int qtype, unsigned char* dst,
                       int num_threads) {
  gguf::BlockInfo info;
  LF_CHECK(gguf::block_info(qtype, &info), "unsupported GGUF quantization type id ", qtype);
  const gguf::Codec codec = gguf::codec_for(qtype);
  const long long blocks = rows * (cols / info.elems);
  parallel_ranges(blocks, num_threads, codec.min_blocks_per_thread, [&](long long first, long long end) {
    for (long long b = first; b < end; ++b) codec.quantize(src + b * info.elems, dst + b * info.bytes);
  });
}

void gguf_dequantize_cpu(const unsigned char* src, long long rows, long long cols, int qtype, float* dst,
                         int num_threads) {
  gguf::BlockInfo info;
  LF_CHECK(gguf::block_info(qtype, &info), "unsupported GGUF quantization type id ", qtype);
  const gguf::Codec codec = gguf::codec_for(qtype);
  const long long blocks = rows * (cols / info.elems);
  // Dequantization is cheap per block; give each thread a larger share.
  parallel_ranges(blocks, num_threads, codec.min_blocks_per_thread * 8, [&](long long first, long long end) {
    for (long long b = first; b < end; ++b) codec.dequantize(src + b * info.bytes, dst + b * info.elems);
  });
}

}  // namespace loraforge
