"""Rotary position embedding (transformers' rotate_half convention) for q and k in one launch. Kernels and
launchers only: argument checks and autograd live in loraforge.ops.rope.

Layout, as transformers hands them over: q [batch, heads_q, seq, head_dim], k [batch, heads_k, seq,
head_dim], any strides with the last one 1 (or 0 for a broadcast gradient); cos and sin [batch or 1,
seq, rotary_dim] with their last stride 1. With h = rotary_dim / 2, for each head

    forward   out[:h]  = x[:h] * cos[:h] - x[h:r] * sin[:h]
              out[h:r] = x[h:r] * cos[h:r] + x[:h] * sin[h:r]
              out[r:]  = x[r:]                                  (partial rotary: passed through)
    backward  the transpose of that map: the same formula with (sin[:h], sin[h:r]) -> (-sin[h:r], -sin[:h])

One program per (batch, token) and chunk of heads: it loads the token's cos/sin row and rotates both
halves of a [heads, h] tile in fp32, so q and k are read once and the outputs written once (a token's
cos/sin row is read by each of its few programs, from L2). Program axis 1 counts the q chunks first,
then the k chunks. Tunables for the GPU: TILE_ELEMENTS (heads per program) and the warps per program
(8 elements of a half-tile per thread: 16-byte accesses in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraforge.triton_kernels._rounding import round_to

TILE_ELEMENTS = 2048  # heads per program: up to this many elements in each half-tile
NUM_WARPS = 0  # 0: from the tile (4 elements of a half-tile per thread); benchmarks/sweep_kernels.py sets it


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, batch, token, head_start, n_heads,
    in_stride_b, in_stride_h, in_stride_s, out_stride_b, out_stride_h, out_stride_s,
    cos_lo, cos_hi, sin_lo, sin_hi, half, rotary_dim, head_dim,
    IN_D_STRIDE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """out[:h] = lo * cos_lo - hi * sin_lo; out[h:r] = hi * cos_hi + lo * sin_hi, for heads
    [head_start, head_start + BLOCK_HEADS) of one token."""
    heads = head_start + tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (d < half)[None, :]
    heads64 = heads.to(tl.int64)[:, None]
    src = in_ptr + batch.to(tl.int64) * in_stride_b + token.to(tl.int64) * in_stride_s + heads64 * in_stride_h
    dst = out_ptr + batch.to(tl.int64) * out_stride_b + token.to(tl.int64) * out_stride_s + heads64 * out_stride_h

    lo = tl.load(src + d[None, :] * IN_D_STRIDE, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + (d[None, :] + half) * IN_D_STRIDE, mask=mask, other=0.0).to(tl.float32)
    out_lo = lo * cos_lo[None, :] - hi * sin_lo[None, :]
    out_hi = hi * cos_hi[None, :] + lo * sin_hi[None, :]
    tl.store(dst + d[None, :], round_to(out_lo, out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + d[None, :] + half, round_to(out_hi, out_ptr.dtype.element_ty), mask=mask)

    if COPY_PASS:  # dims past rotary_dim are copied unchanged (skipped when rotating in place)
        p = rotary_dim + tl.arange(0, BLOCK_PASS)
        pass_mask = (heads < n_heads)[:, None] & (p < head_dim)[None, :]
        kept = tl.load(src + p[None, :] * IN_D_STRIDE, mask=pass_mask, other=0.0)
        tl.store(dst + p[None, :], kept.to(out_ptr.dtype.element_ty), mask=pass_mask)


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, batch, token, cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s,
                  half, BLOCK_HALF: tl.constexpr):  # fmt: skip
    d = tl.arange(0, BLOCK_HALF)
    mask = d < half
    cos_row = cos_ptr + batch.to(tl.int64) * cos_stride_b + token.to(tl.int64) * cos_stride_s
    sin_row = sin_ptr + batch.to(tl.int64) * sin_stride_b + token.to(tl.int64) * sin_stride_s
    cos_lo = tl.load(cos_row + d, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_row + half + d, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_row + d, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_row + half + d, mask=mask, other=0.0).to(tl.float32)
    return cos_lo, cos_hi, sin_lo, sin_hi


@triton.jit
def _rotate_q_or_k(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, batch, token, chunk, heads_q, heads_k,
    q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
    qo_stride_b, qo_stride_h, qo_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
    cos_lo, cos_hi, sin_lo, sin_hi, half, rotary_dim, head_dim,
    Q_D_STRIDE: tl.constexpr, K_D_STRIDE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    q_chunks = tl.cdiv(heads_q, BLOCK_HEADS)
    if chunk < q_chunks:
        _rotate_heads(q_ptr, q_out_ptr, batch, token, chunk * BLOCK_HEADS, heads_q,
                      q_stride_b, q_stride_h, q_stride_s, qo_stride_b, qo_stride_h, qo_stride_s,
                      cos_lo, cos_hi, sin_lo, sin_hi, half, rotary_dim, head_dim,
                      Q_D_STRIDE, COPY_PASS, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS)  # fmt: skip
    else:
        _rotate_heads(k_ptr, k_out_ptr, batch, token, (chunk - q_chunks) * BLOCK_HEADS, heads_k,
                      k_stride_b, k_stride_h, k_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
                      cos_lo, cos_hi, sin_lo, sin_hi, half, rotary_dim, head_dim,
                      K_D_STRIDE, COPY_PASS, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS)  # fmt: skip


@triton.jit
def _rope_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, heads_q, heads_k,
    q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
    qo_stride_b, qo_stride_h, qo_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
    cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s, half, rotary_dim, head_dim,
    Q_D_STRIDE: tl.constexpr, K_D_STRIDE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    batch, token = row // seq_len, row % seq_len
    cos_lo, cos_hi, sin_lo, sin_hi = _load_cos_sin(cos_ptr, sin_ptr, batch, token, cos_stride_b, cos_stride_s,
                                                   sin_stride_b, sin_stride_s, half, BLOCK_HALF)  # fmt: skip
    _rotate_q_or_k(q_ptr, k_ptr, q_out_ptr, k_out_ptr, batch, token, tl.program_id(1), heads_q, heads_k,
                   q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
                   qo_stride_b, qo_stride_h, qo_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
                   cos_lo, cos_hi, sin_lo, sin_hi, half, rotary_dim, head_dim,
                   Q_D_STRIDE, K_D_STRIDE, COPY_PASS, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS)  # fmt: skip


@triton.jit
def _rope_bwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, heads_q, heads_k,
    q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
    qo_stride_b, qo_stride_h, qo_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
    cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s, half, rotary_dim, head_dim,
    Q_D_STRIDE: tl.constexpr, K_D_STRIDE: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    # q_ptr / k_ptr hold the gradients of the rotated outputs; *_out_ptr receive those of the inputs.
    row = tl.program_id(0)
    batch, token = row // seq_len, row % seq_len
    cos_lo, cos_hi, sin_lo, sin_hi = _load_cos_sin(cos_ptr, sin_ptr, batch, token, cos_stride_b, cos_stride_s,
                                                   sin_stride_b, sin_stride_s, half, BLOCK_HALF)  # fmt: skip
    # Transpose of the forward map: swap the sine halves and negate them.
    _rotate_q_or_k(q_ptr, k_ptr, q_out_ptr, k_out_ptr, batch, token, tl.program_id(1), heads_q, heads_k,
                   q_stride_b, q_stride_h, q_stride_s, k_stride_b, k_stride_h, k_stride_s,
                   qo_stride_b, qo_stride_h, qo_stride_s, ko_stride_b, ko_stride_h, ko_stride_s,
                   cos_lo, cos_hi, -sin_hi, -sin_lo, half, rotary_dim, head_dim,
                   Q_D_STRIDE, K_D_STRIDE, COPY_PASS, BLOCK_HEADS, BLOCK_HALF, BLOCK_PASS)  # fmt: skip


def _strides_bhs(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _cos_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)  # one row of cos/sin serves every batch row


def _launch(kernel, q, k, cos, sin, q_out, k_out) -> None:
    batch, heads_q, seq_len, head_dim = q.shape
    heads_k = k.shape[1]
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    for name, t in (("q", q), ("k", k)):
        if t.stride(3) not in (0, 1):
            raise ValueError(f"{name} must have a last stride of 1 (or 0), got {t.stride(3)}")
    for name, t in (("q_out", q_out), ("k_out", k_out), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a last stride of 1, got {t.stride(-1)}")
    if batch * seq_len == 0:
        return
    in_place = q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    block_half = triton.next_power_of_2(half)
    pass_dims = head_dim - rotary_dim
    block_heads = min(triton.next_power_of_2(min(heads_q, heads_k)), max(1, TILE_ELEMENTS // block_half))
    # 4 elements of each half-tile per thread (8-byte accesses in bf16): on an H100 this beat 8 per
    # thread (16-byte accesses, half the warps) by 7% for Llama's 32/8 heads of 128 (sweep_kernels.py).
    num_warps = NUM_WARPS or max(1, min(8, block_heads * block_half // (32 * 4)))
    grid = (batch * seq_len, triton.cdiv(heads_q, block_heads) + triton.cdiv(heads_k, block_heads))
    kernel[grid](
        q, k, q_out, k_out, cos, sin, seq_len, heads_q, heads_k,
        *_strides_bhs(q), *_strides_bhs(k), *_strides_bhs(q_out), *_strides_bhs(k_out),
        *_cos_strides(cos), *_cos_strides(sin), half, rotary_dim, head_dim,
        Q_D_STRIDE=q.stride(3), K_D_STRIDE=k.stride(3), COPY_PASS=pass_dims > 0 and not in_place,
        BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, BLOCK_PASS=triton.next_power_of_2(max(pass_dims, 1)),
        num_warps=num_warps,
    )  # fmt: skip


def rope_forward(q, k, cos, sin, q_out, k_out) -> None:
    """Rotate q and k into q_out and k_out (which may be q and k themselves, to rotate in place)."""
    _launch(_rope_fwd_kernel, q, k, cos, sin, q_out, k_out)


def rope_backward(grad_q, grad_k, cos, sin, grad_q_in, grad_k_in) -> None:
    """Gradients of the rotated q and k (grad_q, grad_k) -> those of the inputs, written to grad_q_in and
    grad_k_in (which may be grad_q and grad_k themselves)."""
    _launch(_rope_bwd_kernel, grad_q, grad_k, cos, sin, grad_q_in, grad_k_in)
