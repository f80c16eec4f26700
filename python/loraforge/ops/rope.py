"""Rotary position embedding for q and k together, with autograd registered on the op.

    loraforge::rope(q, k, cos, sin) -> (q_embed, k_embed)
    loraforge::rope_backward(grad_q_embed, grad_k_embed, cos, sin) -> (grad_q, grad_k)
    loraforge::rope_(q!, k!, cos, sin) -> ()            in place, no autograd (inference, no_grad)

Inputs as transformers lays them out and computes them:
    q [batch, heads_q, seq, head_dim], k [batch, heads_k, seq, head_dim]: any strides (the usual
        `.view(b, s, h, d).transpose(1, 2)` is read as it is); a last stride other than 1 costs a copy.
    cos, sin [batch or 1, seq, rotary_dim]: exactly what a transformers rotary embedding returns
        (default, linear, dynamic, YaRN, Llama 3 ...: we take its cos/sin, so every scaling works), one
        row per batch row, so packed and padded batches with their own position ids work.
    rotary_dim <= head_dim and even; dims past rotary_dim pass through unchanged (partial rotary, as
        Phi / StableLM / GPT-NeoX slice them).

Definition (transformers' rotate_half convention), in fp32, rounded once to q's dtype:
    x_embed[..., :r] = x[..., :r] * cos + rotate_half(x[..., :r]) * sin,  rotate_half(v) = cat(-v[h:], v[:h])
    x_embed[..., r:] = x[..., r:]

Backward. Per head and token, with h = r / 2, lo = x[:h], hi = x[h:r] and diagonal C_lo, C_hi, S_lo, S_hi
holding the halves of cos and sin, the forward is linear in x:

    [out_lo]   [ C_lo  -S_lo ] [lo]
    [out_hi] = [ S_hi   C_hi ] [hi]        and out[r:] = x[r:]

so the gradient is its transpose applied to the incoming gradient g:

    grad_lo = C_lo g_lo + S_hi g_hi,   grad_hi = -S_lo g_lo + C_hi g_hi,   grad[r:] = g[r:]

which is the forward with (S_lo, S_hi) replaced by (-S_hi, -S_lo); with transformers' cos/sin, whose
halves are equal, that is the rotation by -sin. cos and sin receive no gradient (transformers builds
them from a buffer).

Outputs have q's dtype (transformers hands cos and sin over in q's dtype; any float dtype is read, in
fp32) and keep q's and k's layout where that is dense with a last stride of 1 (else they are contiguous).

Rotating in place saves nothing in training: the input q is dropped right after rope, so out-of-place
costs one transient buffer, and a mutating op cannot carry registered autograd. `rope_` (through
`apply_rotary_pos_emb(..., inplace=True)`) is for inference and no_grad paths, where it avoids the
allocation; asked for while autograd records q or k, it raises.

Kernels: the reference below on CPU and every other device, Triton (loraforge.triton_kernels.rope)
on CUDA: one launch for q and k.
"""

from __future__ import annotations

import functools

import torch

from loraforge import _native
from loraforge.ops._library import define_op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton():
    try:
        from loraforge.triton_kernels import rope
    except ImportError as error:  # triton is an optional dependency on machines without a GPU
        raise RuntimeError("loraforge's CUDA RoPE needs triton: pip install triton") from error
    return rope


