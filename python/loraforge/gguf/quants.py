"""GGUF tensor packing: float32 matrices to the bytes llama.cpp stores, and back.

`quantize(x, "q4_k")` returns exactly the bytes that llama.cpp's
`ggml_quantize_chunk(GGML_TYPE_Q4_K, x, dst, 0, rows, cols, NULL)` writes (its reference
quantizers, used whenever no importance matrix is given), and `dequantize` returns exactly what
llama.cpp's `to_float` for the type returns. Q4_0, Q8_0 and Q2_K..Q6_K run in loraforge's C++ core
(csrc/cpu/kquant_cpu.cpp, threaded, without the GIL); F32, F16 and BF16 are plain numpy conversions
with ggml's rounding (to nearest even).

Where the input lives decides where it is packed: numpy arrays and CPU tensors on the CPU (result:
numpy), CUDA tensors on their GPU (csrc/cuda/kquant_cuda.cu; result: a CUDA uint8 tensor). Both
run the same per-block code (csrc/include/loraforge/kquant_blocks.h), so the bytes are identical.

This is export-time work, not a training op, so it carries no torch.library op and no autograd;
torch tensors on the CPU are accepted and read without a copy when they are contiguous float32.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from loraforge import _core, _native

__all__ = ["TYPES", "GGUFType", "dequantize", "quantize", "resolve_type", "row_bytes"]


class GGUFType(NamedTuple):
    name: str  # ggml's name, e.g. "Q4_K"
    id: int  # ggml's numeric type id (gguf's GGMLQuantizationType value)
    block_elems: int  # values per block
    block_bytes: int  # bytes per block
    packed: bool  # True when _core packs it (a quantized type), False for F32 / F16 / BF16


def _packed(name: str, type_id: int) -> GGUFType:
    elems, nbytes = _core.gguf_block_info(type_id)
    return GGUFType(name, type_id, elems, nbytes, True)


TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", 0, 1, 4, False),
        GGUFType("F16", 1, 1, 2, False),
        GGUFType("BF16", 30, 1, 2, False),
        _packed("Q4_0", 2),
        _packed("Q8_0", 8),
        _packed("Q2_K", 10),
        _packed("Q3_K", 11),
        _packed("Q4_K", 12),
        _packed("Q5_K", 13),
        _packed("Q6_K", 14),
    )
}
_BY_ID = {t.id: t for t in TYPES.values()}


def resolve_type(qtype) -> GGUFType:
    """The GGUFType for a name ("q4_k", "Q4_K"), a gguf.GGMLQuantizationType, or a ggml type id."""
    if isinstance(qtype, GGUFType):
        return qtype
    if isinstance(qtype, str):
        found = TYPES.get(qtype.strip().upper())
        if found is None:
            raise ValueError(f"qtype {qtype!r} is not a GGUF type loraforge packs; choose one of {sorted(TYPES)}")
        return found
    if isinstance(qtype, (int, np.integer)) and not isinstance(qtype, bool):  # GGMLQuantizationType is an IntEnum
        found = _BY_ID.get(int(qtype))
        if found is None:
            label = getattr(qtype, "name", None) or int(qtype)
            supported = ", ".join(f"{t.name}={t.id}" for t in TYPES.values())
            raise ValueError(f"qtype {label} is not a GGUF type loraforge packs; supported: {supported}")
        return found
    raise TypeError(f"qtype must be a type name, a ggml type id or a gguf.GGMLQuantizationType, got {qtype!r}")


def row_bytes(qtype, cols: int) -> int:
    """Bytes one row of `cols` values takes in `qtype` (cols must be a multiple of the block size)."""
    t = resolve_type(qtype)
    _check_cols(t, cols, "cols")
    return cols // t.block_elems * t.block_bytes


def _check_cols(t: GGUFType, cols: int, what: str) -> None:
    if cols <= 0 or cols % t.block_elems:
        raise ValueError(
            f"{what} has {cols} columns, but {t.name} packs rows in blocks of {t.block_elems} values: "
            f"the column count must be a positive multiple of {t.block_elems}"
        )


def _threads(num_threads: int | None) -> int:
    return max(1, int(num_threads) if num_threads is not None else torch.get_num_threads())


def _as_float32_matrix(x) -> np.ndarray:
    """x as a C-contiguous float32 numpy array [rows, cols]; non-contiguous input is copied."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"x must be on the CPU, got a tensor on {x.device}; move it with x.cpu()")
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32, got {x.dtype}; convert with x.float() (exact for fp16/bf16)")
        x = x.detach().contiguous().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"x must be float32, got {x.dtype}; convert with x.astype(np.float32)")
    else:
        raise TypeError(f"x must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be a matrix [rows, cols], got shape {tuple(x.shape)}; reshape it to (-1, cols)")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row")
    return np.ascontiguousarray(x)


