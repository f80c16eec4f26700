// Stand-ins for the CUDA entry points when _core is built without nvcc: each raises a clear error.
#include <stdexcept>

#include "loraforge/kernels.h"

namespace loraforge {
namespace {
[[noreturn]] void not_built() {
  throw std::runtime_error(
      "loraforge._core was built without CUDA kernels (nvcc was not found at build time). Rebuild on a machine "
      "with the CUDA toolkit: pip install --no-build-isolation --force-reinstall -C cmake.define.LORAFORGE_CUDA=ON .");
}
}  // namespace

bool cuda_built() { return false; }
void nf4_quantize_cuda(const void*, DType, long long, long long, unsigned char*, float*, std::uintptr_t) {
  not_built();
}
void nf4_dequantize_cuda(const unsigned char*, const nf4::AbsmaxSource&, long long, long long, void*, DType,
                         std::uintptr_t, long long, long long) {
  not_built();
}
void gguf_quantize_cuda(const void*, DType, long long, long long, int, unsigned char*, std::uintptr_t) {
  not_built();
}
}  // namespace loraforge