def _check_float(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_args(q, k, cos, sin, q_name: str = "q", k_name: str = "k") -> None:
    for name, t in ((q_name, q), (k_name, k), ("cos", cos), ("sin", sin)):
        _check_float(t, name)
    if k.dtype != q.dtype:
        raise TypeError(f"{k_name} is {k.dtype} but {q_name} is {q.dtype}: they must match")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin is {sin.dtype} but cos is {cos.dtype}: they must match")
    for name, t in ((k_name, k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {q_name} is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"{q_name} must be [batch, heads_q, seq, head_dim], got shape {list(q.shape)}")
    batch, heads_q, seq, head_dim = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != head_dim:
        raise ValueError(f"{k_name} must be [{batch}, heads_k, {seq}, {head_dim}] to match {q_name}, "
                         f"got shape {list(k.shape)}")  # fmt: skip
    if heads_q == 0 or k.shape[1] == 0:
        raise ValueError(f"{q_name} and {k_name} need at least one head each")
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq:
        raise ValueError(f"cos must be [{batch} or 1, {seq}, rotary_dim], got shape {list(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {list(sin.shape)} but cos has {list(cos.shape)}")
    rotary_dim = cos.shape[2]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"cos and sin's last dimension (rotary_dim, {rotary_dim}) must be even and in "
                         f"[2, head_dim={head_dim}]")  # fmt: skip


def _output_like(t: torch.Tensor) -> torch.Tensor:
    """t's layout where the kernel can write it (last stride 1), else contiguous. Used by the real and the
    fake kernels alike, so both agree on strides."""
    if t.stride(-1) == 1:
        return torch.empty_like(t)  # dense layouts (the transposed view) keep their strides
    return t.new_empty(t.shape)


# ---------------------------------------------------------------------------------------------
# Reference: the definition, in plain torch.


def _rotate_reference(x, cos, sin):
    """x rotated by (cos, sin) in fp32, rounded to x's dtype, in x's layout (see _output_like)."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    rot = x[..., :rotary_dim].float()
    rotate_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = _output_like(x)
    out[..., :rotary_dim] = rot * cos + rotate_half * sin
    out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


def _transposed_sin(sin):
    """(S_lo, S_hi) -> (-S_hi, -S_lo): the forward formula with this sine applies the transposed map."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., half:], -sin[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin):
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


def rope_backward_reference(grad_q_embed, grad_k_embed, cos, sin):
    sin_t = _transposed_sin(sin)
    return _rotate_reference(grad_q_embed, cos, sin_t), _rotate_reference(grad_k_embed, cos, sin_t)


# ---------------------------------------------------------------------------------------------
# Kernels behind the ops.


def _readable(t: torch.Tensor) -> torch.Tensor:
    """The kernels read a last stride of 1, or 0 (a broadcast gradient), as it is."""
    return t if t.stride(-1) in (0, 1) else t.contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_reference_kernel(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    return rope_reference(q, k, cos, sin)


def _rope_cuda(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    q_embed, k_embed = _output_like(q), _output_like(k)
    with _native.on_device(q.device):
        _triton().rope_forward(_readable(q), _readable(k), _rows(cos), _rows(sin), q_embed, k_embed)
    return q_embed, k_embed


def _rope_fake(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    return _output_like(q), _output_like(k)


def _backward_reference_kernel(grad_q_embed, grad_k_embed, cos, sin):
    _check_args(grad_q_embed, grad_k_embed, cos, sin, "grad_q_embed", "grad_k_embed")
    return rope_backward_reference(grad_q_embed, grad_k_embed, cos, sin)


def _backward_cuda(grad_q_embed, grad_k_embed, cos, sin):
    _check_args(grad_q_embed, grad_k_embed, cos, sin, "grad_q_embed", "grad_k_embed")
    grad_q, grad_k = _output_like(grad_q_embed), _output_like(grad_k_embed)
    with _native.on_device(grad_q.device):
        _triton().rope_backward(_readable(grad_q_embed), _readable(grad_k_embed), _rows(cos), _rows(sin),
                                grad_q, grad_k)  # fmt: skip
    return grad_q, grad_k


def _backward_fake(grad_q_embed, grad_k_embed, cos, sin):
    _check_args(grad_q_embed, grad_k_embed, cos, sin, "grad_q_embed", "grad_k_embed")
    return _output_like(grad_q_embed), _output_like(grad_k_embed)


rope_backward = define_op(
    "rope_backward(Tensor grad_q_embed, Tensor grad_k_embed, Tensor cos, Tensor sin) "
    "-> (Tensor grad_q, Tensor grad_k)",
    reference=_backward_reference_kernel,
    cpu=_backward_reference_kernel,
    cuda=_backward_cuda,
    fake=_backward_fake,
)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad_q_embed, grad_k_embed):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = rope_backward(grad_q_embed, grad_k_embed, cos, sin)
    q_needs, k_needs = ctx.needs_input_grad[:2]
    return (grad_q if q_needs else None), (grad_k if k_needs else None), None, None


rope = define_op(
    "rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_embed, Tensor k_embed)",
    reference=_rope_reference_kernel,
    cpu=_rope_reference_kernel,
    cuda=_rope_cuda,
    fake=_rope_fake,
    backward=_backward,
    setup_context=_setup_context,
)


def _check_writable(t: torch.Tensor, name: str) -> None:
    if t.stride(-1) != 1 or any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        raise ValueError(f"rotating {name} in place needs a last stride of 1 and no broadcast dimension, "
                         f"got strides {list(t.stride())}")  # fmt: skip


def _rope_inplace_reference(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    _check_writable(q, "q")
    _check_writable(k, "k")
    q_embed, k_embed = rope_reference(q, k, cos, sin)
    q.copy_(q_embed)
    k.copy_(k_embed)


def _rope_inplace_cuda(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    _check_writable(q, "q")
    _check_writable(k, "k")
    with _native.on_device(q.device):
        _triton().rope_forward(q, k, _rows(cos), _rows(sin), q, k)


def _rope_inplace_fake(q, k, cos, sin):
    _check_args(q, k, cos, sin)
    _check_writable(q, "q")
    _check_writable(k, "k")


rope_inplace = define_op(
    "rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()",
    reference=_rope_inplace_reference,
    cpu=_rope_inplace_reference,
    cuda=_rope_inplace_cuda,
    fake=_rope_inplace_fake,
)


def apply_rotary_pos_emb(q, k, cos, sin, inplace: bool = False):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1 layout), also for a cos/sin
    narrower than head_dim (partial rotary). With inplace=True, q and k are overwritten and returned;
    that needs autograd not to be recording them (inference, torch.no_grad())."""
    if not inplace:
        return rope(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("inplace=True cannot be differentiated: q or k requires grad. Use inplace=False in "
                         "training (it costs no extra memory there) or call under torch.no_grad()")  # fmt: skip
    rope_inplace(q, k, cos, sin)
    return q, k
