"""The compiled core, `loraforge._core`, and what it was built with.

Everything that hands a tensor to `_core` goes through `loraforge.ops`; this module only loads the
extension and answers whether its CUDA kernels can serve a given device.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from loraforge import _core

REBUILD_HINT = (
    "Rebuild loraforge on a machine with the CUDA toolkit (nvcc on PATH): "
    "pip install --no-build-isolation --force-reinstall -C cmake.define.LORAFORGE_CUDA=ON ."
)


def cuda_kernels_built() -> bool:
    """True when this `_core` was compiled with its CUDA kernels."""
    return bool(_core.cuda_built())


def cuda_architectures() -> list[str]:
    """The CUDA architectures `_core` holds code for, e.g. ['80-real', '90'] ('90' carries PTX too)."""
    return [arch for arch in _core.cuda_architectures().split(",") if arch] if cuda_kernels_built() else []


def _runs_on(capability: tuple[int, int], archs: list[str]) -> bool:
    sm = capability[0] * 10 + capability[1]
    for arch in archs:
        number, _, kind = arch.partition("-")
        digits = int("".join(ch for ch in number if ch.isdigit()) or 0)
        if digits == sm:
            return True
        if kind != "real" and digits <= sm:  # PTX that the driver compiles for a newer GPU
            return True
    return False


def require_cuda_kernels(device: torch.device) -> None:
    """Raise a clear error when `_core` cannot run on `device` (a CUDA device)."""
    _require_cuda_kernels(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # the answer for a device never changes within a process
def _require_cuda_kernels(index: int) -> None:
    device = torch.device("cuda", index)
    if not cuda_kernels_built():
        raise RuntimeError(f"loraforge._core was built without CUDA kernels, so it cannot run on {device}. {REBUILD_HINT}")
    capability = torch.cuda.get_device_capability(device)
    archs = cuda_architectures()
    if not _runs_on(capability, archs):
        raise RuntimeError(
            f"loraforge._core holds CUDA code for {archs}, not for this GPU (sm_{capability[0]}{capability[1]}). "
            f"Rebuild with -C cmake.define.LORAFORGE_CUDA_ARCHITECTURES={capability[0]}{capability[1]}. {REBUILD_HINT}"
        )


def on_device(device: torch.device):
    """Make `device` the current CUDA device for a launch (a no-op when it already is)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of `device`, as the integer `_core` takes. Read raw (what Triton's
    launcher does): torch.cuda.current_stream builds a Stream object, ~10 us of host time a call,
    ~800 calls a training step of an 8B model."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)

_STREAM_OBJECTS: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device index, raw handle) -> Stream


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """torch.cuda.current_stream(device), without building a new Stream object at each call (~10 us of
    host time, three times a layer a step): the current stream's raw handle is read (~0.3 us) and the
    Stream object made for it the first time is reused. A Stream object holds no resource: it names a
    stream by its handle, so one made earlier for the same handle is the same stream."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, stream_handle(device))
    stream = _STREAM_OBJECTS.get(key)
    if stream is None:
        stream = _STREAM_OBJECTS[key] = torch.cuda.current_stream(index)
    return stream


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype, name: str) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}") from None
