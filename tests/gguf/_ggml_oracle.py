"""llama.cpp's own quantizers, called through ctypes: the oracle for GGUF block bytes.

`llama-cpp-python` builds llama.cpp from source and ships `libggml-base.so`, which holds
`ggml_quantize_chunk` (what llama.cpp's quantize tool and its converters run) and each type's
`to_float` dequantizer. Everything here is typed: argument and result types are declared, so a
wrong call fails in ctypes rather than corrupting memory.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

import numpy as np


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def find_libggml_base() -> str | None:
    """The libggml-base that llama-cpp-python installed, or None (found without importing llama_cpp)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = next(iter(spec.submodule_search_locations))
    for pattern in ("lib/libggml-base.so", "lib/libggml-base.*.dylib", "lib/libggml-base.dylib", "lib/ggml-base.dll"):
        hits = sorted(glob.glob(os.path.join(package, pattern)))
        if hits:
            return hits[0]
    return None


class GGML:
    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
        ]  # fmt: skip
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool

    def quantize(self, x: np.ndarray, type_id: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        assert not self.lib.ggml_quantize_requires_imatrix(type_id)
        row_size = self.lib.ggml_row_size(type_id, cols)
        out = np.zeros((rows, row_size), dtype=np.uint8)
        written = self.lib.ggml_quantize_chunk(
            type_id, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, 0, rows, cols, None
        )
        assert written == rows * row_size, (written, rows * row_size)
        return out

    def dequantize(self, data: np.ndarray, type_id: int, shape) -> np.ndarray:
        traits = self.lib.ggml_get_type_traits(type_id).contents
        rows, cols = shape
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if not traits.to_float:  # F32 has no converter: its bytes are the values
            assert type_id == 0, type_id
            return data.view(np.float32).reshape(rows, cols).copy()
        out = np.empty((rows, cols), dtype=np.float32)
        to_float = _TO_FLOAT(traits.to_float)
        to_float(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
        return out