def quantize(x, qtype, num_threads: int | None = None):
    """Pack a matrix into GGUF blocks, byte for byte as llama.cpp does without an imatrix.

    Args:
        x: float32 numpy array or CPU torch tensor [rows, cols], packed on the CPU; or a CUDA
            torch tensor (float32, float16 or bfloat16: the 16-bit types widen to float32 exactly,
            inside the kernel), packed on its GPU. Non-contiguous input is copied first. For the
            quantized types cols must be a multiple of the block size (32 for Q4_0 and Q8_0, 256 for
            the K types) and every value finite.
        qtype: "Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16" or "F32" (any
            case), a gguf.GGMLQuantizationType, or its ggml type id.
        num_threads: CPU threads; defaults to torch.get_num_threads(). Ignored for CUDA input.

    Returns:
        uint8 [rows, cols // block_elems * block_bytes], each row's blocks back to back: a numpy array
        for CPU input; for CUDA input a uint8 tensor on x's device, written on its current stream
        (not synchronised: `.cpu().numpy()` waits for it and gives the same bytes the CPU writes).
    """
    t = resolve_type(qtype)
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        return _quantize_cuda(x, t)
    x = _as_float32_matrix(x)
    rows, cols = x.shape
    _check_cols(t, cols, "x")
    if not t.packed:
        return _convert_plain(x, t)
    if not np.isfinite(x).all():
        raise ValueError(f"x holds NaN or infinite values, which {t.name} cannot represent")
    out = np.empty((rows, cols // t.block_elems * t.block_bytes), dtype=np.uint8)
    _core.gguf_quantize_cpu(x.ctypes.data, rows, cols, t.id, out.ctypes.data, _threads(num_threads))
    return out


# Element types the CUDA packer reads (the _core dtype codes are in loraforge._native).
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_cuda_input(x: torch.Tensor, t: GGUFType) -> None:
    """The checks of a tensor to be packed on the GPU that do not need the GPU itself."""
    if x.dtype not in _CUDA_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 to be packed on the GPU, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be a matrix [rows, cols], got shape {tuple(x.shape)}; reshape it to (-1, cols)")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row")
    _check_cols(t, x.shape[1], "x")


def _quantize_cuda(x: torch.Tensor, t: GGUFType) -> torch.Tensor:
    _check_cuda_input(x, t)
    x = x.detach()
    if not t.packed:  # F32 / F16 / BF16: the numpy conversion of the (exactly widened) values
        return torch.from_numpy(_convert_plain(x.float().cpu().numpy(), t)).to(x.device)
    _native.require_cuda_kernels(x.device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x holds NaN or infinite values, which {t.name} cannot represent")
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, cols // t.block_elems * t.block_bytes), dtype=torch.uint8, device=x.device)
    with _native.on_device(x.device):
        _core.gguf_quantize_cuda(
            x.data_ptr(), _native.dtype_code(x.dtype, "x"), rows, cols, t.id,
            out.data_ptr(), _native.stream_handle(x.device),
        )  # fmt: skip
    return out


def dequantize(data, qtype, shape, num_threads: int | None = None) -> np.ndarray:
    """Unpack GGUF blocks to float32, value for value as llama.cpp's dequantization.

    Args:
        data: uint8 numpy array or CPU torch tensor holding rows * row_bytes(qtype, cols) bytes (any
            shape; non-contiguous input is copied), or a bytes-like object.
        qtype: as for `quantize`.
        shape: (rows, cols) of the result.
    """
    t = resolve_type(qtype)
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (rows, cols), got {tuple(shape)}")
    rows, cols = (int(s) for s in shape)
    if rows <= 0:
        raise ValueError(f"shape must have at least one row, got {tuple(shape)}")
    _check_cols(t, cols, "shape")
    raw = _as_bytes(data)
    expected = rows * (cols // t.block_elems) * t.block_bytes
    if raw.size != expected:
        raise ValueError(f"data holds {raw.size} bytes but {rows} rows of {cols} {t.name} values take {expected}")
    if not t.packed:
        return _unconvert_plain(raw, t, rows, cols)
    out = np.empty((rows, cols), dtype=np.float32)
    _core.gguf_dequantize_cpu(raw.ctypes.data, rows, cols, t.id, out.ctypes.data, _threads(num_threads))
    return out


def _as_bytes(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise ValueError(f"data must be on the CPU, got a tensor on {data.device}")
        if data.dtype != torch.uint8:
            raise TypeError(f"data must be uint8, got {data.dtype}")
        data = data.detach().contiguous().numpy()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    elif not isinstance(data, np.ndarray):
        raise TypeError(f"data must be a uint8 numpy array, torch tensor or bytes, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise TypeError(f"data must be uint8, got {data.dtype}")
    return np.ascontiguousarray(data).reshape(-1)


# ---- F32 / F16 / BF16: one value per "block" ----------------------------------------------------


def _convert_plain(x: np.ndarray, t: GGUFType) -> np.ndarray:
    if t.name == "F32":
        values = x.copy()
    elif t.name == "F16":
        with np.errstate(over="ignore"):  # overflow to inf is the intended result, as in ggml
            values = x.astype(np.float16).view(np.uint16)  # round to nearest even
        nan = np.isnan(x)
        if nan.any():  # ggml writes every NaN as the quiet NaN 0x7e00 with the input's sign
            sign = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
            values = np.where(nan, sign | np.uint16(0x7E00), values)
    else:  # BF16, as ggml_fp32_to_bf16: round to nearest even; NaN kept quiet (top mantissa bit set)
        bits = x.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> np.uint32(16)
        nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        values = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
    return values.view(np.uint8).reshape(x.shape[0], -1)


def _unconvert_plain(raw: np.ndarray, t: GGUFType, rows: int, cols: int) -> np.ndarray:
    if t.name == "F32":
        return raw.view(np.float32).reshape(rows, cols).copy()
    if t.name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(rows, cols)
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(rows, cols)
