// NF4 quantization and dequantization on the CPU, bit-exact with bitsandbytes (see nf4.h for the
// rounding rules). Threads split the work on quantization-block boundaries.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "loraforge/cpu_float.h"
#include "loraforge/cpu_threads.h"
#include "loraforge/kernels.h"

namespace loraforge {
namespace {

constexpr long long kMinBlocksPerThread = 256;

template <DType D>
inline float load(const void* base, long long i) {
  if constexpr (D == DType::kFloat32) return static_cast<const float*>(base)[i];
  if constexpr (D == DType::kFloat16) return fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  if constexpr (D == DType::kBFloat16) return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
}

template <DType D>
inline void store(void* base, long long i, float value) {
  if constexpr (D == DType::kFloat32) static_cast<float*>(base)[i] = value;
  if constexpr (D == DType::kFloat16) static_cast<std::uint16_t*>(base)[i] = float_to_fp16(value);
  if constexpr (D == DType::kBFloat16) static_cast<std::uint16_t*>(base)[i] = float_to_bf16(value);
}

template <DType D>
void quantize_blocks(const void* x, long long n, long long blocksize, unsigned char* packed, float* absmax,
                     long long first_block, long long end_block) {
  for (long long block = first_block; block < end_block; ++block) {
    const long long begin = block * blocksize;
    const long long end = std::min(n, begin + blocksize);
    float block_max = 0.0f;
    for (long long i = begin; i < end; ++i) block_max = std::max(block_max, std::fabs(load<D>(x, i)));

    // bitsandbytes multiplies full blocks by a reciprocal but divides the last, partial block.
    const bool partial = end - begin < blocksize;
    const float clamped = std::max(block_max, nf4::kMinAbsmax);
    const float reciprocal = 1.0f / clamped;
    absmax[block] = partial ? clamped : block_max;

    for (long long i = begin; i < end; i += 2) {
      int pair[2] = {nf4::kZeroIndex, nf4::kZeroIndex};
      for (int k = 0; k < 2 && i + k < end; ++k) {
        const float xi = load<D>(x, i + k);
        float v = partial ? xi / clamped : xi * reciprocal;
        v = std::min(1.0f, std::max(-1.0f, v));
        pair[k] = nf4::nearest_level(v);
      }
      packed[i / 2] = static_cast<unsigned char>((pair[0] << 4) | pair[1]);
    }
  }
}

inline float decode_absmax(const nf4::AbsmaxSource& source, long long block) {
  if (source.absmax != nullptr) return source.absmax[block];
  const float scaled = source.code2[source.qabsmax[block]] * source.absmax2[block / source.blocksize2];
  return scaled + *source.offset;
}

template <DType D>
void dequantize_blocks(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                       long long blocksize, void* out, long long first_block, long long end_block) {
  for (long long block = first_block; block < end_block; ++block) {
    const float scale = decode_absmax(source, block);
    const long long begin = block * blocksize;
    const long long end = std::min(n, begin + blocksize);
    for (long long i = begin; i < end; ++i) {
      const unsigned char byte = packed[i / 2];
      const int index = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
      store<D>(out, i, nf4::kLevels[index] * scale);
    }
  }
}

template <template <DType> class Kernel, typename... Args>
void dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: return Kernel<DType::kFloat32>::run(args...);
    case DType::kFloat16: return Kernel<DType::kFloat16>::run(args...);
    case DType::kBFloat16: return Kernel<DType::kBFloat16>::run(args...);
  }
}

template <DType D>
struct Quantize {
  static void run(const void* x, long long n, long long blocksize, unsigned char* packed, float* absmax,
                  int num_threads) {
    const long long blocks = (n + blocksize - 1) / blocksize;
    parallel_ranges(blocks, num_threads, kMinBlocksPerThread, [&](long long first, long long end) {
      quantize_blocks<D>(x, n, blocksize, packed, absmax, first, end);
    });
  }
};

template <DType D>
struct Dequantize {
  static void run(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n, long long blocksize,
                  void* out, int num_threads) {
    const long long blocks = (n + blocksize - 1) / blocksize;
    parallel_ranges(blocks, num_threads, kMinBlocksPerThread, [&](long long first, long long end) {
      dequantize_blocks<D>(packed, source, n, blocksize, out, first, end);
    });
  }
};

}  // namespace

void nf4_quantize_cpu(const void* x, DType dtype, long long n, long long blocksize, unsigned char* packed,
                      float* absmax, int num_threads) {
  dispatch<Quantize>(dtype, x, n, blocksize, packed, absmax, num_threads);
}

void nf4_dequantize_cpu(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                        long long blocksize, void* out, DType dtype, int num_threads) {
  dispatch<Dequantize>(dtype, packed, source, n, blocksize, out, num_threads);
}

}  // namespace loraforge
