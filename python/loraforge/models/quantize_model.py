"""Turn a 16-bit model's Linear layers into bitsandbytes Linear4bit, quantized by our NF4 kernel.

The result is what bitsandbytes itself would make (the same Params4bit bytes and QuantState), so
the model saves and loads wherever bitsandbytes does; we just do it on CPU or GPU with our kernel.
"""

from __future__ import annotations

import torch

from loraforge import nf4


def quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",),
                     blocksize: int = 64, compress_statistics: bool = True,
                     device: torch.device | str | None = None,
                     packed_device: torch.device | str | None = None) -> int:  # fmt: skip
    """Replace every nn.Linear (except names in `skip`) by an NF4 Linear4bit; returns how many.

    With `device`, each weight is moved there one at a time and quantized there, so a model held in
    host memory reaches the GPU already in 4 bits: GPU memory never holds more than the quantized
    model plus one 16-bit weight (an 8B model would otherwise need 16 GB on the GPU to load).
    With `packed_device` ("cpu": for stream_base_weights) the packed codes are moved there once
    quantized (their statistics stay on `device`), so the GPU holds one weight at a time."""
    import bitsandbytes as bnb

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name in skip:
                continue
            weight = child.weight.data if device is None else child.weight.data.to(device)
            packed, state = nf4.quantize(weight, blocksize=blocksize, compress_statistics=compress_statistics)
            del weight
            if packed_device is not None:
                packed = packed.to(packed_device)
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                             compress_statistics=compress_statistics, quant_type="nf4",
                                             quant_storage=torch.uint8, bnb_quantized=True, module=layer)  # fmt: skip
            if child.bias is not None:
                bias = child.bias.data.to(compute_dtype)
                layer.bias = torch.nn.Parameter(bias if device is None else bias.to(device), requires_grad=False)
            layer.quant_state = state
            setattr(parent, name, layer)
            child.weight = None  # free the 16-bit weight now, not when the loop ends
            replaced += 1
    return replaced
