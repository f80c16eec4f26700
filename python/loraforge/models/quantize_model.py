"""Turn a 16-bit model's Linear layers into bitsandbytes Linear4bit, quantized by our NF4 kernel.

The result is what bitsandbytes itself would make (the same Params4bit bytes and QuantState), so
the model saves and loads wherever bitsandbytes does; we just do it on CPU or GPU with our kernel.
"""

from __future__ import annotations

import torch

from loraforge import nf4


def quantize_linears(model: torch.nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",),
                     blocksize: int = 64, compress_statistics: bool = True) -> int:  # fmt: skip
    """Replace every nn.Linear (except names in `skip`) by an NF4 Linear4bit; returns how many."""
    import bitsandbytes as bnb

    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name in skip:
                continue
            packed, state = nf4.quantize(child.weight.data, blocksize=blocksize, compress_statistics=compress_statistics)
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                             compress_statistics=compress_statistics, quant_type="nf4",
                                             quant_storage=torch.uint8, bnb_quantized=True, module=layer)  # fmt: skip
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            layer.quant_state = state
            setattr(parent, name, layer)
            replaced += 1
    return replaced
