"""RMSNorm, Llama and Gemma forms, with autograd registered on the op.

    loraforge::rms_norm(x, weight, eps, gemma, row_padding=0) -> (y, rstd)
    loraforge::rms_norm_backward(grad_y, x, weight, rstd, gemma, weight_grad) -> (grad_x, grad_weight)

x is [..., hidden] in float32, float16 or bfloat16; weight is [hidden]. The forms match transformers:

    Llama (LlamaRMSNorm):  y = weight * (x * rstd).to(x.dtype)              (dtype: promote(weight, x))
    Gemma (GemmaRMSNorm):  y = ((x * rstd) * (1 + weight.float())).to(x.dtype)
    with x in fp32 and rstd = 1 / sqrt(mean(x**2, last dim) + eps).

Backward. Write n = x * rstd (fp32, one row of length H), s = weight (Llama) or 1 + weight (Gemma), and
g = dy * s, the gradient reaching n. The casts count as the identity, as autograd treats them. Then

    dn_j / dx_i = rstd * delta_ij - x_j * rstd**3 * x_i / H          (rstd depends on every x_i)
    dx_i = sum_j g_j dn_j/dx_i = rstd * g_i - rstd**3 * x_i * sum_j g_j x_j / H
         = rstd * (g_i - n_i * mean_j(g_j * n_j))
    dweight = sum over rows of dy * n.to(x.dtype)   (Llama: the weight multiplies the rounded n)
    dweight = sum over rows of dy * n               (Gemma)

rstd (float32, shape x.shape[:-1]) is the forward's second output, saved with x and weight for the
backward and not differentiable. Writing it costs 4 bytes a row; reading it spares the backward the
reduction sum_j x_j**2 that would otherwise stand in series before the one it needs, sum_j g_j n_j, and
the backward then uses the very rstd that produced y (the CUDA forward computes it correctly rounded;
see triton_kernels/rmsnorm.py). Python callers use rms_norm() below, which returns y alone.
dweight is reduced in fp32 (per-program partial sums, then one sum) and skipped when weight needs no
gradient (a frozen norm under LoRA): grad_weight is then empty.

row_padding > 0 lays y's rows `row_padding` elements apart beyond hidden, in a storage that holds the
padding columns of every row (y itself is no view: it has no `_base`, and those columns are not its
elements). The patched model's norms can use it (LORAFORGE_NORM_INTO_WIDE=1) so that the LoRA
projections reading y write X A^T into the columns right of it and run [X | X A^T] [W | s B]^T without
copying X into a wider buffer (models/stacked_lora.py, `_wide_from_norm`). The values of y are the same
either way.

Kernels: the reference below on CPU and every other device, Triton (loraforge.triton_kernels.rmsnorm)
on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch

from loraforge import _native
from loraforge.ops._library import define_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton():
    try:
        from loraforge.triton_kernels import rmsnorm
    except ImportError as error:  # triton is an optional dependency on machines without a GPU
        raise RuntimeError("loraforge's CUDA RMSNorm needs triton: pip install triton") from error
    return rmsnorm


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_args(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> None:
    """x and weight; and eps, where the forward takes one (the backward reads the forward's rstd)."""
    _check_float(x, "x")
    _check_float(weight, "weight")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., hidden] with hidden > 0, got shape {list(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}] (x's last dimension), got shape {list(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")


def _check_grad(grad_y: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor) -> None:
    _check_float(grad_y, "grad_y")
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y has shape {list(grad_y.shape)} but x has {list(x.shape)}")
    if grad_y.device != x.device:
        raise ValueError(f"grad_y is on {grad_y.device} but x is on {x.device}")
    if not isinstance(rstd, torch.Tensor) or rstd.dtype != torch.float32:
        raise TypeError(f"rstd must be the forward's float32 tensor, got {getattr(rstd, 'dtype', type(rstd))}")
    if rstd.shape != x.shape[:-1] or rstd.device != x.device:
        raise ValueError(f"rstd must be {list(x.shape[:-1])} on {x.device} (x's leading dimensions), got "
                         f"{list(rstd.shape)} on {rstd.device}")  # fmt: skip


def output_dtype(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.dtype:
    """As transformers: Llama multiplies by the weight in the promoted dtype; Gemma casts back to x's."""
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


# ---------------------------------------------------------------------------------------------
# Reference: the definition, in plain torch (transformers' LlamaRMSNorm and GemmaRMSNorm).


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y, rstd)."""
    hidden = x.float()
    rstd = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    normed = hidden * rstd
    if gemma:
        return (normed * (1.0 + weight.float())).to(x.dtype), rstd.squeeze(-1)
    return weight * normed.to(x.dtype), rstd.squeeze(-1)


def rms_norm_backward_reference(grad_y, x, weight, rstd, gemma, weight_grad):
    hidden = x.float()
    rstd = rstd.unsqueeze(-1)
    normed = hidden * rstd
    dy = grad_y.float()
    g = dy * ((1.0 + weight.float()) if gemma else weight.float())
    grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
    if not weight_grad:
        return grad_x, weight.new_empty(0)
    seen_by_weight = normed if gemma else normed.to(x.dtype).float()
    grad_weight = (dy * seen_by_weight).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_weight


# ---------------------------------------------------------------------------------------------
# Kernels behind the ops.


def _check_padding(row_padding: int) -> None:
    if not isinstance(row_padding, int) or row_padding < 0:
        raise ValueError(f"row_padding must be an int >= 0, got {row_padding!r}")


def _padded_strides(shape, width: int) -> list[int]:
    """Strides of `shape` with rows `width` elements apart (the leading dimensions packed)."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = width if d == len(shape) - 2 else strides[d + 1] * shape[d + 1]
    return strides


def padded_rows(shape, row_padding: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor of `shape` whose rows lie shape[-1] + row_padding elements apart, in a
    storage of numel / shape[-1] such rows (the last one's padding included); no view of anything."""
    if row_padding == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    width = shape[-1] + row_padding
    storage = torch.empty(math.prod(shape[:-1]) * width, dtype=dtype, device=device).untyped_storage()
    return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape, _padded_strides(shape, width))


def _forward_reference(x, weight, eps, gemma, row_padding=0):
    _check_args(x, weight, eps)
    _check_padding(row_padding)
    y, rstd = rms_norm_reference(x, weight, eps, gemma)
    if row_padding:
        out = padded_rows(x.shape, row_padding, y.dtype, y.device)
        out.copy_(y)
        return out, rstd.contiguous()
    return y.contiguous(), rstd.contiguous()  # the layout the fake kernel promises


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, hidden] view (a copy only when the leading dimensions cannot be flattened) whose column
    stride the kernels accept."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _forward_cuda(x, weight, eps, gemma, row_padding=0):
    _check_args(x, weight, eps)
    _check_padding(row_padding)
    y = padded_rows(x.shape, row_padding, output_dtype(x, weight, gemma), x.device)
    with _native.on_device(x.device):
        _, rstd = _triton().rms_norm_forward(_rows(x), weight.contiguous(), eps, gemma, y.dtype,
                                             out=y.view(-1, x.shape[-1]))  # fmt: skip
    return y, rstd.view(x.shape[:-1])


def _forward_fake(x, weight, eps, gemma, row_padding=0):
    _check_args(x, weight, eps)
    _check_padding(row_padding)
    strides = _padded_strides(x.shape, x.shape[-1] + row_padding)  # the real kernel's layout
    y = torch.empty_strided(x.shape, strides, dtype=output_dtype(x, weight, gemma), device=x.device)
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


def _backward_reference(grad_y, x, weight, rstd, gemma, weight_grad):
    _check_args(x, weight)
    _check_grad(grad_y, x, rstd)
    grad_x, grad_weight = rms_norm_backward_reference(grad_y, x, weight, rstd, gemma, weight_grad)
    return grad_x.contiguous(), grad_weight  # the layout the fake kernel promises


def _backward_cuda(grad_y, x, weight, rstd, gemma, weight_grad):
    _check_args(x, weight)
    _check_grad(grad_y, x, rstd)
    dy = grad_y.reshape(-1, x.shape[-1])
    if dy.stride(-1) not in (0, 1):  # 0: a gradient broadcast along rows, read as it is
        dy = dy.contiguous()
    with _native.on_device(x.device):
        grad_x, grad_weight = _triton().rms_norm_backward(
            dy, _rows(x), weight.contiguous(), rstd.reshape(-1).contiguous(), gemma, weight_grad
        )
    return grad_x.view(x.shape), (grad_weight if weight_grad else weight.new_empty(0))


def _backward_fake(grad_y, x, weight, rstd, gemma, weight_grad):
    _check_args(x, weight)
    _check_grad(grad_y, x, rstd)
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0,))


