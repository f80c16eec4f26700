// NF4 dequantization and quantization on CUDA, bit-exact with bitsandbytes (rules in nf4.h).
//
// Dequantize is memory-bound: 0.5 byte read and 2 bytes written per bf16 element. Each thread
// takes 16 packed bytes (one 16-byte load) = 32 elements, which always sit in one quantization
// block (blocksize >= 32), so it decodes one absmax (double-quantized or not) in the same launch
// and writes its outputs with 16-byte stores. The 16 levels live in shared memory: 16 distinct
// words in 16 distinct banks, so lookups never conflict. Compiled with --fmad=false so that the
// nested absmax is a rounded multiply then a rounded add, as bitsandbytes computes it.
//
// Quantize runs once per weight at load time: one warp per quantization block, a warp-wide max,
// then each lane packs pairs of elements into bytes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "loraforge/kernels.h"

namespace loraforge {
namespace {

constexpr int kDequantThreads = 256;
constexpr int kElementsPerThread = 32;  // 16 packed bytes

// Per output type: scalar load/store conversions, and two values packed into one 32-bit word
// (the first at the lower address) for the 16-byte stores of 16-bit outputs.
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Convert<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
  __device__ static unsigned int pack2(float first, float second) {
    return static_cast<unsigned int>(__half_as_ushort(__float2half_rn(first))) |
           (static_cast<unsigned int>(__half_as_ushort(__float2half_rn(second))) << 16);
  }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  __device__ static unsigned int pack2(float first, float second) {
    return static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(first))) |
           (static_cast<unsigned int>(__bfloat16_as_ushort(__float2bfloat16_rn(second))) << 16);
  }
};

// 16 packed bytes -> 32 outputs at `out` (16-byte aligned), as 16-byte stores.
template <typename T>
__device__ __forceinline__ void dequantize_16_bytes(const uint4 bytes16, const float* levels, float scale,
                                                    T* out) {
  const unsigned int words[4] = {bytes16.x, bytes16.y, bytes16.z, bytes16.w};
  if constexpr (sizeof(T) == 4) {
    float4* dst = reinterpret_cast<float4*>(out);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int half_word = 0; half_word < 2; ++half_word) {
        const unsigned int b0 = (words[w] >> (16 * half_word)) & 0xffu;
        const unsigned int b1 = (words[w] >> (16 * half_word + 8)) & 0xffu;
        dst[w * 2 + half_word] = make_float4(__fmul_rn(levels[b0 >> 4], scale), __fmul_rn(levels[b0 & 15], scale),
                                             __fmul_rn(levels[b1 >> 4], scale), __fmul_rn(levels[b1 & 15], scale));
      }
    }
  } else {
    uint4* dst = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int w = 0; w < 4; w += 1) {
      unsigned int packed_words[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const unsigned int byte = (words[w] >> (8 * b)) & 0xffu;
        packed_words[b] = Convert<T>::pack2(__fmul_rn(levels[byte >> 4], scale), __fmul_rn(levels[byte & 15], scale));
      }
      dst[w] = make_uint4(packed_words[0], packed_words[1], packed_words[2], packed_words[3]);
    }
  }
}

__device__ __forceinline__ float decode_absmax(const nf4::AbsmaxSource& source, long long block) {
  if (source.absmax != nullptr) return __ldg(source.absmax + block);
  const float scaled = __fmul_rn(__ldg(source.code2 + __ldg(source.qabsmax + block)),
                                 __ldg(source.absmax2 + block / source.blocksize2));
  return __fadd_rn(scaled, __ldg(source.offset));
}

template <typename T>
__global__ void nf4_dequantize_kernel(const unsigned char* __restrict__ packed, nf4::AbsmaxSource source,
                                      long long n, long long blocksize, T* __restrict__ out, bool vector_ok) {
  __shared__ float levels[16];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) levels[i] = nf4::kLevels[i];
  }
  __syncthreads();

  const long long chunk = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long first = chunk * kElementsPerThread;
  if (first >= n) return;
  const float scale = decode_absmax(source, first / blocksize);

  if (vector_ok && first + kElementsPerThread <= n) {
    dequantize_16_bytes<T>(*reinterpret_cast<const uint4*>(packed + first / 2), levels, scale, out + first);
    return;
  }
  // Tail (or an unaligned view): element by element.
  const long long last = min(n, first + kElementsPerThread);
  for (long long i = first; i < last; ++i) {
    const unsigned char byte = packed[i / 2];
    const int index = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    out[i] = Convert<T>::store(__fmul_rn(levels[index], scale));
  }
}

