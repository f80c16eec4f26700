// NF4 (4-bit NormalFloat) as bitsandbytes stores it.
//
// Layout: a flat weight of n elements is cut into blocks of `blocksize` consecutive elements;
// each block keeps one fp32 absmax. Element i is quantized to the index of the nearest NF4
// level of x / absmax and packed two per byte, element 2k in the high nibble of byte k and
// element 2k+1 in the low nibble (a pad of level 7, zero, when n is odd).
//
// Rounding rules that bitsandbytes' reference (its default torch kernel, what it runs on CPU) follows
// and our CPU kernel matches (its CUDA quantizer is built with fast math: see nf4_cuda.cu):
//   full block:  scale = 1 / max(absmax, 1e-38f),  v = clamp(x * scale, -1, 1), stored absmax unclamped
//   last, partial block:  a = max(absmax, 1e-38f), v = clamp(x / a, -1, 1),     stored absmax = a
//   index = number of midpoints m_j = (level_j + level_{j+1}) / 2 with m_j < v   (ties go down)
// Dequantization is level[index] * absmax in fp32, then one rounding to the output type.
// With double quantization the absmax itself is code2[q] * absmax2[block / blocksize2] + offset,
// each operation rounded on its own in fp32 (bitsandbytes does them as separate torch ops).
#pragma once

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__
#define LF_DEVICE_CONSTANT __device__  // the table is then readable from both sides
#else
#define LF_HOST_DEVICE
#define LF_DEVICE_CONSTANT
#endif

namespace loraforge {
namespace nf4 {

// The 16 NF4 levels (quantiles of a standard normal, rescaled to [-1, 1]) as fp32 values.
LF_DEVICE_CONSTANT constexpr float kLevels[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

constexpr float kMinAbsmax = 1e-38f;  // bitsandbytes' clamp before taking the reciprocal
constexpr int kZeroIndex = 7;         // the level 0.0, used for the odd-length pad nibble

// Index of the NF4 level nearest to v in [-1, 1]: the count of midpoints strictly below v.
// Midpoints are formed in fp32 exactly as torch forms (code[:-1] + code[1:]) / 2.
LF_HOST_DEVICE inline int nearest_level(float v) {
  int index = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < 15; ++j) {
    const float midpoint = (kLevels[j] + kLevels[j + 1]) * 0.5f;
    index += midpoint < v ? 1 : 0;
  }
  return index;
}

inline bool valid_blocksize(long long blocksize) {
  return blocksize == 32 || blocksize == 64 || blocksize == 128 || blocksize == 256 || blocksize == 512 ||
         blocksize == 1024 || blocksize == 2048 || blocksize == 4096;
}

// Where a dequantization finds its per-block absmax: plain fp32, or double-quantized.
struct AbsmaxSource {
  const float* absmax = nullptr;           // plain: one fp32 per block
  const unsigned char* qabsmax = nullptr;  // nested: one uint8 index per block ...
  const float* code2 = nullptr;            // ... into this 256-entry fp32 code,
  const float* absmax2 = nullptr;          // ... scaled per group of blocksize2 blocks,
  const float* offset = nullptr;           // ... plus this one fp32 offset.
  long long blocksize2 = 256;
};

}  // namespace nf4
}  // namespace loraforge
