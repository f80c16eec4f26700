"""NF4 4-bit quantization in bitsandbytes' format, with loraforge's kernels.

`quantize` returns exactly what `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")`
returns (the same packed bytes and a `QuantState` with the same absmax, nested absmax, code and
offset), and `dequantize` returns exactly what `dequantize_4bit` returns, bit for bit; both run
our C++ (CPU) and CUDA kernels. Weights therefore stay bitsandbytes `Params4bit` and load anywhere
bitsandbytes does.

"Exactly" is per device, as bitsandbytes itself is: on CPU it quantizes with its torch kernel (IEEE
arithmetic, the rules in csrc/include/loraforge/nf4.h), on CUDA with a kernel built with fast math (an
approximate reciprocal, flush-to-zero). The two give different codes for rare elements (where the
reciprocal is an ulp apart and x / absmax falls on the other side of a midpoint) and for all-zero
blocks, and our CPU and CUDA kernels follow their own device's bitsandbytes.

With double quantization (`compress_statistics=True`) the fp32 absmax is itself quantized to 8
bits in blocks of 256 by bitsandbytes' own `quantize_blockwise`: that part is 1/64 of the work,
and leaving it to bitsandbytes keeps it exact on every device and bitsandbytes version (whose CPU
and CUDA 8-bit rounding differ). Dequantization decodes the nested absmax in our kernels, in the
same pass as the weights.
"""

from __future__ import annotations

import torch

from loraforge.ops import nf4 as _ops

__all__ = ["quantize", "dequantize", "checkpoint_entries", "transformers_config", "NESTED_BLOCKSIZE"]

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double-quantized absmax


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as error:  # a dependency, but say what to do if it is missing
        raise ImportError("loraforge.nf4 needs bitsandbytes: pip install bitsandbytes") from error
    return bitsandbytes


def _is_params4bit(obj) -> bool:
    return type(obj).__name__ == "Params4bit" and hasattr(obj, "quant_state")


def _is_linear4bit(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and _is_params4bit(getattr(obj, "weight", None))


def quantize(
    weight,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
):
    """Quantize a float tensor to NF4, as bitsandbytes does.

    Args:
        weight: a float32 / float16 / bfloat16 tensor of any shape, on CPU or CUDA; or a
            bitsandbytes `Params4bit` / `Linear4bit` not yet quantized, whose own blocksize,
            compress_statistics and quant_storage are then used.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        compress_statistics: double quantization (the absmax stored as 8 bits + a nested state).
        quant_storage: the dtype the packed bytes are viewed as (uint8, or e.g. bfloat16 for FSDP).

    Returns:
        (packed, quant_state): packed of shape [(n+1)//2 // itemsize, 1] and a bitsandbytes QuantState.
    """
    if _is_linear4bit(weight):
        weight = weight.weight
    if _is_params4bit(weight):
        if weight.bnb_quantized:
            raise ValueError("weight is a Params4bit that is already quantized; use loraforge.nf4.dequantize on it")
        if weight.quant_type != "nf4":
            raise NotImplementedError(f"only quant_type='nf4' is supported, this Params4bit has {weight.quant_type!r}")
        blocksize, compress_statistics, quant_storage = weight.blocksize, weight.compress_statistics, weight.quant_storage
        weight = weight.data
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, Params4bit or Linear4bit, got {type(weight).__name__}")
    _ops.check_blocksize(blocksize)
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device.type not in ("cpu", "cuda"):
        raise ValueError(f"weight must be on cpu or cuda, got {weight.device}")
    if weight.numel() == 0:
        raise ValueError("weight must hold at least one element")
    if not isinstance(quant_storage, torch.dtype) or quant_storage.is_complex:
        raise TypeError(f"quant_storage must be a real torch dtype, got {quant_storage!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds NaN or infinite values; NF4 cannot represent them")

    bnb = _bnb()
    packed, absmax = torch.ops.loraforge.nf4_quantize(weight.detach(), blocksize)
    packed = _view_storage(packed, quant_storage)
    code = bnb.functional.get_4bit_type("nf4", device=weight.device)
    QuantState = bnb.functional.QuantState
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(
            absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
            quant_type="nf4", offset=offset, state2=state2,
        )  # fmt: skip
    else:
        state = QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type="nf4"
        )
    return packed, state


def _view_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    if quant_storage == torch.uint8:
        return packed.unsqueeze(1)
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed byte count ({packed.numel()}) to be a multiple of {itemsize}"
        )
    return packed.view(quant_storage).unsqueeze(1)


def dequantize(packed, quant_state=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize NF4 weights, bit for bit as `bitsandbytes.functional.dequantize_4bit`.

    Args:
        packed: the packed tensor (any quant_storage dtype), or a quantized `Params4bit` /
            `Linear4bit`, in which case its own quant_state is used.
        quant_state: the bitsandbytes QuantState; with a Params4bit / Linear4bit it may be omitted.
        out_dtype: the output dtype; defaults to quant_state.dtype.
    """
    if _is_linear4bit(packed):
        packed = packed.weight
    if _is_params4bit(packed):
        if quant_state is None:
            quant_state = packed.quant_state
        if quant_state is None:
            raise ValueError("packed is a Params4bit that has not been quantized yet (no quant_state)")
        packed = packed.data
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, Params4bit or Linear4bit, got {type(packed).__name__}")
    if quant_state is None:
        raise ValueError("quant_state is required when packed is a plain tensor")
    if getattr(quant_state, "quant_type", None) != "nf4":
        raise NotImplementedError(f"only NF4 is supported, quant_state.quant_type is {quant_state.quant_type!r}")
    _ops.check_blocksize(quant_state.blocksize, "quant_state.blocksize")
    dtype = out_dtype if out_dtype is not None else quant_state.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    packed_bytes = packed_as_bytes(packed)
    shape = tuple(quant_state.shape)
    _same_device(packed, quant_state.absmax, "quant_state.absmax")
    if quant_state.nested:
        state2 = quant_state.state2
        for name, t in (("quant_state.state2.absmax", state2.absmax), ("quant_state.state2.code", state2.code),
                        ("quant_state.offset", quant_state.offset)):  # fmt: skip
            _same_device(packed, t, name)
        return torch.ops.loraforge.nf4_dequantize_nested(
            packed_bytes, quant_state.absmax, state2.code.float(), state2.absmax.float(),
            quant_state.offset.float().reshape(1), quant_state.blocksize, state2.blocksize, shape, dtype,
        )  # fmt: skip
    return torch.ops.loraforge.nf4_dequantize(packed_bytes, quant_state.absmax.float(), quant_state.blocksize, shape, dtype)


def transformers_config(compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for this format (NF4, double quantization, uint8 storage): what a
    checkpoint of such weights declares, and what makes transformers quantize to it while loading."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)  # fmt: skip


def checkpoint_entries(name: str, packed: torch.Tensor, quant_state) -> dict[str, torch.Tensor]:
    """The safetensors entries transformers writes for one 4-bit weight `name`, on the CPU: the packed
    codes under `name`, each tensor of its QuantState under `name.<key>`."""
    entries = {name: packed.cpu()}
    for key, value in quant_state.as_dict(packed=True).items():
        entries[f"{name}.{key}"] = value.cpu().contiguous()
    return entries


def packed_as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed NF4 codes as a flat uint8 view, whatever quant_storage dtype holds them."""
    return packed.view(torch.uint8).reshape(-1) if packed.dtype != torch.uint8 else packed.reshape(-1)


def _same_device(packed: torch.Tensor, t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != packed.device:
        raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