template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ x, long long n, long long blocksize,
                                    unsigned char* __restrict__ packed, float* __restrict__ absmax,
                                    long long num_blocks) {
  const int lane = threadIdx.x & 31;
  const long long block = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (block >= num_blocks) return;
  const long long begin = block * blocksize;
  const long long end = min(n, begin + blocksize);

  float block_max = 0.0f;
  for (long long i = begin + lane; i < end; i += 32) block_max = fmaxf(block_max, fabsf(Convert<T>::load(x[i])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
  }

  const bool partial = end - begin < blocksize;
  const float clamped = fmaxf(block_max, nf4::kMinAbsmax);
  const float reciprocal = __frcp_rn(clamped);
  if (lane == 0) absmax[block] = partial ? clamped : block_max;

  for (long long i = begin + 2 * lane; i < end; i += 64) {
    int pair[2] = {nf4::kZeroIndex, nf4::kZeroIndex};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      if (i + k < end) {
        const float xi = Convert<T>::load(x[i + k]);
        float v = partial ? __fdiv_rn(xi, clamped) : __fmul_rn(xi, reciprocal);
        v = fminf(1.0f, fmaxf(-1.0f, v));
        pair[k] = nf4::nearest_level(v);
      }
    }
    packed[i / 2] = static_cast<unsigned char>((pair[0] << 4) | pair[1]);
  }
}

template <typename T>
void launch_dequantize(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                       long long blocksize, void* out, cudaStream_t stream) {
  const long long chunks = (n + kElementsPerThread - 1) / kElementsPerThread;
  const long long grid = (chunks + kDequantThreads - 1) / kDequantThreads;
  LF_CHECK(grid <= 0x7fffffffLL, "tensor too large for one launch: ", n, " elements");
  const bool vector_ok = (reinterpret_cast<std::uintptr_t>(packed) % 16 == 0) &&
                         (reinterpret_cast<std::uintptr_t>(out) % 16 == 0);
  nf4_dequantize_kernel<T><<<static_cast<unsigned int>(grid), kDequantThreads, 0, stream>>>(
      packed, source, n, blocksize, static_cast<T*>(out), vector_ok);
  cuda_check(cudaGetLastError(), "nf4_dequantize_kernel launch");
}

template <typename T>
void launch_quantize(const void* x, long long n, long long blocksize, unsigned char* packed, float* absmax,
                     cudaStream_t stream) {
  constexpr int kWarps = 8;
  const long long num_blocks = (n + blocksize - 1) / blocksize;
  const long long grid = (num_blocks + kWarps - 1) / kWarps;
  LF_CHECK(grid <= 0x7fffffffLL, "tensor too large for one launch: ", n, " elements");
  nf4_quantize_kernel<T><<<static_cast<unsigned int>(grid), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(x), n, blocksize, packed, absmax, num_blocks);
  cuda_check(cudaGetLastError(), "nf4_quantize_kernel launch");
}

}  // namespace

void nf4_dequantize_cuda(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                         long long blocksize, void* out, DType dtype, std::uintptr_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dequantize<float>(packed, source, n, blocksize, out, as_stream(stream));
    case DType::kFloat16: return launch_dequantize<__half>(packed, source, n, blocksize, out, as_stream(stream));
    case DType::kBFloat16:
      return launch_dequantize<__nv_bfloat16>(packed, source, n, blocksize, out, as_stream(stream));
  }
}

void nf4_quantize_cuda(const void* x, DType dtype, long long n, long long blocksize, unsigned char* packed,
                       float* absmax, std::uintptr_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_quantize<float>(x, n, blocksize, packed, absmax, as_stream(stream));
    case DType::kFloat16: return launch_quantize<__half>(x, n, blocksize, packed, absmax, as_stream(stream));
    case DType::kBFloat16:
      return launch_quantize<__nv_bfloat16>(x, n, blocksize, packed, absmax, as_stream(stream));
  }
}

}  // namespace loraforge
