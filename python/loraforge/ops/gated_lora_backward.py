"""loraforge::gated_lora_backward_: the gated MLP's activation backward (as gated_activation_backward_h_)
with the three narrow LoRA products that read its outputs folded into the same pass (see
triton_kernels/gated_lora_backward.py for why and how):

    in place:  grad_h <- Hm = act(G) * U,   gate <- dG,   up <- dU
    returns:   (dG^T h_gate [I, r_g], dU^T h_up [I, r_u], grad_hd^T Hm [r_d, I]), fp32

The products use dG, dU and Hm as stored (rounded to their dtype), with fp32 accumulation: what a matmul
of the stored tensors with an fp32 output gives. Used by models/lora_autograd.py's stacked MLP backward.
"""

from __future__ import annotations

import functools

import torch

from loraforge import _native
from loraforge.ops import swiglu as swiglu_ops
from loraforge.ops._library import define_op

MAX_RANK = 128  # the Triton kernel holds a [64, rank] accumulator per product; larger ranks: unfused path


@functools.cache
def _triton():
    try:
        from loraforge.triton_kernels import gated_lora_backward
    except ImportError as error:  # triton is an optional dependency on machines without a GPU
        raise RuntimeError("loraforge's fused gated LoRA backward needs triton: pip install triton") from error
    return gated_lora_backward


def _check_narrow(t, name: str, rows: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[0] != rows or not 0 < t.shape[1] <= MAX_RANK:
        raise ValueError(f"{name} must be [{rows}, r] with 0 < r <= {MAX_RANK}, got shape {list(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} on {like.device} like gate, got {t.dtype} on {t.device}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have a unit last stride, got strides {list(t.stride())}")


def _check(grad_h, gate, up, activation, h_gate, h_up, grad_hd) -> None:
    swiglu_ops._check_backward_args(grad_h, gate, up, activation)
    for name, t in (("grad_h", grad_h), ("gate", gate), ("up", up)):
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D [n, I] with a unit last stride, got shape {list(t.shape)} "
                             f"and strides {list(t.stride())}")  # fmt: skip
    for name, t in (("h_gate", h_gate), ("h_up", h_up), ("grad_hd", grad_hd)):
        _check_narrow(t, name, gate.shape[0], gate)


def _reference(grad_h, gate, up, activation, h_gate, h_up, grad_hd):
    _check(grad_h, gate, up, activation, h_gate, h_up, grad_hd)
    torch.ops.loraforge.gated_activation_backward_h_(grad_h, gate, up, activation)
    products = (gate.t().float() @ h_gate.float(), up.t().float() @ h_up.float(), grad_hd.t().float() @ grad_h.float())
    return products


def _cuda(grad_h, gate, up, activation, h_gate, h_up, grad_hd):
    _check(grad_h, gate, up, activation, h_gate, h_up, grad_hd)
    with _native.on_device(gate.device):
        return _triton().gated_lora_backward(grad_h, gate, up, activation, h_gate, h_up, grad_hd)


def _fake(grad_h, gate, up, activation, h_gate, h_up, grad_hd):
    _check(grad_h, gate, up, activation, h_gate, h_up, grad_hd)
    cols = gate.shape[1]
    f32 = {"dtype": torch.float32, "device": gate.device}
    return (gate.new_empty((cols, h_gate.shape[1]), **f32), gate.new_empty((cols, h_up.shape[1]), **f32),
            gate.new_empty((grad_hd.shape[1], cols), **f32))  # fmt: skip


gated_lora_backward_ = define_op(
    "gated_lora_backward_(Tensor(a!) grad_h, Tensor(b!) gate, Tensor(c!) up, str activation, Tensor h_gate, "
    "Tensor h_up, Tensor grad_hd) -> (Tensor, Tensor, Tensor)",
    reference=_reference,
    cpu=_reference,
    cuda=_cuda,
    fake=_fake,
)
