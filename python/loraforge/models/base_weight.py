"""The frozen base weight of a projection, as a dense matrix in the compute dtype.

A projection's base layer is either a plain nn.Linear (16-bit LoRA, full fine-tuning) or a
bitsandbytes Linear4bit (QLoRA); `has_dense_weight` tells those apart from layers whose weight is
not W (bitsandbytes' 8-bit Linear8bitLt), which keep their own forward. For the fused LoRA functions we need W [out, in] in the compute
dtype for one matmul and then drop it: NF4 weights are dequantized by loraforge's kernel (bit for
bit what bitsandbytes would give) each time they are used, never stored dense.

Host time: these run ~2,000 times a training step of an 8B model, whose step is bound by the host.
bitsandbytes' Params4bit defines __torch_function__, so every tensor property read on it (.data,
.requires_grad, .is_cuda, .data_ptr()) runs that Python function: ~3.5 us a read against ~0.2 us on a
plain tensor. The packed codes are therefore read once per call as a plain tensor (`packed_codes`),
and `layer.weight` from the layer's parameter dict (nn.Module.__getattr__ costs ~1 us a read).
"""

from __future__ import annotations

import torch

from loraforge import nf4


def layer_weight(layer: torch.nn.Module):
    """`layer.weight` (None when it has none), from the parameter dict where it is registered there (a
    weight that is not, such as torch.nn.utils.parametrize's property, through getattr)."""
    weight = layer._parameters.get("weight")
    return weight if weight is not None else getattr(layer, "weight", None)


def packed_codes(weight: torch.Tensor) -> torch.Tensor:
    """`weight.data` as a plain tensor, read without the weight's own __torch_function__ (Params4bit's)."""
    with torch._C.DisableTorchFunctionSubclass():
        return weight.data


def _quant_state(layer: torch.nn.Module, weight=None):
    """The layer's NF4 QuantState: on its Params4bit weight, or on the layer itself when FSDP2 has
    re-assembled the weight as a plain parameter (the packed bytes, without the Params4bit wrapper).
    `weight`: layer_weight(layer) when the caller has it already."""
    if weight is None:
        weight = layer_weight(layer)
    state = getattr(weight, "quant_state", None)
    if state is None and type(layer).__name__ == "Linear4bit":
        state = getattr(layer, "quant_state", None)
    return state


def is_linear4bit(layer: torch.nn.Module) -> bool:
    return _quant_state(layer) is not None


# Layers whose `weight` is not W: bitsandbytes' LLM.int8() layer keeps int8 codes and row scales
# (Int8Params.CB / SCB) and its forward is an int8 matmul with outlier handling, so a cast of its
# weight to float would be silently wrong.
_NOT_DENSE_CLASSES = ("Linear8bitLt", "Int8Params")


def has_dense_weight(layer: torch.nn.Module) -> bool:
    """Whether `dense_weight` gives this layer's W exactly: an NF4 Linear4bit, or a Linear with a plain
    floating-point weight. Anything else (8-bit Linear8bitLt, FP4, other quantizers' layers) must run
    its own forward."""
    state = _quant_state(layer)
    if state is not None:
        return getattr(state, "quant_type", None) == "nf4"
    weight = getattr(layer, "weight", None)
    if not isinstance(layer, torch.nn.Linear) or not isinstance(weight, torch.Tensor):
        return False
    classes = {c.__name__ for c in (*type(layer).__mro__, *type(weight).__mro__)}
    return weight.is_floating_point() and not classes & {*_NOT_DENSE_CLASSES, "Linear4bit", "Params4bit"}


class _CudaDequantCall:
    """The validated arguments of one NF4 weight's CUDA dequantization, so that the per-step calls
    (each projection, forward, recompute and backward: 672 per step of an 8B model) go straight to
    `_core` without the op's Python checks and dispatch (~30 us each on the H100 host, and the
    training step is bound by the host). Valid while the packed weight and its statistics are the
    same tensors at the same addresses; checked on every call (`matches`)."""

    __slots__ = ("key", "pointers", "n", "blocksize", "shape", "device", "launch", "stream_handle", "dtype_codes")

    def __init__(self, packed: torch.Tensor, state):
        from loraforge import _core, _native  # bound here, not imported per call (~1 us each time)
        from loraforge.ops import nf4 as nf4_ops

        state2 = state.state2
        packed_bytes = nf4.packed_as_bytes(packed)
        args = (packed_bytes, state.absmax, state2.code, state2.absmax, state.offset.reshape(1))
        shape = tuple(state.shape)
        self.n = nf4_ops._check_nested_args(*args, state.blocksize, state2.blocksize, shape, torch.bfloat16)
        self.key = self._key(packed, state)
        self.pointers = (packed_bytes.data_ptr(), *nf4_ops._nested_pointers(*args[1:], state2.blocksize))
        self.blocksize, self.shape, self.device = state.blocksize, shape, packed.device
        self.launch, self.stream_handle = _core.nf4_dequantize_nested_cuda, _native.stream_handle
        self.dtype_codes = _native.DTYPE_CODES

    @staticmethod
    def _key(packed: torch.Tensor, state) -> tuple:
        s2 = state.state2
        return (packed.data_ptr(), state.absmax.data_ptr(), s2.absmax.data_ptr(), s2.code.data_ptr(),
                state.offset.data_ptr(), state.blocksize, s2.blocksize, tuple(state.shape))  # fmt: skip

    def matches(self, packed: torch.Tensor, state) -> bool:
        return self._key(packed, state) == self.key

    def __call__(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """W into `out` (contiguous, or a [rows, cols] view whose rows lie a stride apart: see
        dequantize_into) or a new tensor."""
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        cols = stride = 0
        if not out.is_contiguous():
            cols, stride = out.shape[1], out.stride(0)
        self.launch(*self.pointers, self.n, self.blocksize, out.data_ptr(), self.dtype_codes[dtype],
                    self.stream_handle(self.device), cols, stride)  # fmt: skip
        return out


_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fast_cuda_dequant(layer: torch.nn.Module, packed: torch.Tensor, state, dtype: torch.dtype, out=None):
    """W through the cached direct call, or None where it does not apply (CPU, not double-quantized,
    another current device, torch.compile tracing, a bitsandbytes CPU layout). packed: the plain tensor
    of the codes (packed_codes)."""
    if not packed.is_cuda or not state.nested or dtype not in _FAST_DTYPES or torch.compiler.is_compiling():
        return None
    if packed.get_device() != torch.cuda.current_device() or getattr(state, "quant_type", None) != "nf4":
        return None
    call = layer.__dict__.get("_loraforge_dequant")
    if call is None or not call.matches(packed, state):
        from loraforge import _native

        _native.require_cuda_kernels(packed.device)
        if not packed.is_contiguous():
            return None
        try:
            call = _CudaDequantCall(packed, state)
        except (TypeError, ValueError):  # statistics in a layout the kernel does not take: the op path says why
            return None
        layer.__dict__["_loraforge_dequant"] = call
    return call(dtype, out)


def dense_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W of `layer` as a [out, in] tensor of `dtype` (the weight itself for an nn.Linear of that dtype)."""
    weight = layer_weight(layer)
    state = _quant_state(layer, weight)
    if state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)  # (Tensor.to costs ~1 us even as a no-op)
    _ensure_streamed(layer)
    packed = packed_codes(weight)
    fast = _fast_cuda_dequant(layer, packed, state, dtype)
    if fast is not None:
        return fast
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks weights for its AVX-512 CPU inference path; its own
        # dequantization knows that layout, ours does not.
        import bitsandbytes.functional as F

        return F.dequantize_4bit(packed, state).to(dtype)
    return nf4.dequantize(packed, state, out_dtype=dtype)


def dequantize_into(layer: torch.nn.Module, out: torch.Tensor) -> None:
    """Write W of an NF4 `layer` into `out` (the compute dtype, W's number of elements: contiguous, or
    a [out_features, in_features] column slice of a wider buffer, rows a stride apart): straight from
    the kernel on CUDA, through a temporary elsewhere."""
    weight = layer_weight(layer)
    state = _quant_state(layer, weight)
    _ensure_streamed(layer)
    if _kernel_writes(out) and _fast_cuda_dequant(layer, packed_codes(weight), state, out.dtype, out) is not None:
        return
    out.copy_(dense_weight(layer, out.dtype).view(out.shape))


def _ensure_streamed(layer: torch.nn.Module) -> None:
    """A weight streamed from host memory (models/weight_streaming.py) is read only after its layer's
    bytes are in its slot, in stream order."""
    ensure = layer.__dict__.get("_loraforge_stream")
    if ensure is not None:
        if torch.compiler.is_compiling():  # run at every call, between the compiled graphs, not traced once
            _ensure_outside_graph(ensure)
        else:
            ensure()


@torch.compiler.disable
def _ensure_outside_graph(ensure) -> None:
    ensure()


def _kernel_writes(out: torch.Tensor) -> bool:
    """Whether the CUDA kernel writes `out` in place: contiguous, or rows of 16-byte chunks a 16-byte
    multiple apart from a 16-byte aligned start."""
    if out.is_contiguous():
        return True
    if out.dim() != 2 or out.stride(1) != 1:
        return False
    chunk = 16 // out.element_size()
    return out.shape[1] % chunk == 0 and out.stride(0) % chunk == 0 and out.data_ptr() % 16 == 0


def base_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None)
