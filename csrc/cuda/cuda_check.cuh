// CUDA error handling for the kernels: every runtime call and every launch is checked, and a
// failure becomes a Python RuntimeError naming the call, never an abort.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace loraforge {

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("loraforge._core: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace loraforge
