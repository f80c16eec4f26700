// GGUF block packing (Q8_0, Q4_0, Q2_K..Q6_K) on CUDA, byte-identical to the CPU packer and so to
// llama.cpp's reference quantizers. The arithmetic is not restated here: both packers compile the
// per-block code of kquant_blocks.h / kquant_search.h, and this file only decides which thread runs
// which phase (see kquant_blocks.h for the phases and for what exactness requires of the build).
//
// Work split. The cost is the K types' scale searches: 16 to 21 trial scales per group, each a pass
// over the group's 16 or 32 values, on a single thread because its sums must run in index order.
// So one thread takes one *group*: 8 threads per Q4_K/Q5_K super-block, 16 per Q2_K/Q3_K/Q6_K one,
// always inside one warp. Each thread loads its group into registers (the loops over a group are
// unrolled, so the values, weights and trial levels never touch memory), fits it (phase 1), and the
// super-block's first thread stores the scales (phase 2, a few dozen operations over the group
// results in shared memory). Then each thread re-levels its group (phase 3), the threads pack the
// block's bytes between them (phase 4), and the CTA writes its finished blocks out as one
// contiguous run of bytes. Q8_0 and Q4_0 blocks are one thread each.
//
// Inputs are float32, float16 or bfloat16 (widened to float32 in registers: exact), one launch per
// tensor, on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "loraforge/kernels.h"
#include "loraforge/kquant_blocks.h"

namespace loraforge {
namespace gguf {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// The CTA's finished blocks (`count` of them, staged back to back in shared memory) to dst.
__device__ __forceinline__ void write_blocks(const u8* staged, long long count, int block_bytes, u8* dst) {
  const long long n = count * block_bytes;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = staged[i];
}

// Q8_0 / Q4_0: one thread per 32-value block.
template <class Block, typename T>
__global__ void __launch_bounds__(kThreads)
    pack_legacy_kernel(const T* __restrict__ x, long long num_blocks, u8* __restrict__ out) {
  __shared__ u8 staged[kThreads * Block::kBytes];
  const long long first = static_cast<long long>(blockIdx.x) * kThreads;
  const long long b = first + threadIdx.x;
  if (b < num_blocks) {
    float v[Block::kElems];
    const T* src = x + b * Block::kElems;
    LF_UNROLL
    for (int i = 0; i < Block::kElems; ++i) v[i] = widen(src[i]);
    Block::quantize(v, staged + threadIdx.x * Block::kBytes);
  }
  __syncthreads();
  const long long count = num_blocks - first < kThreads ? num_blocks - first : kThreads;
  write_blocks(staged, count, Block::kBytes, out + first * Block::kBytes);
}

// K types: one thread per group, kThreads / kGroups super-blocks per CTA.
template <class K, typename T>
__global__ void __launch_bounds__(kThreads)
    pack_kquant_kernel(const T* __restrict__ x, long long num_blocks, u8* __restrict__ out) {
  constexpr int kN = K::kGroupSize;
  constexpr int kGroups = K::kGroups;
  constexpr int kPerCta = kThreads / kGroups;
  static_assert(32 % kGroups == 0, "a super-block's threads must share one warp");
  __shared__ float scales[kPerCta][kGroups];
  __shared__ float mins[kPerCta][kGroups];
  __shared__ u8 levels[kPerCta][kSuperBlock];
  __shared__ u8 staged[kPerCta * K::kBytes];
  __shared__ bool unfinished[kPerCta];

  const int local = threadIdx.x / kGroups;  // super-block within the CTA
  const int j = threadIdx.x % kGroups;      // group within the super-block
  const long long first = static_cast<long long>(blockIdx.x) * kPerCta;
  const bool valid = first + local < num_blocks;
  u8* block = staged + local * K::kBytes;

  float g[kN];
  u8 group_levels[kN];
  if (valid) {  // phase 1: fit this thread's group
    const T* src = x + (first + local) * kSuperBlock + j * kN;
    LF_UNROLL
    for (int i = 0; i < kN; ++i) g[i] = widen(src[i]);
    K::fit_group(g, group_levels, &scales[local][j], &mins[local][j]);
  }
  __syncwarp();
  if (valid && j == 0) unfinished[local] = K::store_scales(scales[local], mins[local], block);  // phase 2
  __syncwarp();
  const bool finish = valid && unfinished[local];
  if (finish) {  // phase 3: re-level against the stored scales
    K::relevel_group(g, j, block, group_levels);
    LF_UNROLL
    for (int i = 0; i < kN; ++i) levels[local][j * kN + i] = group_levels[i];
  }
  __syncwarp();
  if (finish) K::pack(levels[local], block, j, kGroups);  // phase 4: bytes j, j + kGroups, ...
  __syncthreads();
  const long long count = num_blocks - first < kPerCta ? num_blocks - first : kPerCta;
  write_blocks(staged, count, K::kBytes, out + first * K::kBytes);
}

unsigned int grid_for(long long items, long long per_cta) {
  const long long grid = (items + per_cta - 1) / per_cta;
  LF_CHECK(grid <= 0x7fffffffLL, "tensor too large for one launch: ", items, " blocks");
  return static_cast<unsigned int>(grid);
}

template <class Block, typename T>
void launch_legacy(const void* x, long long values, u8* dst, cudaStream_t stream) {
  const long long blocks = values / Block::kElems;
  pack_legacy_kernel<Block, T>
      <<<grid_for(blocks, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(x), blocks, dst);
  cuda_check(cudaGetLastError(), "gguf pack_legacy_kernel launch");
}

template <class K, typename T>
void launch_kquant(const void* x, long long values, u8* dst, cudaStream_t stream) {
  const long long blocks = values / kSuperBlock;
  pack_kquant_kernel<K, T><<<grid_for(blocks, kThreads / K::kGroups), kThreads, 0, stream>>>(
      static_cast<const T*>(x), blocks, dst);
  cuda_check(cudaGetLastError(), "gguf pack_kquant_kernel launch");
}

template <typename T>
void launch(int qtype, const void* x, long long values, u8* dst, cudaStream_t stream) {
  switch (qtype) {
    case kQ8_0: return launch_legacy<Q8_0Block, T>(x, values, dst, stream);
    case kQ4_0: return launch_legacy<Q4_0Block, T>(x, values, dst, stream);
    case kQ2_K: return launch_kquant<Q2_KBlock, T>(x, values, dst, stream);
    case kQ3_K: return launch_kquant<Q3_KBlock, T>(x, values, dst, stream);
    case kQ4_K: return launch_kquant<Q4_KBlock, T>(x, values, dst, stream);
    case kQ5_K: return launch_kquant<Q5_KBlock, T>(x, values, dst, stream);
    case kQ6_K: return launch_kquant<Q6_KBlock, T>(x, values, dst, stream);
    default: fail("unsupported GGUF quantization type id ", qtype);
  }
}

}  // namespace
}  // namespace gguf

void gguf_quantize_cuda(const void* src, DType dtype, long long rows, long long cols, int qtype, unsigned char* dst,
                        std::uintptr_t stream) {
  const long long values = rows * cols;  // sizes checked by the caller (bindings.cpp)
  switch (dtype) {
    case DType::kFloat32: return gguf::launch<float>(qtype, src, values, dst, as_stream(stream));
    case DType::kFloat16: return gguf::launch<__half>(qtype, src, values, dst, as_stream(stream));
    case DType::kBFloat16: return gguf::launch<__nv_bfloat16>(qtype, src, values, dst, as_stream(stream));
  }
}

}  // namespace loraforge
