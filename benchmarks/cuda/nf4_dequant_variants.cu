// Launch-shape variants of the NF4 dequantize kernel (bf16 out, double quantization), timed side
// by side in one process, each output compared byte for byte with the shipped shape's. Used to
// choose kDequantThreads / kUnroll / kStreamingStores in csrc/cuda/nf4_cuda.cu.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 --fmad=false --expt-relaxed-constexpr -diag-suppress=20091 \
//        -Icsrc/include benchmarks/cuda/nf4_dequant_variants.cu -o /tmp/nf4_variants && /tmp/nf4_variants
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/nf4_cuda.cu"

using namespace loraforge;

#define CHECK(call) cuda_check((call), #call)

__global__ void fill_bytes(unsigned char* data, long long count, unsigned int salt) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += (long long)gridDim.x * blockDim.x) {
    unsigned int h = (unsigned int)i * 2654435761u ^ salt;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    data[i] = (unsigned char)h;
  }
}

__global__ void fill_floats(float* data, long long count, float scale, unsigned int salt) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count; i += (long long)gridDim.x * blockDim.x) {
    unsigned int h = (unsigned int)i * 2654435761u ^ salt;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    data[i] = scale * ((h & 0xffffff) / 16777216.0f - 0.5f);
  }
}

struct Inputs {
  unsigned char* packed;
  unsigned char* qabsmax;
  float* absmax2;
  nf4::AbsmaxSource source;
};

constexpr int kSets = 3;

// Microseconds per launch: 6 untimed launches, then `reps` back to back between two events.
template <typename Launch>
float time_launches(Launch launch, int reps) {
  for (int i = 0; i < 6; ++i) launch(i);
  CHECK(cudaGetLastError());
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  CHECK(cudaEventRecord(start));
  for (int i = 0; i < reps; ++i) launch(i);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  return ms * 1000.0f / reps;
}

template <int Threads, int Unroll, bool Streaming, bool LoadsFirst = true>
float time_variant(const std::vector<Inputs>& sets, long long n, __nv_bfloat16** outs, int reps) {
  const long long per_block = (long long)Threads * Unroll * 8;
  const unsigned int grid = (unsigned int)((n + per_block - 1) / per_block);
  const BlockShifts shifts{6, 8};
  auto launch = [&](int i) {
    const Inputs& in = sets[i % kSets];
    nf4_dequantize_kernel<__nv_bfloat16, Threads, Unroll, Streaming, LoadsFirst><<<grid, Threads>>>(in.packed, in.source, n, shifts,
                                                                                       outs[i % kSets]);
  };
  return time_launches(launch, reps);
}

// Wide loads: each thread loads kWords 32-bit words of packed bytes at once (8 or 16 bytes: 16 or 32
// elements, one quantization block's absmax for blocksize >= 32) and stores kWords 16-byte chunks,
// either straight (each store instruction strided by kWords x 16 bytes across the warp) or staged
// through shared memory so that every warp store is 512 contiguous bytes. bf16, nested absmax only.
template <int Threads, int kWords, bool Staged>
__global__ void __launch_bounds__(Threads)
    wide_dequantize_kernel(const unsigned char* __restrict__ packed, nf4::AbsmaxSource source, long long n,
                           BlockShifts shifts, __nv_bfloat16* __restrict__ out) {
  __shared__ float levels[16];
  __shared__ float code2[256];
  __shared__ uint4 stage[Staged ? Threads * kWords : 1];
  const long long groups = n / (8 * kWords);  // thread-groups of kWords chunks; n is a multiple here
  const long long g = static_cast<long long>(blockIdx.x) * Threads + threadIdx.x;
  unsigned int words[kWords];
  float scale2 = 0.0f;
  unsigned char q = 0;
  if (g < groups) {
    if constexpr (kWords == 4) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed) + g);
      words[0] = v.x; words[1] = v.y; words[2] = v.z; words[3] = v.w;
    } else {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(packed) + g);
      words[0] = v.x; words[1] = v.y;
    }
    const long long block = (g * 8 * kWords) >> shifts.block_shift;
    q = __ldg(source.qabsmax + block);
    scale2 = __ldg(source.absmax2 + (block >> shifts.block2_shift));
  }
  const float offset = __ldg(source.offset);
  load_tables(source, levels, code2);
  const float scale = __fadd_rn(__fmul_rn(code2[q], scale2), offset);
  if constexpr (!Staged) {
    if (g < groups) {
#pragma unroll
      for (int k = 0; k < kWords; ++k)
        reinterpret_cast<uint4*>(out)[g * kWords + k] = dequantize_chunk<__nv_bfloat16>(words[k], levels, scale);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kWords; ++k)
      stage[threadIdx.x * kWords + k] = dequantize_chunk<__nv_bfloat16>(words[k], levels, scale);
    __syncthreads();
    const long long first = static_cast<long long>(blockIdx.x) * Threads * kWords;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const long long chunk = first + k * Threads + threadIdx.x;
      if (chunk < groups * kWords) reinterpret_cast<uint4*>(out)[chunk] = stage[k * Threads + threadIdx.x];
    }
  }
}

