"""The frozen base weight of a projection, as a dense matrix in the compute dtype.

A projection's base layer is either a plain nn.Linear (16-bit LoRA, full fine-tuning) or a
bitsandbytes Linear4bit (QLoRA). For the fused LoRA functions we need W [out, in] in the compute
dtype for one matmul and then drop it: NF4 weights are dequantized by loraforge's kernel (bit for
bit what bitsandbytes would give) each time they are used, never stored dense.
"""

from __future__ import annotations

import torch

from loraforge import nf4


def _quant_state(layer: torch.nn.Module):
    """The layer's NF4 QuantState: on its Params4bit weight, or on the layer itself when FSDP2 has
    re-assembled the weight as a plain parameter (the packed bytes, without the Params4bit wrapper)."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None and type(layer).__name__ == "Linear4bit":
        state = getattr(layer, "quant_state", None)
    return state


def is_linear4bit(layer: torch.nn.Module) -> bool:
    return _quant_state(layer) is not None


def dense_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W of `layer` as a [out, in] tensor of `dtype` (a view for nn.Linear of that dtype)."""
    state = _quant_state(layer)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks weights for its AVX-512 CPU inference path; its own
            # dequantization knows that layout, ours does not.
            import bitsandbytes.functional as F

            return F.dequantize_4bit(layer.weight.data, state).to(dtype)
        return nf4.dequantize(layer.weight.data, state, out_dtype=dtype)
    return layer.weight.to(dtype)


def base_bias(layer: torch.nn.Module) -> torch.Tensor | None:
    return getattr(layer, "bias", None)