rms_norm_backward = define_op(
    "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool gemma, bool weight_grad) "
    "-> (Tensor grad_x, Tensor grad_weight)",
    reference=_backward_reference,
    cpu=_backward_reference,
    cuda=_backward_cuda,
    fake=_backward_fake,
)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, gemma, *_row_padding = inputs
    rstd = output[1]
    ctx.mark_non_differentiable(rstd)  # a statistic for the backward; no gradient flows through it
    ctx.set_materialize_grads(False)  # so autograd does not fill a zero gradient for rstd each step
    ctx.save_for_backward(x, weight, rstd)
    ctx.gemma = gemma


def _backward(ctx, grad_y, _grad_rstd):
    if grad_y is None:  # not materialised (see _setup_context): nothing reached y
        return None, None, None, None, None
    x, weight, rstd = ctx.saved_tensors
    x_needs, weight_needs = ctx.needs_input_grad[:2]
    grad_x, grad_weight = rms_norm_backward(grad_y, x, weight, rstd, ctx.gemma, weight_needs)
    return (grad_x if x_needs else None), (grad_weight if weight_needs else None), None, None, None


rms_norm_op = define_op(
    "rms_norm(Tensor x, Tensor weight, float eps, bool gemma, int row_padding=0) -> (Tensor y, Tensor rstd)",
    reference=_forward_reference,
    cpu=_forward_reference,
    cuda=_forward_cuda,
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False,
             row_padding: int = 0) -> torch.Tensor:  # fmt: skip
    """RMSNorm of x over its last dimension (Llama form, or Gemma's `1 + weight` with gemma=True);
    row_padding: see the module docstring."""
    return rms_norm_op(x, weight, float(eps), bool(gemma), row_padding)[0]