// Microseconds per launch of a variant kernel taking (packed, source, n, shifts, out), on `grid` blocks.
using VariantKernel = void (*)(const unsigned char*, nf4::AbsmaxSource, long long, BlockShifts, __nv_bfloat16*);
float time_kernel(VariantKernel kernel, unsigned int grid, int threads, const std::vector<Inputs>& sets, long long n,
                  __nv_bfloat16** outs, int reps) {
  const BlockShifts shifts{6, 8};
  auto launch = [&](int i) {
    const Inputs& in = sets[i % kSets];
    kernel<<<grid, threads>>>(in.packed, in.source, n, shifts, outs[i % kSets]);
  };
  return time_launches(launch, reps);
}

template <int Threads, int kWords, bool Staged>
float time_wide(const std::vector<Inputs>& sets, long long n, __nv_bfloat16** outs, int reps) {
  const long long groups = n / (8 * kWords);
  const unsigned int grid = (unsigned int)((groups + Threads - 1) / Threads);
  return time_kernel(wide_dequantize_kernel<Threads, kWords, Staged>, grid, Threads, sets, n, outs, reps);
}

// Barrier-free: the shipped kernel's blocks are small (256 threads x 2 chunks = 4,096 elements, 14,336
// blocks at 14336x4096), and each first copies the 16 levels and the 256-entry code2 into shared memory
// behind a __syncthreads. Here no block-wide barrier and no code2 copy: code2[q] is read through the
// read-only cache, once per chunk, and the levels either sit in a per-warp shared copy (lanes 0-15
// write it, __syncwarp) or in lanes 0-15's registers, read with a warp shuffle. Same arithmetic, so
// the same bytes. Chunks past the end are clamped for the loads (every lane must take part in the
// shuffles) and not stored. bf16, nested absmax, n a multiple of 8 (the shapes here).
template <int Threads, int Unroll, bool Shuffle>
__global__ void __launch_bounds__(Threads)
    barrier_free_kernel(const unsigned char* __restrict__ packed, nf4::AbsmaxSource source, long long n,
                        BlockShifts shifts, __nv_bfloat16* __restrict__ out) {
  __shared__ float warp_levels[Shuffle ? 1 : Threads / 32][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long full_chunks = n / 8;
  const long long tile = static_cast<long long>(blockIdx.x) * Threads * Unroll;
  unsigned int bytes[Unroll];
  float scale2[Unroll];
  unsigned char q[Unroll];
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const long long chunk = min(tile + k * Threads + threadIdx.x, full_chunks - 1);
    bytes[k] = __ldg(reinterpret_cast<const unsigned int*>(packed) + chunk);
    const long long block = (chunk * 8) >> shifts.block_shift;
    q[k] = __ldg(source.qabsmax + block);
    scale2[k] = __ldg(source.absmax2 + (block >> shifts.block2_shift));
  }
  const float offset = __ldg(source.offset);
  const float my_level = nf4::kLevels[lane & 15];
  if constexpr (!Shuffle) {
    if (lane < 16) warp_levels[warp][lane] = my_level;
    __syncwarp();
  }
  auto level = [&](unsigned int index) {
    if constexpr (Shuffle) {
      return __shfl_sync(0xffffffffu, my_level, static_cast<int>(index));
    } else {
      return warp_levels[warp][index];
    }
  };
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const float scale = __fadd_rn(__fmul_rn(__ldg(source.code2 + q[k]), scale2[k]), offset);
    unsigned int words[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const unsigned int byte = (bytes[k] >> (8 * b)) & 0xffu;
      words[b] = Convert<__nv_bfloat16>::pack2(__fmul_rn(level(byte >> 4), scale), __fmul_rn(level(byte & 15), scale));
    }
    const long long chunk = tile + k * Threads + threadIdx.x;
    if (chunk < full_chunks) reinterpret_cast<uint4*>(out)[chunk] = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

template <int Threads, int Unroll, bool Shuffle>
float time_barrier_free(const std::vector<Inputs>& sets, long long n, __nv_bfloat16** outs, int reps) {
  const long long per_block = (long long)Threads * Unroll * 8;
  const unsigned int grid = (unsigned int)((n + per_block - 1) / per_block);
  return time_kernel(barrier_free_kernel<Threads, Unroll, Shuffle>, grid, Threads, sets, n, outs, reps);
}

// The traffic of a dequantization with no arithmetic: each thread reads one 32-bit word of packed bytes and
// writes a 16-byte chunk made from it, as the kernel does (a fifth of the bytes read, four fifths written),
// minus the absmax reads. What a kernel of this read/write mix can reach, where "same-bytes copy" reads and
// writes equal amounts.
template <int Threads, int Unroll>
__global__ void __launch_bounds__(Threads)
    traffic_only_kernel(const unsigned int* __restrict__ packed, long long chunks, uint4* __restrict__ out) {
  const long long tile = static_cast<long long>(blockIdx.x) * Threads * Unroll;
  unsigned int words[Unroll];
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const long long chunk = tile + k * Threads + threadIdx.x;
    words[k] = chunk < chunks ? __ldg(packed + chunk) : 0u;
  }
#pragma unroll
  for (int k = 0; k < Unroll; ++k) {
    const long long chunk = tile + k * Threads + threadIdx.x;
    if (chunk < chunks) out[chunk] = make_uint4(words[k], words[k] ^ 1u, words[k] ^ 2u, words[k] ^ 3u);
  }
}

