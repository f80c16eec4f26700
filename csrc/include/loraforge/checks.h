// Argument checks on the C++ side of the boundary. The Python layer (loraforge.ops) checks
// tensors first; these re-check sizes and pointers so that a wrong call raises a Python
// exception (pybind11 turns std::invalid_argument into ValueError) and never crashes.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace loraforge {

template <typename... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
  std::ostringstream message;
  message << "loraforge._core: ";
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}

#define LF_CHECK(cond, ...)                     \
  do {                                          \
    if (!(cond)) ::loraforge::fail(__VA_ARGS__); \
  } while (0)

// Element types that cross the boundary, by code. The Python side maps torch dtypes to these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType to_dtype(int code) {
  LF_CHECK(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", code);
  return static_cast<DType>(code);
}

// Pointers cross as integers (tensor.data_ptr()); zero means the caller forgot a tensor.
template <typename T>
inline T* as_ptr(std::uintptr_t address, const char* name) {
  LF_CHECK(address != 0, name, " is a null pointer");
  return reinterpret_cast<T*>(address);
}

}  // namespace loraforge
