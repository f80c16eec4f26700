"""Gated activations of an MLP, h = act(gate) * up, for SwiGLU (act = SiLU) and GeGLU (act = GeLU, exact
erf form or tanh approximation). Kernels and launchers only: checks and autograd live in
loraforge.ops.swiglu.

Layout: gate, up, h [rows, cols] with the last stride 1 and any row stride (so the two halves of a fused
gate_up projection are read where they lie). One program per (row, block of cols); fp32 math; one read
of each input and one write of each output. The backward may write its results over gate and up (the
launcher is handed the same tensors as inputs and outputs): each program reads its elements before it
writes them, so that is safe.

Activations and their slopes, with s = sigmoid (and 1 - s(z) taken as s(-z), exact where s nears 1):
    silu       a = g s(g)                      a' = s(g) (1 + g (1 - s(g)))
    gelu       a = g Phi(g)                    a' = Phi(g) + g phi(g)     (Phi, phi: normal cdf and pdf)
    gelu_tanh  a = g/2 (1 + tanh(u)) = g s(2u),  u = c (g + 0.044715 g^3),  c = sqrt(2 / pi)
               a' = s(2u) + 2 g s(2u) (1 - s(2u)) c (1 + 3 * 0.044715 g^2)
Writing 1 + tanh(u) as 2 s(2u) avoids tanh (not in every Triton build) and the cancellation of
1 + tanh(u) for negative u.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraforge.triton_kernels._rounding import round_to

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
BLOCK_COLS = 1024  # 8 elements per thread at 4 warps: 16-byte accesses in bf16



@triton.jit
def _sigmoid_and_complement(z):
    """(sigmoid(z), 1 - sigmoid(z)), both to full relative precision: 1 - s computed as a difference
    loses every digit where s nears 1, and it multiplies large g in the slopes. exp(-|z|) never overflows."""
    e = tl.exp(-tl.abs(z))
    big = 1.0 / (1.0 + e)  # sigmoid(|z|)
    small = e * big  # sigmoid(-|z|)
    positive = z >= 0
    return tl.where(positive, big, small), tl.where(positive, small, big)


@triton.jit
def _activation_and_slope(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32. Constants are literals: compiled Triton reads module globals only as
    tl.constexpr, and the interpreter cannot multiply a tensor by one."""
    if ACTIVATION == 0:
        s, one_minus_s = _sigmoid_and_complement(g)
        return g * s, s * (1.0 + g * one_minus_s)
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))  # erf(g / sqrt(2))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    else:
        c = 0.7978845608028654  # sqrt(2 / pi)
        s, one_minus_s = _sigmoid_and_complement(2.0 * c * (g + 0.044715 * g * g * g))
        slope = s + 2.0 * g * s * one_minus_s * c * (1.0 + 3.0 * 0.044715 * g * g)
        return g * s, slope


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, h_ptr, n_cols, gate_row_stride, up_row_stride, h_row_stride,
    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation_and_slope(g, ACTIVATION)
    tl.store(h_ptr + row * h_row_stride + cols, round_to(a * u, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols,
    dh_row_stride, gate_row_stride, up_row_stride, dgate_row_stride, dup_row_stride,
    DH_COL_STRIDE: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, WRITE_H: tl.constexpr = False,
):  # fmt: skip
    # DH_COL_STRIDE is 1, or 0 for a gradient broadcast along the row (`h.sum().backward()`).
    # WRITE_H: also store h = act(gate) * up over dh (the MLP backward needs h for the down
    # projection's LoRA gradients after dh is spent; this saves recomputing it in a pass of its own).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * dh_row_stride + cols * DH_COL_STRIDE, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, slope = _activation_and_slope(g, ACTIVATION)
    # dgate/dup may be gate/up themselves: every load above precedes these stores.
    tl.store(dgate_ptr + row * dgate_row_stride + cols, round_to(dh * u * slope, dgate_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip
    tl.store(dup_ptr + row * dup_row_stride + cols, round_to(dh * a, dup_ptr.dtype.element_ty), mask=mask)
    if WRITE_H:  # the forward kernel's formula, so h is bit for bit the forward's
        tl.store(dh_ptr + row * dh_row_stride + cols, round_to(a * u, dh_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(BLOCK_COLS, triton.next_power_of_2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block


def _check_last_stride(named: dict[str, torch.Tensor], allowed: tuple[int, ...] = (1,)) -> None:
    for name, t in named.items():
        if t.stride(1) not in allowed:
            raise ValueError(f"{name} must have a last stride in {allowed}, got {t.stride(1)}")


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str, h: torch.Tensor) -> None:
    """h = act(gate) * up, all [rows, cols] with last stride 1; written into h."""
    _check_last_stride({"gate": gate, "up": up, "h": h})
    n_rows, n_cols = gate.shape
    if n_rows * n_cols == 0:
        return
    grid, block = _grid(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](
        gate, up, h, n_cols, gate.stride(0), up.stride(0), h.stride(0),
        ACTIVATION=ACTIVATIONS[activation], BLOCK=block, num_warps=4,
    )  # fmt: skip


def swiglu_backward(grad_h, gate, up, activation: str, grad_gate, grad_up, write_h: bool = False) -> None:
    """Gradients of h = act(gate) * up, written into grad_gate and grad_up, which may be gate and up
    themselves. grad_h's last stride may be 0 or 1, the others' must be 1. With write_h, h itself is
    written over grad_h (whose last stride must then be 1)."""
    _check_last_stride({"grad_h": grad_h}, (1,) if write_h else (0, 1))
    _check_last_stride({"gate": gate, "up": up, "grad_gate": grad_gate, "grad_up": grad_up})
    n_rows, n_cols = gate.shape
    if n_rows * n_cols == 0:
        return
    grid, block = _grid(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](
        grad_h, gate, up, grad_gate, grad_up, n_cols,
        grad_h.stride(0), gate.stride(0), up.stride(0), grad_gate.stride(0), grad_up.stride(0),
        DH_COL_STRIDE=grad_h.stride(1), ACTIVATION=ACTIVATIONS[activation], BLOCK=block, WRITE_H=write_h,
        num_warps=4,
    )  # fmt: skip
