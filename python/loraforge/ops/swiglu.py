"""Gated MLP activations, SwiGLU and GeGLU: h = act(gate) * up, with autograd registered on the op.

    loraforge::gated_activation(gate, up, activation, reuse_inputs_in_backward) -> h
    loraforge::gated_activation_backward(grad_h, gate, up, activation) -> (grad_gate, grad_up)
    loraforge::gated_activation_backward_(grad_h, gate!, up!, activation) -> ()   grads written over gate, up
    loraforge::gated_activation_backward_h_(grad_h!, gate!, up!, activation) -> ()
        the same, and h itself written over grad_h (for a backward that needs h after dh: the MLP's)

activation: "silu" (SwiGLU: Llama, Mistral, Qwen), "gelu" (GeGLU with the exact erf GeLU) or "gelu_tanh"
(GeGLU with the tanh approximation: Gemma's gelu_pytorch_tanh). gate and up: same shape [..., cols], same
float dtype; h has their dtype. The math is fp32 with one rounding per output (plain torch rounds
act(gate) before multiplying).

Backward. h = a(g) u elementwise, so with dh the incoming gradient

    d_up   = dh * a(g)
    d_gate = dh * u * a'(g)
    silu:       a = g s,  s = sigmoid(g),         a' = s + g s (1 - s) = s (1 + g (1 - s)), 1 - s = sigmoid(-g)
    gelu:       a = g Phi(g),                     a' = Phi(g) + g phi(g),  phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh:  a = g (1 + tanh(v)) / 2 = g s(2v),  v = c (g + k g^3),  c = sqrt(2 / pi), k = 0.044715
                a' = s(2v) + g d/dg s(2v) = s(2v) + 2 g s(2v) (1 - s(2v)) c (1 + 3 k g^2)

Memory: the backward needs gate and up and nothing else does (in an MLP, gate_proj and up_proj save their
input x, not their outputs). With reuse_inputs_in_backward=True the backward writes d_gate over gate and
d_up over up (gated_activation_backward_) and returns those tensors as the gradients: the two largest
activation gradients of the MLP cost no new memory, as in Unsloth. Set it only when nothing else
reads gate or up after the forward (no retain_graph, no other consumer); a later reader that autograd
tracks fails loudly ("modified by an inplace operation"), since the op bumps their version counters.
It falls back to new buffers where overwriting cannot work or would surprise: gate or up a leaf (the
caller's own tensor), not contiguous, or sharing storage, or inside torch.compile (whose
functionalization would turn the writes into copies anyway).

Kernels: the reference below on CPU and every other device, Triton (loraforge.triton_kernels.swiglu)
on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from loraforge import _native
from loraforge.ops._library import define_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@functools.cache
def _triton():
    try:
        from loraforge.triton_kernels import swiglu
    except ImportError as error:  # triton is an optional dependency on machines without a GPU
        raise RuntimeError("loraforge's CUDA SwiGLU/GeGLU needs triton: pip install triton") from error
    return swiglu


def _check_float(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_args(gate, up, activation: str) -> None:
    _check_float(gate, "gate")
    _check_float(up, "up")
    if up.dtype != gate.dtype:
        raise TypeError(f"up is {up.dtype} but gate is {gate.dtype}: they must match")
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {list(up.shape)} but gate has {list(gate.shape)}")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_backward_args(grad_h, gate, up, activation: str) -> None:
    _check_args(gate, up, activation)
    _check_float(grad_h, "grad_h")
    if grad_h.shape != gate.shape:
        raise ValueError(f"grad_h has shape {list(grad_h.shape)} but gate has {list(gate.shape)}")
    if grad_h.device != gate.device:
        raise ValueError(f"grad_h is on {grad_h.device} but gate is on {gate.device}")


# ---------------------------------------------------------------------------------------------
# Reference: the definition, in plain torch (fp32 math, one rounding per output).


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_slope_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    # 1 - sigmoid(z) is taken as sigmoid(-z): the difference loses every digit where sigmoid(z) nears 1.
    if activation == "silu":
        return torch.sigmoid(g) * (1 + g * torch.sigmoid(-g))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(g * math.sqrt(0.5))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    c, k = math.sqrt(2 / math.pi), 0.044715
    z = 2 * c * (g + k * g * g * g)
    return torch.sigmoid(z) + 2 * g * torch.sigmoid(z) * torch.sigmoid(-z) * c * (1 + 3 * k * g * g)


def gated_activation_reference(gate, up, activation):
    return (activation_reference(gate.float(), activation) * up.float()).to(gate.dtype)


def gated_activation_backward_reference(grad_h, gate, up, activation):
    g, u, dh = gate.float(), up.float(), grad_h.float()
    grad_gate = dh * u * activation_slope_reference(g, activation)
    grad_up = dh * activation_reference(g, activation)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels behind the ops.


def _rows(t: torch.Tensor, allowed_last_strides=(1,)) -> torch.Tensor:
    """[rows, cols] view (a copy only when needed) with a last stride the kernels accept."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) in allowed_last_strides else rows.contiguous()


