"""NF4 quantization ops, bit-exact with bitsandbytes.

    loraforge::nf4_quantize(x, blocksize) -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])
    loraforge::nf4_dequantize(packed, absmax, blocksize, shape, dtype) -> Tensor[shape] of dtype
    loraforge::nf4_dequantize_nested(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2,
                                     shape, dtype) -> Tensor[shape] of dtype

The rounding rules (which bitsandbytes' own reference kernel follows) are written out in
csrc/include/loraforge/nf4.h; `*_reference` below is the same rule in plain torch, and is the
definition the compiled kernels are tested against. The ops move integer codes, so they carry no
autograd: a frozen base weight needs no gradient.
"""

from __future__ import annotations

import math

import torch

from loraforge import _core, _native
from loraforge.ops._library import define_op

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
MIN_ABSMAX = 1e-38  # bitsandbytes clamps the absmax to this before dividing by it

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_levels(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCKSIZES}, got {blocksize}")


def _check_packed(packed: torch.Tensor, n: int) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (view other storage types as uint8 first), got {packed.dtype}")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed holds {packed.numel()} bytes but a shape of {n} elements needs {(n + 1) // 2}")


def _check_vector(t: torch.Tensor, name: str, dtype: torch.dtype, count: int, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but packed is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() != count:
        raise ValueError(f"{name} holds {t.numel()} values, expected {count}")


def _check_dequantize_args(packed, absmax, blocksize, shape, dtype) -> int:
    check_blocksize(blocksize)
    _native.dtype_code(dtype, "dtype")
    n = math.prod(shape)
    if n <= 0:
        raise ValueError(f"shape must hold at least one element, got {list(shape)}")
    _check_packed(packed, n)
    _check_vector(absmax, "absmax", absmax.dtype, -(-n // blocksize), packed.device)
    return n


def _check_nested_args(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype) -> int:
    n = _check_dequantize_args(packed, qabsmax, blocksize, shape, dtype)
    blocks = -(-n // blocksize)
    if blocksize2 <= 0:
        raise ValueError(f"blocksize2 must be positive, got {blocksize2}")
    _check_vector(qabsmax, "qabsmax", torch.uint8, blocks, packed.device)
    _check_vector(code2, "code2", torch.float32, 256, packed.device)
    _check_vector(absmax2, "absmax2", torch.float32, -(-blocks // blocksize2), packed.device)
    _check_vector(offset.reshape(-1), "offset", torch.float32, 1, packed.device)
    return n


def _cpu_threads() -> int:
    return max(1, torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# Reference: the rules of nf4.h in plain torch.


def nf4_quantize_reference(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1).float()
    n = flat.numel()
    full_blocks, tail = divmod(n, blocksize)
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = flat
    block_max = padded.view(blocks, blocksize).abs().amax(dim=1)
    clamped = block_max.clamp(min=MIN_ABSMAX)

    scaled = torch.empty(n, dtype=torch.float32, device=x.device)
    head = full_blocks * blocksize
    # Full blocks multiply by a reciprocal; the last, partial block divides (as bitsandbytes does).
    scaled[:head] = (flat[:head].view(full_blocks, blocksize) * (1.0 / clamped[:full_blocks]).unsqueeze(1)).view(-1)
    absmax = block_max.clone()
    if tail:
        scaled[head:] = flat[head:] / clamped[full_blocks]
        absmax[full_blocks] = clamped[full_blocks]
    scaled = scaled.clamp(-1.0, 1.0)

    levels = nf4_levels(x.device)
    midpoints = (levels[:-1] + levels[1:]) / 2
    index = torch.bucketize(scaled, midpoints, right=False).to(torch.uint8)  # count of midpoints < v
    if n % 2:
        index = torch.cat([index, index.new_full((1,), 7)])  # pad with the level 0.0
    packed = (index[0::2] << 4) | index[1::2]
    return packed, absmax


def _dequantize_with_absmax(packed, absmax, blocksize, shape, dtype):
    n = math.prod(shape)
    index = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    values = nf4_levels(packed.device)[index]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype):
    return _dequantize_with_absmax(packed, absmax, blocksize, shape, dtype)


def decode_nested_absmax_reference(qabsmax, code2, absmax2, offset, blocksize2):
    scale2 = absmax2.repeat_interleave(blocksize2)[: qabsmax.numel()]
    return code2[qabsmax.long()] * scale2 + offset.reshape(())  # two roundings, as bitsandbytes


def nf4_dequantize_nested_reference(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    absmax = decode_nested_absmax_reference(qabsmax, code2, absmax2, offset, blocksize2)
    return _dequantize_with_absmax(packed, absmax, blocksize, shape, dtype)


# ---------------------------------------------------------------------------------------------
# Kernels behind the ops: _core on cpu and cuda; the reference above serves every other device.


def _check_quantize_args(x: torch.Tensor, blocksize: int) -> None:
    check_blocksize(blocksize)
    _native.dtype_code(x.dtype, "x")
    if x.numel() == 0:
        raise ValueError("x must hold at least one element")


def _empty_quantize_outputs(x: torch.Tensor, blocksize: int):
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    return packed, absmax


def _quantize_reference(x, blocksize):
    _check_quantize_args(x, blocksize)
    return nf4_quantize_reference(x, blocksize)


def _quantize_cpu(x, blocksize):
    _check_quantize_args(x, blocksize)
    x = x.contiguous()
    packed, absmax = _empty_quantize_outputs(x, blocksize)
    _core.nf4_quantize_cpu(
        x.data_ptr(), _native.dtype_code(x.dtype, "x"), x.numel(), blocksize,
        packed.data_ptr(), absmax.data_ptr(), _cpu_threads(),
    )  # fmt: skip
    return packed, absmax


def _quantize_cuda(x, blocksize):
    _check_quantize_args(x, blocksize)
    _native.require_cuda_kernels(x.device)
    x = x.contiguous()
    packed, absmax = _empty_quantize_outputs(x, blocksize)
    with _native.on_device(x.device):
        _core.nf4_quantize_cuda(
            x.data_ptr(), _native.dtype_code(x.dtype, "x"), x.numel(), blocksize,
            packed.data_ptr(), absmax.data_ptr(), _native.stream_handle(x.device),
        )  # fmt: skip
    return packed, absmax


nf4_quantize = define_op(
    "nf4_quantize(Tensor x, int blocksize) -> (Tensor packed, Tensor absmax)",
    reference=_quantize_reference,
    cpu=_quantize_cpu,
    cuda=_quantize_cuda,
    fake=_empty_quantize_outputs,
)


def _check_absmax_fp32(absmax: torch.Tensor) -> None:
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32, got {absmax.dtype}")


def _dequantize_reference(packed, absmax, blocksize, shape, dtype):
    _check_dequantize_args(packed, absmax, blocksize, shape, dtype)
    return nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype)


def _dequantize_cpu(packed, absmax, blocksize, shape, dtype):
    n = _check_dequantize_args(packed, absmax, blocksize, shape, dtype)
    _check_absmax_fp32(absmax)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    _core.nf4_dequantize_cpu(
        packed.data_ptr(), absmax.data_ptr(), n, blocksize, out.data_ptr(),
        _native.dtype_code(dtype, "dtype"), _cpu_threads(),
    )  # fmt: skip
    return out


def _dequantize_cuda(packed, absmax, blocksize, shape, dtype):
    n = _check_dequantize_args(packed, absmax, blocksize, shape, dtype)
    _check_absmax_fp32(absmax)
    _native.require_cuda_kernels(packed.device)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    with _native.on_device(packed.device):
        _core.nf4_dequantize_cuda(
            packed.data_ptr(), absmax.data_ptr(), n, blocksize, out.data_ptr(),
            _native.dtype_code(dtype, "dtype"), _native.stream_handle(packed.device),
        )  # fmt: skip
    return out


def _dequantize_fake(packed, absmax, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


nf4_dequantize = define_op(
    "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor",
    reference=_dequantize_reference,
    cpu=_dequantize_cpu,
    cuda=_dequantize_cuda,
    fake=_dequantize_fake,
)


def _nested_pointers(qabsmax, code2, absmax2, offset, blocksize2):
    return (qabsmax.data_ptr(), code2.data_ptr(), absmax2.data_ptr(), offset.data_ptr(), absmax2.numel(), blocksize2)


def _nested_reference(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    _check_nested_args(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype)
    return nf4_dequantize_nested_reference(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype)


def _nested_cpu(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    n = _check_nested_args(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    _core.nf4_dequantize_nested_cpu(
        packed.data_ptr(), *_nested_pointers(qabsmax, code2, absmax2, offset, blocksize2),
        n, blocksize, out.data_ptr(), _native.dtype_code(dtype, "dtype"), _cpu_threads(),
    )  # fmt: skip
    return out


def _nested_cuda(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    n = _check_nested_args(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype)
    _native.require_cuda_kernels(packed.device)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    with _native.on_device(packed.device):
        _core.nf4_dequantize_nested_cuda(
            packed.data_ptr(), *_nested_pointers(qabsmax, code2, absmax2, offset, blocksize2),
            n, blocksize, out.data_ptr(), _native.dtype_code(dtype, "dtype"), _native.stream_handle(packed.device),
        )  # fmt: skip
    return out


def _nested_fake(packed, qabsmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


nf4_dequantize_nested = define_op(
    "nf4_dequantize_nested(Tensor packed, Tensor qabsmax, Tensor code2, Tensor absmax2, Tensor offset, "
    "int blocksize, int blocksize2, SymInt[] shape, ScalarType dtype) -> Tensor",
    reference=_nested_reference,
    cpu=_nested_cpu,
    cuda=_nested_cuda,
    fake=_nested_fake,
)
