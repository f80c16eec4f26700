// The only PYBIND11_MODULE of loraforge. Functions take raw addresses (tensor.data_ptr()), sizes,
// dtype codes and a CUDA stream as integers: _core links no torch library. Tensor checks happen in
// python/loraforge/ops; the sizes are checked again here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loraforge/gguf_blocks.h"
#include "loraforge/kernels.h"

namespace py = pybind11;
using loraforge::as_ptr;
using loraforge::to_dtype;
using std::uintptr_t;

namespace {

void check_nf4_sizes(long long n, long long blocksize) {
  LF_CHECK(n > 0, "n (number of elements) must be positive, got ", n);
  LF_CHECK(loraforge::nf4::valid_blocksize(blocksize),
           "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

loraforge::nf4::AbsmaxSource plain_absmax(uintptr_t absmax) {
  loraforge::nf4::AbsmaxSource source;
  source.absmax = as_ptr<const float>(absmax, "absmax");
  return source;
}

loraforge::nf4::AbsmaxSource nested_absmax(uintptr_t qabsmax, uintptr_t code2, uintptr_t absmax2, uintptr_t offset,
                                           long long num_blocks, long long num_absmax2, long long blocksize2) {
  LF_CHECK(blocksize2 > 0, "blocksize2 must be positive, got ", blocksize2);
  LF_CHECK(num_absmax2 == (num_blocks + blocksize2 - 1) / blocksize2, "absmax2 holds ", num_absmax2,
           " values but ", num_blocks, " blocks in groups of ", blocksize2, " need ",
           (num_blocks + blocksize2 - 1) / blocksize2);
  loraforge::nf4::AbsmaxSource source;
  source.qabsmax = as_ptr<const unsigned char>(qabsmax, "qabsmax");
  source.code2 = as_ptr<const float>(code2, "code2");
  source.absmax2 = as_ptr<const float>(absmax2, "absmax2");
  source.offset = as_ptr<const float>(offset, "offset");
  source.blocksize2 = blocksize2;
  return source;
}

loraforge::gguf::BlockInfo gguf_info(int qtype) {
  loraforge::gguf::BlockInfo info;
  LF_CHECK(loraforge::gguf::block_info(qtype, &info), "qtype ", qtype,
           " is not a GGUF type loraforge packs; supported ids: 2 (Q4_0), 8 (Q8_0), 10 (Q2_K), 11 (Q3_K), "
           "12 (Q4_K), 13 (Q5_K), 14 (Q6_K)");
  return info;
}

void check_gguf_sizes(long long rows, long long cols, int qtype) {
  const auto info = gguf_info(qtype);
  LF_CHECK(rows > 0, "rows must be positive, got ", rows);
  LF_CHECK(cols > 0, "cols must be positive, got ", cols);
  LF_CHECK(cols % info.elems == 0, "cols (", cols, ") must be a multiple of ", info.elems,
           ", the block size of GGUF type ", qtype);
  LF_CHECK(rows <= (1LL << 62) / cols, "rows * cols overflows: ", rows, " x ", cols);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "loraforge compiled kernels (CPU always; CUDA when built with nvcc)";

  m.def("cuda_built", &loraforge::cuda_built, "True when this _core holds CUDA kernels");
  m.def("cuda_architectures", [] { return std::string(LORAFORGE_CUDA_ARCHS); },
        "The CUDA_ARCHITECTURES this _core was configured with (meaningful when cuda_built())");
  m.def("nf4_levels", [] { return std::vector<float>(std::begin(loraforge::nf4::kLevels),
                                                      std::end(loraforge::nf4::kLevels)); },
        "The 16 NF4 levels the kernels use");

  // ---- NF4, CPU ----
  m.def(
      "nf4_quantize_cpu",
      [](uintptr_t x, int dtype, long long n, long long blocksize, uintptr_t packed, uintptr_t absmax,
         int num_threads) {
        check_nf4_sizes(n, blocksize);
        const auto kind = to_dtype(dtype);
        auto* x_ptr = as_ptr<const void>(x, "x");
        auto* packed_ptr = as_ptr<unsigned char>(packed, "packed");
        auto* absmax_ptr = as_ptr<float>(absmax, "absmax");
        py::gil_scoped_release release;
        loraforge::nf4_quantize_cpu(x_ptr, kind, n, blocksize, packed_ptr, absmax_ptr, num_threads);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"),
      py::arg("num_threads"));

  m.def(
      "nf4_dequantize_cpu",
      [](uintptr_t packed, uintptr_t absmax, long long n, long long blocksize, uintptr_t out, int dtype,
         int num_threads) {
        check_nf4_sizes(n, blocksize);
        const auto kind = to_dtype(dtype);
        const auto source = plain_absmax(absmax);
        auto* packed_ptr = as_ptr<const unsigned char>(packed, "packed");
        auto* out_ptr = as_ptr<void>(out, "out");
        py::gil_scoped_release release;
        loraforge::nf4_dequantize_cpu(packed_ptr, source, n, blocksize, out_ptr, kind, num_threads);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"), py::arg("out"), py::arg("dtype"),
      py::arg("num_threads"));

  m.def(
      "nf4_dequantize_nested_cpu",
      [](uintptr_t packed, uintptr_t qabsmax, uintptr_t code2, uintptr_t absmax2, uintptr_t offset,
         long long num_absmax2, long long blocksize2, long long n, long long blocksize, uintptr_t out, int dtype,
         int num_threads) {
        check_nf4_sizes(n, blocksize);
        const auto kind = to_dtype(dtype);
        const auto source = nested_absmax(qabsmax, code2, absmax2, offset, (n + blocksize - 1) / blocksize,
                                          num_absmax2, blocksize2);
        auto* packed_ptr = as_ptr<const unsigned char>(packed, "packed");
        auto* out_ptr = as_ptr<void>(out, "out");
        py::gil_scoped_release release;
        loraforge::nf4_dequantize_cpu(packed_ptr, source, n, blocksize, out_ptr, kind, num_threads);
      },
      py::arg("packed"), py::arg("qabsmax"), py::arg("code2"), py::arg("absmax2"), py::arg("offset"),
      py::arg("num_absmax2"), py::arg("blocksize2"), py::arg("n"), py::arg("blocksize"), py::arg("out"),
      py::arg("dtype"), py::arg("num_threads"));

  // ---- GGUF blocks, CPU ----
  m.def(
      "gguf_block_info",
      [](int qtype) {
        const auto info = gguf_info(qtype);
        return py::make_tuple(info.elems, info.bytes);
      },
      py::arg("qtype"), "(values per block, bytes per block) of a GGUF type id");

  m.def(
      "gguf_quantize_cpu",
      [](uintptr_t src, long long rows, long long cols, int qtype, uintptr_t dst, int num_threads) {
        check_gguf_sizes(rows, cols, qtype);
        auto* src_ptr = as_ptr<const float>(src, "src");
        auto* dst_ptr = as_ptr<unsigned char>(dst, "dst");
        py::gil_scoped_release release;
        loraforge::gguf_quantize_cpu(src_ptr, rows, cols, qtype, dst_ptr, num_threads);
      },
      py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("qtype"), py::arg("dst"), py::arg("num_threads"),
      "Pack float32 [rows, cols] at src into GGUF blocks at dst, as llama.cpp's ggml_quantize_chunk");

  m.def(
      "gguf_dequantize_cpu",
      [](uintptr_t src, long long rows, long long cols, int qtype, uintptr_t dst, int num_threads) {
        check_gguf_sizes(rows, cols, qtype);
        auto* src_ptr = as_ptr<const unsigned char>(src, "src");
        auto* dst_ptr = as_ptr<float>(dst, "dst");
        py::gil_scoped_release release;
        loraforge::gguf_dequantize_cpu(src_ptr, rows, cols, qtype, dst_ptr, num_threads);
      },
      py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("qtype"), py::arg("dst"), py::arg("num_threads"),
      "Unpack GGUF blocks at src into float32 [rows, cols] at dst, as llama.cpp's to_float");

  // ---- GGUF blocks, CUDA (a clear error when this _core was built without CUDA) ----
  m.def(
      "gguf_quantize_cuda",
      [](uintptr_t src, int dtype, long long rows, long long cols, int qtype, uintptr_t dst, uintptr_t stream) {
        check_gguf_sizes(rows, cols, qtype);
        const auto kind = to_dtype(dtype);
        loraforge::gguf_quantize_cuda(as_ptr<const void>(src, "src"), kind, rows, cols, qtype,
                                      as_ptr<unsigned char>(dst, "dst"), stream);
      },
      py::arg("src"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("qtype"), py::arg("dst"),
      py::arg("stream"),
      "Pack [rows, cols] of float32/float16/bfloat16 on the GPU at src into GGUF blocks at dst (device memory), "
      "on the given CUDA stream; the same bytes as gguf_quantize_cpu");

  // ---- NF4, CUDA (raise a clear error when this _core was built without CUDA) ----
  m.def(
      "nf4_quantize_cuda",
      [](uintptr_t x, int dtype, long long n, long long blocksize, uintptr_t packed, uintptr_t absmax,
         uintptr_t stream) {
        check_nf4_sizes(n, blocksize);
        loraforge::nf4_quantize_cuda(as_ptr<const void>(x, "x"), to_dtype(dtype), n, blocksize,
                                     as_ptr<unsigned char>(packed, "packed"), as_ptr<float>(absmax, "absmax"),
                                     stream);
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"),
      py::arg("stream"));

  m.def(
      "nf4_dequantize_cuda",
      [](uintptr_t packed, uintptr_t absmax, long long n, long long blocksize, uintptr_t out, int dtype,
         uintptr_t stream) {
        check_nf4_sizes(n, blocksize);
        loraforge::nf4_dequantize_cuda(as_ptr<const unsigned char>(packed, "packed"), plain_absmax(absmax), n,
                                       blocksize, as_ptr<void>(out, "out"), to_dtype(dtype), stream);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"), py::arg("out"), py::arg("dtype"),
      py::arg("stream"));

  m.def(
      "nf4_dequantize_nested_cuda",
      [](uintptr_t packed, uintptr_t qabsmax, uintptr_t code2, uintptr_t absmax2, uintptr_t offset,
         long long num_absmax2, long long blocksize2, long long n, long long blocksize, uintptr_t out, int dtype,
         uintptr_t stream, long long cols, long long row_stride) {
        check_nf4_sizes(n, blocksize);
        const auto source = nested_absmax(qabsmax, code2, absmax2, offset, (n + blocksize - 1) / blocksize,
                                          num_absmax2, blocksize2);
        loraforge::nf4_dequantize_cuda(as_ptr<const unsigned char>(packed, "packed"), source, n, blocksize,
                                       as_ptr<void>(out, "out"), to_dtype(dtype), stream, cols, row_stride);
      },
      py::arg("packed"), py::arg("qabsmax"), py::arg("code2"), py::arg("absmax2"), py::arg("offset"),
      py::arg("num_absmax2"), py::arg("blocksize2"), py::arg("n"), py::arg("blocksize"), py::arg("out"),
      py::arg("dtype"), py::arg("stream"), py::arg("cols") = 0, py::arg("row_stride") = 0);
}