def _forward_reference(gate, up, activation, reuse_inputs_in_backward):
    _check_args(gate, up, activation)
    return gated_activation_reference(gate, up, activation).contiguous()  # the layout the fake kernel promises


def _forward_cuda(gate, up, activation, reuse_inputs_in_backward):
    _check_args(gate, up, activation)
    h = gate.new_empty(gate.shape)
    if h.numel() == 0:
        return h
    with _native.on_device(gate.device):
        _triton().swiglu_forward(_rows(gate), _rows(up), activation, h.view(-1, gate.shape[-1]))
    return h


def _forward_fake(gate, up, activation, reuse_inputs_in_backward):
    _check_args(gate, up, activation)
    return gate.new_empty(gate.shape)


def _check_into_args(gate, up, activation: str, out) -> None:
    _check_args(gate, up, activation)
    if not isinstance(out, torch.Tensor) or out.shape != gate.shape or out.dtype != gate.dtype \
            or out.device != gate.device:  # fmt: skip
        raise ValueError(f"out must be a {gate.dtype} tensor on {gate.device} of gate's shape {list(gate.shape)}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}")  # fmt: skip
    if not _rows_in_place(out):
        raise ValueError(f"out must be contiguous or a 2-D view of rows with a unit last stride, got strides "
                         f"{list(out.stride())}")  # fmt: skip


def _into_reference(gate, up, activation, out):
    _check_into_args(gate, up, activation, out)
    out.copy_(gated_activation_reference(gate, up, activation))


def _into_cuda(gate, up, activation, out):
    _check_into_args(gate, up, activation, out)
    if out.numel() == 0:
        return
    rows = out if out.dim() == 2 else out.view(-1, out.shape[-1])
    with _native.on_device(gate.device):
        _triton().swiglu_forward(_rows(gate), _rows(up), activation, rows)


def _into_fake(gate, up, activation, out):
    _check_into_args(gate, up, activation, out)


# h = act(gate) * up written into `out`, which may be the first columns of a wider buffer (the fused MLP
# writes Hm next to the down projection's adapter columns: stacked_lora's concatenation without a copy).
gated_activation_into = define_op(
    "gated_activation_into(Tensor gate, Tensor up, str activation, Tensor(a!) out) -> ()",
    reference=_into_reference,
    cpu=_into_reference,
    cuda=_into_cuda,
    fake=_into_fake,
)