template <int Threads, int Unroll>
float time_traffic_only(const std::vector<Inputs>& sets, long long n, __nv_bfloat16** outs, int reps) {
  const long long chunks = n / 8, per_block = (long long)Threads * Unroll;
  const unsigned int grid = (unsigned int)((chunks + per_block - 1) / per_block);
  auto launch = [&](int i) {
    traffic_only_kernel<Threads, Unroll><<<grid, Threads>>>(reinterpret_cast<const unsigned int*>(sets[i % kSets].packed),
                                                            chunks, reinterpret_cast<uint4*>(outs[i % kSets]));
  };
  return time_launches(launch, reps);
}

int main() {
  const long long shapes[][2] = {{14336, 4096}, {4096, 4096}, {128256, 4096}};
  // Copy ceiling: 2 GiB device-to-device, bytes read + written.
  {
    const size_t bytes = 2ull << 30;
    void *a, *b;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    cudaEvent_t s, e;
    cudaEventCreate(&s);
    cudaEventCreate(&e);
    cudaEventRecord(s);
    for (int i = 0; i < 10; ++i) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e);
    cudaEventSynchronize(e);
    float ms;
    cudaEventElapsedTime(&ms, s, e);
    std::printf("copy: %.0f GB/s (read + write)\n", 2.0 * bytes * 10 / (ms * 1e-3) / 1e9);
    cudaFree(a);
    cudaFree(b);
  }
  for (auto& shape : shapes) {
    const long long n = shape[0] * shape[1], blocks = n / 64, groups = (blocks + 255) / 256;
    std::vector<Inputs> sets(kSets);
    float *code2, *offset;
    CHECK(cudaMalloc(&code2, 256 * 4));
    CHECK(cudaMalloc(&offset, 4));
    fill_floats<<<1, 256>>>(code2, 256, 2.0f, 7);
    fill_floats<<<1, 1>>>(offset, 1, 0.1f, 9);
    __nv_bfloat16* outs[kSets];
    for (int s = 0; s < kSets; ++s) {
      CHECK(cudaMalloc(&sets[s].packed, n / 2));
      CHECK(cudaMalloc(&sets[s].qabsmax, blocks));
      CHECK(cudaMalloc(&sets[s].absmax2, groups * 4));
      CHECK(cudaMalloc(&outs[s], n * 2));
      fill_bytes<<<1024, 256>>>(sets[s].packed, n / 2, 11 + s);
      fill_bytes<<<1024, 256>>>(sets[s].qabsmax, blocks, 21 + s);
      fill_floats<<<256, 256>>>(sets[s].absmax2, groups, 0.05f, 31 + s);
      sets[s].source.qabsmax = sets[s].qabsmax;
      sets[s].source.code2 = code2;
      sets[s].source.absmax2 = sets[s].absmax2;
      sets[s].source.offset = offset;
      sets[s].source.blocksize2 = 256;
    }
    CHECK(cudaDeviceSynchronize());
    std::vector<unsigned char> reference(n * 2), candidate(n * 2);
    auto output_of_set0 = [&](std::vector<unsigned char>& host) {
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaMemcpy(host.data(), outs[0], n * 2, cudaMemcpyDeviceToHost));
    };
    const int reps = 60;
    std::printf("%lldx%lld:\n", shape[0], shape[1]);
    {  // a plain copy moving the same bytes (reads + writes = 2.5 n), as a size-matched ceiling
      const size_t half = (size_t)(n * 5 / 4);
      void *a, *b;
      CHECK(cudaMalloc(&a, half));
      CHECK(cudaMalloc(&b, half));
      CHECK(cudaMemcpy(b, a, half, cudaMemcpyDeviceToDevice));
      cudaEvent_t s0, e0;
      cudaEventCreate(&s0);
      cudaEventCreate(&e0);
      cudaEventRecord(s0);
      for (int i = 0; i < reps; ++i) cudaMemcpyAsync(b, a, half, cudaMemcpyDeviceToDevice);
      cudaEventRecord(e0);
      cudaEventSynchronize(e0);
      float ms;
      cudaEventElapsedTime(&ms, s0, e0);
      std::printf("  %-28s %8.2f us\n", "same-bytes copy", ms * 1000.0f / reps);
      cudaFree(a);
      cudaFree(b);
    }
    auto report = [&](const char* name, float us) {
      output_of_set0(candidate);
      const bool same = std::memcmp(candidate.data(), reference.data(), n * 2) == 0;
      std::printf("  %-28s %8.2f us  %s\n", name, us, same ? "same bytes" : "DIFFERENT BYTES");
    };
    {  // ceilings for this read/write mix (no output check: they write other bytes)
      std::printf("  %-28s %8.2f us\n", "traffic only 256/2", time_traffic_only<256, 2>(sets, n, outs, reps));
      std::printf("  %-28s %8.2f us\n", "traffic only 256/4", time_traffic_only<256, 4>(sets, n, outs, reps));
      auto memset_launch = [&](int i) { cudaMemsetAsync(outs[i % kSets], i & 0xff, (size_t)n * 2); };
      std::printf("  %-28s %8.2f us\n", "memset of the output", time_launches(memset_launch, reps));
    }
    time_variant<256, 4, false>(sets, n, outs, 3);  // the first shape tried is the byte reference
    output_of_set0(reference);
    report("threads 256 unroll 4", time_variant<256, 4, false>(sets, n, outs, reps));
    report("tables first 256/2", time_variant<256, 2, false, false>(sets, n, outs, reps));
    report("tables first 256/4", time_variant<256, 4, false, false>(sets, n, outs, reps));
    report("threads 128 unroll 2", time_variant<128, 2, false>(sets, n, outs, reps));
    report("threads 256 unroll 1", time_variant<256, 1, false>(sets, n, outs, reps));
    report("threads 256 unroll 2", time_variant<256, 2, false>(sets, n, outs, reps));
    report("threads 256 unroll 8", time_variant<256, 8, false>(sets, n, outs, reps));
    report("threads 128 unroll 4", time_variant<128, 4, false>(sets, n, outs, reps));
    report("threads 512 unroll 4", time_variant<512, 4, false>(sets, n, outs, reps));
    report("threads 512 unroll 2", time_variant<512, 2, false>(sets, n, outs, reps));
    report("threads 1024 unroll 2", time_variant<1024, 2, false>(sets, n, outs, reps));
    report("threads 256 unroll 4 stcs", time_variant<256, 4, true>(sets, n, outs, reps));
    report("threads 256 unroll 8 stcs", time_variant<256, 8, true>(sets, n, outs, reps));
    report("threads 512 unroll 4 stcs", time_variant<512, 4, true>(sets, n, outs, reps));
    report("threads 256 unroll 4 (again)", time_variant<256, 4, false>(sets, n, outs, reps));
    report("wide 16B loads 256", time_wide<256, 4, false>(sets, n, outs, reps));
    report("wide 16B loads 128", time_wide<128, 4, false>(sets, n, outs, reps));
    report("wide 16B staged 256", time_wide<256, 4, true>(sets, n, outs, reps));
    report("wide 16B staged 128", time_wide<128, 4, true>(sets, n, outs, reps));
    report("wide 8B loads 256", time_wide<256, 2, false>(sets, n, outs, reps));
    report("wide 8B staged 256", time_wide<256, 2, true>(sets, n, outs, reps));
    report("threads 256 unroll 2 (again)", time_variant<256, 2, false>(sets, n, outs, reps));
    report("no barrier, warp levels 256/2", time_barrier_free<256, 2, false>(sets, n, outs, reps));
    report("no barrier, warp levels 256/4", time_barrier_free<256, 4, false>(sets, n, outs, reps));
    report("no barrier, warp levels 512/2", time_barrier_free<512, 2, false>(sets, n, outs, reps));
    report("no barrier, shuffles 256/2", time_barrier_free<256, 2, true>(sets, n, outs, reps));
    report("no barrier, shuffles 256/4", time_barrier_free<256, 4, true>(sets, n, outs, reps));
    report("no barrier, shuffles 128/4", time_barrier_free<128, 4, true>(sets, n, outs, reps));
    report("threads 256 unroll 2 (last)", time_variant<256, 2, false>(sets, n, outs, reps));
    for (int s = 0; s < kSets; ++s) {
      cudaFree(sets[s].packed);
      cudaFree(sets[s].qabsmax);
      cudaFree(sets[s].absmax2);
      cudaFree(outs[s]);
    }
    cudaFree(code2);
    cudaFree(offset);
  }
  return 0;
}
