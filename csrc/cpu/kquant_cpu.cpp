// GGUF block packing (Q4_0, Q8_0, Q2_K..Q6_K) and unpacking on the CPU, byte-identical to what
// llama.cpp's `ggml_quantize_chunk(type, src, dst, 0, rows, cols, /*imatrix=*/NULL)` writes and to
// its `to_float` dequantizers. Without an importance matrix llama.cpp runs its reference ("_ref")
// quantizers, which treat every block on its own, so threads may split the work anywhere on block
// boundaries. The packers themselves live in kquant_blocks.h (shared with the CUDA packer, so the two
// cannot drift) and the scale searches in kquant_search.h; block layouts are in gguf_blocks.h.
#include <cstdint>

#include "loraforge/cpu_threads.h"
#include "loraforge/gguf_blocks.h"
#include "loraforge/kernels.h"
#include "loraforge/kquant_blocks.h"

namespace loraforge {
namespace gguf {
namespace {

void quantize_q8_0(const float* x, u8* block) { Q8_0Block::quantize(x, block); }
void quantize_q4_0(const float* x, u8* block) { Q4_0Block::quantize(x, block); }
void quantize_q2_k(const float* x, u8* block) { quantize_superblock<Q2_KBlock>(x, block); }
void quantize_q3_k(const float* x, u8* block) { quantize_superblock<Q3_KBlock>(x, block); }
void quantize_q4_k(const float* x, u8* block) { quantize_superblock<Q4_KBlock>(x, block); }
void quantize_q5_k(const float* x, u8* block) { quantize_superblock<Q5_KBlock>(x, block); }
void quantize_q6_k(const float* x, u8* block) { quantize_superblock<Q6_KBlock>(x, block); }

// ---- dequantizers, as ggml's to_float ----------------------------------------------------------------

void dequantize_q8_0(const u8* block, float* y) {
  const float d = load_fp16(block);
  for (int j = 0; j < kLegacyBlock; ++j) y[j] = static_cast<std::int8_t>(block[2 + j]) * d;
}

void dequantize_q4_0(const u8* block, float* y) {
  const float d = load_fp16(block);
  for (int j = 0; j < kLegacyBlock / 2; ++j) {
    y[j] = ((block[2 + j] & 0x0f) - 8) * d;
    y[j + 16] = ((block[2 + j] >> 4) - 8) * d;
  }
}

void dequantize_q2_k(const u8* block, float* y) {
  using B = Q2_KBlock;
  const float d = load_fp16(block + B::kD);
  const float dmin = load_fp16(block + B::kDmin);
  const u8* scales = block + B::kScales;
  for (int j = 0; j < 16; ++j) {  // group j: half j/8, bit pair (j%8)/2, bytes 16*(j%2)..+16
    const float dl = d * (scales[j] & 0x0f);
    const float ml = dmin * (scales[j] >> 4);
    const u8* q = block + B::kQs + 32 * (j / 8) + 16 * (j % 2);
    const int shift = 2 * ((j % 8) / 2);
    for (int l = 0; l < 16; ++l) y[16 * j + l] = dl * ((q[l] >> shift) & 3) - ml;
  }
}

void dequantize_q3_k(const u8* block, float* y) {
  using B = Q3_KBlock;
  const float d_all = load_fp16(block + B::kD);
  const u8* hmask = block + B::kHmask;
  for (int j = 0; j < 16; ++j) {
    const float dl = d_all * unpack_scale_q3(block + B::kScales, j);
    const int offset = 32 * (j / 8) + 16 * (j % 2);  // same bit placement as Q2_K
    const u8* q = block + B::kQs + offset;
    const int shift = 2 * ((j % 8) / 2);
    const u8 high_bit = static_cast<u8>(1u << (j / 2));  // value 16j+l sits at hmask[(16j+l)%32], bit (16j+l)/32
    for (int l = 0; l < 16; ++l) {
      const int low = (q[l] >> shift) & 3;
      y[16 * j + l] = dl * (low - ((hmask[16 * (j % 2) + l] & high_bit) ? 0 : 4));
    }
  }
}

void dequantize_q4_k(const u8* block, float* y) {
  using B = Q4_KBlock;
  const float d = load_fp16(block + B::kD);
  const float dmin = load_fp16(block + B::kDmin);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    unpack_scale_min_k4(block + B::kScales, j, &s, &m);
    const float dl = d * s;
    const float ml = dmin * m;
    const u8* q = block + Q4_KLayout::kQs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * ((q[l] >> shift) & 0x0f) - ml;
  }
}

void dequantize_q5_k(const u8* block, float* y) {
  using B = Q5_KBlock;
  const float d = load_fp16(block + B::kD);
  const float dmin = load_fp16(block + B::kDmin);
  const u8* qh = block + Q5_KLayout::kQh;
  for (int j = 0; j < 8; ++j) {
    int s, m;
    unpack_scale_min_k4(block + B::kScales, j, &s, &m);
    const float dl = d * s;
    const float ml = dmin * m;
    const u8* q = block + Q5_KLayout::kQs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int value = ((q[l] >> shift) & 0x0f) + (((qh[l] >> j) & 1) ? 16 : 0);
      y[32 * j + l] = dl * value - ml;
    }
  }
}

void dequantize_q6_k(const u8* block, float* y) {
  using B = Q6_KBlock;
  const float d = load_fp16(block + B::kD);
  const auto* scales = reinterpret_cast<const std::int8_t*>(block + B::kScales);
  for (int half = 0; half < 2; ++half) {
    const u8* ql = block + B::kQl + 64 * half;
    const u8* qh = block + B::kQh + 32 * half;
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