def _backward_reference(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    grad_gate, grad_up = gated_activation_backward_reference(grad_h, gate, up, activation)
    return grad_gate.contiguous(), grad_up.contiguous()  # the layout the fake kernel promises


def _backward_cuda(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    grad_gate, grad_up = gate.new_empty(gate.shape), up.new_empty(up.shape)
    cols = gate.shape[-1]
    if gate.numel() == 0:
        return grad_gate, grad_up
    with _native.on_device(gate.device):
        _triton().swiglu_backward(_rows(grad_h, (0, 1)), _rows(gate), _rows(up), activation,
                                  grad_gate.view(-1, cols), grad_up.view(-1, cols))  # fmt: skip
    return grad_gate, grad_up


def _backward_fake(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


gated_activation_backward = define_op(
    "gated_activation_backward(Tensor grad_h, Tensor gate, Tensor up, str activation) "
    "-> (Tensor grad_gate, Tensor grad_up)",
    reference=_backward_reference,
    cpu=_backward_reference,
    cuda=_backward_cuda,
    fake=_backward_fake,
)


def _rows_in_place(t: torch.Tensor) -> bool:
    """Contiguous, or a 2-D view of rows with a unit last stride (a column half of a wider buffer)."""
    return t.is_contiguous() or (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1])


def _check_overwritable(gate, up) -> None:
    if not (_rows_in_place(gate) and _rows_in_place(up)):
        raise ValueError("gate and up must be contiguous (or 2-D row-strided views) to receive their gradients "
                         "in place")  # fmt: skip


def _backward_inplace_reference(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    _check_overwritable(gate, up)
    grad_gate, grad_up = gated_activation_backward_reference(grad_h, gate, up, activation)
    gate.copy_(grad_gate)
    up.copy_(grad_up)


def _backward_inplace_cuda(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    _check_overwritable(gate, up)
    if gate.numel() == 0:
        return
    gate_rows, up_rows = gate.view(-1, gate.shape[-1]), up.view(-1, up.shape[-1])
    with _native.on_device(gate.device):
        _triton().swiglu_backward(_rows(grad_h, (0, 1)), gate_rows, up_rows, activation, gate_rows, up_rows)


def _backward_inplace_fake(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    _check_overwritable(gate, up)


gated_activation_backward_inplace = define_op(
    "gated_activation_backward_(Tensor grad_h, Tensor(a!) gate, Tensor(b!) up, str activation) -> ()",
    reference=_backward_inplace_reference,
    cpu=_backward_inplace_reference,
    cuda=_backward_inplace_cuda,
    fake=_backward_inplace_fake,
)


def _backward_h_inplace_reference(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    _check_overwritable(gate, up)
    if grad_h.shape != gate.shape or not grad_h.is_contiguous():
        raise ValueError(f"grad_h must be contiguous with gate's shape {list(gate.shape)} to receive h in place, "
                         f"got shape {list(grad_h.shape)} and strides {list(grad_h.stride())}")  # fmt: skip
    grad_gate, grad_up = gated_activation_backward_reference(grad_h, gate, up, activation)
    grad_h.copy_(gated_activation_reference(gate, up, activation))
    gate.copy_(grad_gate)
    up.copy_(grad_up)


def _backward_h_inplace_cuda(grad_h, gate, up, activation):
    _backward_h_inplace_fake(grad_h, gate, up, activation)
    if gate.numel() == 0:
        return
    cols = gate.shape[-1]
    gate_rows, up_rows = gate.view(-1, cols), up.view(-1, cols)
    with _native.on_device(gate.device):
        _triton().swiglu_backward(grad_h.view(-1, cols), gate_rows, up_rows, activation, gate_rows, up_rows,
                                  write_h=True)  # fmt: skip


def _backward_h_inplace_fake(grad_h, gate, up, activation):
    _check_backward_args(grad_h, gate, up, activation)
    _check_overwritable(gate, up)
    if grad_h.shape != gate.shape or not grad_h.is_contiguous():
        raise ValueError(f"grad_h must be contiguous with gate's shape {list(gate.shape)} to receive h in place, "
                         f"got shape {list(grad_h.shape)} and strides {list(grad_h.stride())}")  # fmt: skip


gated_activation_backward_h_inplace = define_op(
    "gated_activation_backward_h_(Tensor(a!) grad_h, Tensor(b!) gate, Tensor(c!) up, str activation) -> ()",
    reference=_backward_h_inplace_reference,
    cpu=_backward_h_inplace_reference,
    cuda=_backward_h_inplace_cuda,
    fake=_backward_h_inplace_fake,
)


def _may_overwrite(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the saved gate and up can take their gradients: intermediates of the graph (a leaf is the
    caller's own tensor, and would come back as its own gradient), plain tensors (not the fake or
    functional subclasses torch.compile traces with), contiguous, and apart."""
    if torch.compiler.is_compiling() or type(gate) is not torch.Tensor or type(up) is not torch.Tensor:
        return False
    if gate.is_leaf or up.is_leaf:
        return False
    if gate.device.type == "meta":
        return False
    if not (gate.is_contiguous() and up.is_contiguous()):
        return False
    return gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()


def _setup_context(ctx, inputs, output):
    gate, up, activation, reuse_inputs_in_backward = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation, ctx.reuse = activation, reuse_inputs_in_backward


def _backward(ctx, grad_h):
    gate, up = ctx.saved_tensors
    if ctx.reuse and _may_overwrite(gate, up):
        gated_activation_backward_inplace(grad_h, gate, up, ctx.activation)
        grad_gate, grad_up = gate, up
    else:
        grad_gate, grad_up = gated_activation_backward(grad_h, gate, up, ctx.activation)
    gate_needs, up_needs = ctx.needs_input_grad[:2]
    return (grad_gate if gate_needs else None), (grad_up if up_needs else None), None, None


gated_activation = define_op(
    "gated_activation(Tensor gate, Tensor up, str activation, bool reuse_inputs_in_backward) -> Tensor",
    reference=_forward_reference,
    cpu=_forward_reference,
    cuda=_forward_cuda,
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def swiglu(gate: torch.Tensor, up: torch.Tensor, reuse_inputs_in_backward: bool = False) -> torch.Tensor:
    """silu(gate) * up (Llama's MLP). See the module docstring for reuse_inputs_in_backward."""
    return gated_activation(gate, up, "silu", reuse_inputs_in_backward)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none",
          reuse_inputs_in_backward: bool = False) -> torch.Tensor:  # fmt: skip
    """gelu(gate, approximate) * up; approximate is "none" (erf) or "tanh", as in torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return gated_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu", reuse_inputs_in_backward)
