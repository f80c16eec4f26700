"""use_gradient_checkpointing="unsloth": checkpoint every decoder layer, and keep the one tensor
each layer saves (its input) in pinned CPU memory rather than on the GPU until backward.

Built from PyTorch's own pieces: non-reentrant `torch.utils.checkpoint` saves only the layer's
inputs and recomputes the layer in backward; `torch.autograd.graph.save_on_cpu(pin_memory=True)`
moves whatever is saved inside it to pinned host memory with non-blocking copies and brings it
back when backward needs it. Together a layer's GPU footprint between forward and backward is
nothing, at the cost of one host round trip of [batch, seq, hidden] per layer, which the copy
engines run while the GPU computes. On a CPU model there is nothing to offload and this is plain
checkpointing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


def offloaded_checkpoint(function, *args, **kwargs):
    """A drop-in for transformers' `_gradient_checkpointing_func`."""
    kwargs.setdefault("use_reentrant", False)
    on_gpu = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if on_gpu else contextlib.nullcontext()
    with offload:
        return checkpoint(function, *args, **kwargs)


def enable_gradient_checkpointing(model: torch.nn.Module, mode) -> None:
    """mode: True (ordinary, in-GPU checkpointing), "unsloth" (offloaded), False/None (off)."""
    if not mode:
        return
    if mode not in (True, "unsloth"):
        raise ValueError(f'use_gradient_checkpointing must be True, False or "unsloth", got {mode!r}')
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if mode == "unsloth":
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint
