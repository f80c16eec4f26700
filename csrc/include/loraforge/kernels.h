// Entry points of the kernels, one declaration per op and device. bindings.cpp is their only caller.
#pragma once
#include <cstdint>

#include "loraforge/checks.h"
#include "loraforge/nf4.h"

namespace loraforge {

// ---- CPU (csrc/cpu) ----
void nf4_quantize_cpu(const void* x, DType dtype, long long n, long long blocksize, unsigned char* packed,
                      float* absmax, int num_threads);
void nf4_dequantize_cpu(const unsigned char* packed, const nf4::AbsmaxSource& absmax, long long n,
                        long long blocksize, void* out, DType dtype, int num_threads);
// GGUF blocks (gguf_blocks.h): float32 [rows, cols] <-> rows * cols / block_elems blocks, row-major.
// `qtype` is ggml's type id; cols must be a multiple of the type's block size (checked by the caller).
void gguf_quantize_cpu(const float* src, long long rows, long long cols, int qtype, unsigned char* dst,
                       int num_threads);
void gguf_dequantize_cpu(const unsigned char* src, long long rows, long long cols, int qtype, float* dst,
                         int num_threads);

// ---- CUDA (csrc/cuda); `stream` is a cudaStream_t passed as an integer ----
bool cuda_built();
void nf4_quantize_cuda(const void* x, DType dtype, long long n, long long blocksize, unsigned char* packed,
                       float* absmax, std::uintptr_t stream);
// row_stride != 0 (and != cols): W's rows of `cols` elements are written row_stride elements apart.
void nf4_dequantize_cuda(const unsigned char* packed, const nf4::AbsmaxSource& absmax, long long n,
                         long long blocksize, void* out, DType dtype, std::uintptr_t stream, long long cols = 0,
                         long long row_stride = 0);
// GGUF blocks: [rows, cols] of `dtype` (widened to fp32 exactly) -> the same bytes gguf_quantize_cpu writes.
void gguf_quantize_cuda(const void* src, DType dtype, long long rows, long long cols, int qtype, unsigned char* dst,
                        std::uintptr_t stream);

}  // namespace loraforge
