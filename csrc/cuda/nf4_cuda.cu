// NF4 dequantization and quantization on CUDA, bit-exact with bitsandbytes (rules in nf4.h).
//
// Dequantize is memory-bound: per bf16 element 0.5 byte is read and 2 bytes are written. A
// thread-chunk turns 4 packed bytes into 8 bf16/fp16 values (16 bytes), or 2 bytes into 4 fp32
// values; consecutive threads take consecutive chunks, so each warp store writes 512 contiguous
// bytes. A chunk never straddles a quantization block (blocksize >= 32), so it decodes one absmax
// (double-quantized or not) in the same launch. Each thread issues the loads of kUnroll chunks
// before it uses any, to keep enough bytes in flight. The 16 levels and the 256-entry nested code
// live in shared memory. Built with --fmad=false: the nested absmax is a rounded multiply and then
// a rounded add, as bitsandbytes computes it with two torch ops.
//
// Quantize runs once per weight at load time: one warp per quantization block, a warp-wide max,
// then each lane packs pairs of elements into bytes. It follows bitsandbytes' CUDA kernel, built
// with fast math (see nf4_quantize_kernel), not nf4.h's IEEE rules, which its CPU path follows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda_check.cuh"
#include "loraforge/kernels.h"

namespace loraforge {
namespace {

// Launch shape of the dequantize kernel, chosen with benchmarks/cuda/nf4_dequant_variants.cu on an
// H100 (results/nf4_variants.txt): 256 threads with 2 chunks each was fastest at every size; more
// chunks per thread, larger blocks, a persistent grid and streaming stores were all slower or equal.
constexpr int kDequantThreads = 256;
constexpr int kUnroll = 2;
constexpr bool kStreamingStores = false;
constexpr bool kLoadsBeforeTables = true;

// Per element type: scalar conversions, and two values packed into one 32-bit word (the first at
// the lower address) for the 16-byte stores of 16-bit outputs.
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
  __device__ static unsigned int pack2(float first, float second) {  // .x (low half) = first, both RNE
    const __half2 pair = __floats2half2_rn(first, second);
    return *reinterpret_cast<const unsigned int*>(&pair);
  }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  __device__ static unsigned int pack2(float first, float second) {  // .x (low half) = first, both RNE
    const __nv_bfloat162 pair = __floats2bfloat162_rn(first, second);
    return *reinterpret_cast<const unsigned int*>(&pair);
  }
};

template <typename T>
struct ChunkShape {
  static constexpr int kElements = 16 / sizeof(T);  // 16 output bytes
  static constexpr int kPackedBytes = kElements / 2;
  using Packed = std::conditional_t<kPackedBytes == 4, unsigned int, unsigned short>;
};

template <typename T>
__device__ __forceinline__ uint4 dequantize_chunk(unsigned int bytes, const float* levels, float scale) {
  if constexpr (sizeof(T) == 4) {
    const unsigned int b0 = bytes & 0xffu, b1 = (bytes >> 8) & 0xffu;
    return make_uint4(__float_as_uint(__fmul_rn(levels[b0 >> 4], scale)),
                      __float_as_uint(__fmul_rn(levels[b0 & 15], scale)),
                      __float_as_uint(__fmul_rn(levels[b1 >> 4], scale)),
                      __float_as_uint(__fmul_rn(levels[b1 & 15], scale)));
  } else {
    unsigned int words[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const unsigned int byte = (bytes >> (8 * b)) & 0xffu;
      words[b] = Convert<T>::pack2(__fmul_rn(levels[byte >> 4], scale), __fmul_rn(levels[byte & 15], scale));
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
}

struct BlockShifts {
  int block_shift;   // log2(blocksize)
  int block2_shift;  // log2(blocksize2), nested only
};

__device__ __forceinline__ float decode_absmax(const nf4::AbsmaxSource& source, const float* code2, long long block,
                                               int block2_shift) {
  if (source.absmax != nullptr) return __ldg(source.absmax + block);
  const float scaled =
      __fmul_rn(code2[__ldg(source.qabsmax + block)], __ldg(source.absmax2 + (block >> block2_shift)));
  return __fadd_rn(scaled, __ldg(source.offset));
}

__device__ __forceinline__ void load_tables(const nf4::AbsmaxSource& source, float* levels, float* code2) {
  if (threadIdx.x < 16) levels[threadIdx.x] = nf4::kLevels[threadIdx.x];
  if (source.code2 != nullptr) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = __ldg(source.code2 + i);
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void dequantize_one(const unsigned char* packed, const nf4::AbsmaxSource& source,
                                               const float* levels, const float* code2, BlockShifts shifts,
                                               long long i, T* out) {
  const unsigned char byte = packed[i / 2];
  const float scale = decode_absmax(source, code2, i >> shifts.block_shift, shifts.block2_shift);
  out[i] = Convert<T>::store(__fmul_rn(levels[(i & 1) ? (byte & 0x0f) : (byte >> 4)], scale));
}

// Rows: W's rows of `cols` elements go `row_stride` elements apart in `out` (a column slice of a wider
// buffer, e.g. [W | B] for one matmul over the concatenated inner dimension); cols is a multiple of a
// chunk, so no chunk straddles two rows and there are no tail elements.
template <typename T, int Threads = kDequantThreads, int Unroll = kUnroll, bool Streaming = kStreamingStores,
          bool LoadsFirst = kLoadsBeforeTables, bool Rows = false>
__global__ void __launch_bounds__(Threads)
    nf4_dequantize_kernel(const unsigned char* __restrict__ packed, nf4::AbsmaxSource source, long long n,
                          BlockShifts shifts, T* __restrict__ out, long long cols = 0, long long row_stride = 0) {
  using Shape = ChunkShape<T>;
  __shared__ float levels[16];
  __shared__ float code2[256];
  if constexpr (!LoadsFirst) load_tables(source, levels, code2);

  const long long full_chunks = n / Shape::kElements;
  const long long tile = static_cast<long long>(blockIdx.x) * Threads * Unroll;
  const bool nested = source.absmax == nullptr;
  // Global loads first: packed bytes, and the absmax (plain) or its 8-bit index and group scale
  // (nested). Only then the shared tables, so their latency overlaps these loads.
  typename Shape::Packed bytes[Unroll];
  float absmax_or_scale2[Unroll];
  unsigned char qabsmax[Unroll];
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const long long chunk = tile + k * Threads + threadIdx.x;
    if (chunk < full_chunks) {
      bytes[k] = __ldg(reinterpret_cast<const typename Shape::Packed*>(packed) + chunk);
      const long long block = (chunk * Shape::kElements) >> shifts.block_shift;
      if (nested) {
        qabsmax[k] = __ldg(source.qabsmax + block);
        absmax_or_scale2[k] = __ldg(source.absmax2 + (block >> shifts.block2_shift));
      } else {
        absmax_or_scale2[k] = __ldg(source.absmax + block);
      }
    }
  }
  const float offset = nested ? __ldg(source.offset) : 0.0f;
  if constexpr (LoadsFirst) load_tables(source, levels, code2);
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const long long chunk = tile + k * Threads + threadIdx.x;
    if (chunk < full_chunks) {
      const float scale =
          nested ? __fadd_rn(__fmul_rn(code2[qabsmax[k]], absmax_or_scale2[k]), offset) : absmax_or_scale2[k];
      const uint4 value = dequantize_chunk<T>(bytes[k], levels, scale);
      if constexpr (Rows) {
        const long long first = chunk * Shape::kElements;
        const long long row = first / cols;
        *reinterpret_cast<uint4*>(out + row * row_stride + (first - row * cols)) = value;
      } else if constexpr (Streaming) {
        __stcs(reinterpret_cast<uint4*>(out) + chunk, value);
      } else {
        reinterpret_cast<uint4*>(out)[chunk] = value;
      }
    }
  }
  // The last elements (fewer than one chunk), one by one, in the last block.
  if (!Rows && blockIdx.x == gridDim.x - 1) {
    for (long long i = full_chunks * Shape::kElements + threadIdx.x; i < n; i += Threads) {
      dequantize_one(packed, source, levels, code2, shifts, i, out);
    }
  }
}

// Any alignment (a view that does not start on a chunk boundary): one element per thread.
template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_unaligned_kernel(const unsigned char* __restrict__ packed, nf4::AbsmaxSource source, long long n,
                                    BlockShifts shifts, T* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float code2[256];
  load_tables(source, levels, code2);
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dequantize_one(packed, source, levels, code2, shifts, i, out);
}

// bitsandbytes builds its CUDA kernels with --use_fast_math, so its quantizer (kQuantizeBlockwise) runs
// with flush-to-zero and an approximate reciprocal: absmax = max.ftz(abs.ftz(x)) over the block,
// r = rcp.approx.ftz(absmax), v = mul.ftz(x, r), for every block, the last, partial one included, and
// no clamp (an all-zero block gives 0 * inf = NaN, which its decision tree, like cuda_level_index after
// our clamp, sends to code 0); its thresholds are kCudaThresholds below, not quite the fp32 midpoints.
// These wrappers are those instructions, so that our CUDA bytes are its CUDA bytes. Its CPU path is its default torch kernel instead (IEEE; nf4.h's rules, our CPU kernel):
// where rcp.approx is one ulp off and x * r lands on the other side of a midpoint, the two differ.
__device__ __forceinline__ float abs_ftz(float x) {
  float r;
  asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float max_ftz(float a, float b) {
  float r;
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The 15 decision thresholds of bitsandbytes' CUDA NF4 quantizer, as fp32 bit patterns read from its
// compiled kernels (the immediates of their FSETP.GT chains, bitsandbytes 0.50.2: the same 15 in its
// blocksize-32 and general quantizers, in its sm_80 to sm_120 builds). Four of them are one
// ulp away from the fp32 midpoints (level_j + level_j+1) / 2 that its CPU path and our CPU kernel use
// (indices 0 and 8 one ulp further from zero, 12 and 14 one ulp nearer), so a value that lands exactly on
// one of those midpoints gets a different code on CUDA than on CPU. Counting the thresholds strictly
// below v gives the same code as its `x > t` tree.
__device__ constexpr float kCudaThresholds[15] = {
    -0x1.b239b2p-1f,  // -0.8480964303016663
    -0x1.38a4e0p-1f,  // -0.6106328964233398
    -0x1.d70900p-2f,  // -0.4599952697753906
    -0x1.5bd4ecp-2f,  // -0.33967941999435425
    -0x1.e079d8p-3f,  // -0.23460739850997925
    -0x1.1a7178p-3f,  // -0.13791173696517944
    -0x1.74f0e2p-5f,  // -0.045525018125772476
    0x1.45f5fep-5f,   // 0.03979014977812767
    0x1.ec90c6p-4f,   // 0.1202552542090416
    0x1.a0cfc0p-3f,   // 0.2035212516784668
    0x1.2b05a8p-2f,   // 0.2920137643814087
    0x1.8ea7f2p-2f,   // 0.3893125355243683
    0x1.00da06p-1f,   // 0.5016633868217468
    0x1.491b5ep-1f,   // 0.6427869200706482
    0x1.b913b2p-1f,   // 0.8614783883094788
};

__device__ __forceinline__ int cuda_level_index(float v) {
  int index = 0;
#pragma unroll
  for (int j = 0; j < 15; ++j) index += kCudaThresholds[j] < v ? 1 : 0;
  return index;
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
  for (long long i = begin + lane; i < end; i += 32) block_max = max_ftz(block_max, abs_ftz(Convert<T>::load(x[i])));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    block_max = max_ftz(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
  }
  const float reciprocal = rcp_approx_ftz(block_max);
  if (lane == 0) absmax[block] = block_max;

  for (long long i = begin + 2 * lane; i < end; i += 64) {
    int pair[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      // The pad nibble of an odd-length tensor is a quantized 0.0 (bitsandbytes loads zeros past the end).
      const float xi = i + k < end ? Convert<T>::load(x[i + k]) : 0.0f;
      float v = mul_ftz(xi, reciprocal);
      v = fminf(1.0f, fmaxf(-1.0f, v));  // NaN (an all-zero block) becomes -1: code 0, as bitsandbytes
      pair[k] = cuda_level_index(v);
    }
    packed[i / 2] = static_cast<unsigned char>((pair[0] << 4) | pair[1]);
  }
}

int log2_exact(long long value, const char* name) {
  int shift = 0;
  while ((1LL << shift) < value) ++shift;
  LF_CHECK((1LL << shift) == value, name, " must be a power of two, got ", value);
  return shift;
}

unsigned int grid_for(long long items, long long per_block, long long n) {
  const long long grid = (items + per_block - 1) / per_block;
  LF_CHECK(grid <= 0x7fffffffLL, "tensor too large for one launch: ", n, " elements");
  return static_cast<unsigned int>(grid);
}

template <typename T>
void launch_dequantize(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                       long long blocksize, void* out, cudaStream_t stream, long long cols, long long row_stride) {
  using Shape = ChunkShape<T>;
  const BlockShifts shifts{log2_exact(blocksize, "blocksize"),
                           source.absmax != nullptr ? 0 : log2_exact(source.blocksize2, "blocksize2")};
  const bool aligned = reinterpret_cast<std::uintptr_t>(packed) % Shape::kPackedBytes == 0 &&
                       reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  if (row_stride != 0 && row_stride != cols) {
    LF_CHECK(aligned && cols > 0 && cols % Shape::kElements == 0 && n % cols == 0 && row_stride > cols &&
                 (row_stride * static_cast<long long>(sizeof(T))) % 16 == 0,
             "nf4 dequantize into rows: out and packed 16-byte aligned, cols a multiple of ", Shape::kElements,
             " dividing n, and the row stride (in bytes) a multiple of 16 above cols; got n=", n, " cols=", cols,
             " row_stride=", row_stride);
    const long long per_block = static_cast<long long>(kDequantThreads) * kUnroll * Shape::kElements;
    nf4_dequantize_kernel<T, kDequantThreads, kUnroll, kStreamingStores, kLoadsBeforeTables, true>
        <<<grid_for(n, per_block, n), kDequantThreads, 0, stream>>>(packed, source, n, shifts, static_cast<T*>(out),
                                                                    cols, row_stride);
    cuda_check(cudaGetLastError(), "nf4_dequantize_kernel (rows) launch");
    return;
  }
  if (aligned) {
    const long long per_block = static_cast<long long>(kDequantThreads) * kUnroll * Shape::kElements;
    nf4_dequantize_kernel<T><<<grid_for(n, per_block, n), kDequantThreads, 0, stream>>>(packed, source, n, shifts,
                                                                                         static_cast<T*>(out));
  } else {
    nf4_dequantize_unaligned_kernel<T><<<grid_for(n, kDequantThreads, n), kDequantThreads, 0, stream>>>(
        packed, source, n, shifts, static_cast<T*>(out));
  }
  cuda_check(cudaGetLastError(), "nf4_dequantize_kernel launch");
}

template <typename T>
void launch_quantize(const void* x, long long n, long long blocksize, unsigned char* packed, float* absmax,
                     cudaStream_t stream) {
  constexpr int kWarps = 8;
  const long long num_blocks = (n + blocksize - 1) / blocksize;
  nf4_quantize_kernel<T><<<grid_for(num_blocks, kWarps, n), kWarps * 32, 0, stream>>>(
      static_cast<const T*>(x), n, blocksize, packed, absmax, num_blocks);
  cuda_check(cudaGetLastError(), "nf4_quantize_kernel launch");
}

}  // namespace

void nf4_dequantize_cuda(const unsigned char* packed, const nf4::AbsmaxSource& source, long long n,
                         long long blocksize, void* out, DType dtype, std::uintptr_t stream, long long cols,
                         long long row_stride) {
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_dequantize<float>(packed, source, n, blocksize, out, s, cols, row_stride);
    case DType::kFloat16: return launch_dequantize<__half>(packed, source, n, blocksize, out, s, cols, row_stride);
    case DType::kBFloat16:
      return launch_dequantize<__nv_bfloat16>(packed, source, n, blocksize, out, s, cols, row_stride);
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
