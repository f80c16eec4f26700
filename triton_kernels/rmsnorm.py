"""RMSNorm forward and backward in Triton, Llama and Gemma forms. Kernels and launchers only:
argument checks and autograd live in loraforge.ops.rmsnorm.

Layout: x is [rows, hidden] with the hidden dimension contiguous and any row stride. One row (or a
tile of a few rows when hidden is small) sits in registers, so each element of x is read once per pass
and the math is fp32 throughout:

    forward   y = w * cast(x * rstd)          (Llama: the cast to x's dtype happens before the weight)
              y = cast((x * rstd) * (1 + w))  (Gemma: the weight is applied in fp32)
    backward  recomputes rstd from the row it already holds (no saved statistics to write or read),
              writes dx, and adds this program's rows into an fp32 partial sum of dw; the launcher then
              sums the [programs, hidden] partials. A persistent grid keeps that buffer small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraforge.triton_kernels._rounding import round_to

MAX_HIDDEN = 65536  # a whole row sits in one program's registers (at 16,384 ptxas already spills a little)
TILE_ELEMENTS = 2048  # small hidden sizes are tiled several rows per program up to about this many elements
BWD_PROGRAMS_PER_SM = 2  # persistent backward grid: enough rows in flight, few dw partial rows
# Overrides for benchmarks/sweep_kernels.py (0: the default rule): rows per program and warps.
FWD_BLOCK_ROWS = FWD_NUM_WARPS = BWD_BLOCK_ROWS = BWD_NUM_WARPS = 0
BWD_STAGES = 2  # software pipelining of the backward's row loop: 98 -> 92 us at 8192 x 4096 bf16 on an H100


@triton.jit
def _rstd(sum_of_squares, hidden, eps):
    """1 / sqrt(mean(x**2) + eps), every step correctly rounded: it costs nothing once per row, and an
    approximate rsqrt's last-bit error would be shared by the whole row."""
    mean_square = tl.math.div_rn(sum_of_squares, hidden * 1.0)  # hidden arrives as an int
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_square + eps))


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, n_rows, hidden, x_row_stride, y_row_stride, eps,
    GEMMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows * stride passes 2**31 on large activations

    x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = _rstd(tl.sum(x * x, axis=1), hidden, eps)
    normed = x * rstd[:, None]
    if GEMMA:
        y = normed * (1.0 + w)[None, :]
    else:
        # Llama rounds the normalised row to the input dtype before the weight multiplies it.
        y = round_to(normed, x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr, n_rows, hidden,
    dy_row_stride, x_row_stride, dx_row_stride, eps,
    DY_COL_STRIDE: tl.constexpr, GEMMA: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr = 1,
):  # fmt: skip
    # DY_COL_STRIDE is 1, or 0 for a gradient broadcast along the row (as `y.sum().backward()` makes):
    # reading it in place avoids materialising it.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = (1.0 + w) if GEMMA else w
    dw_acc = tl.zeros([BLOCK_H], dtype=tl.float32)

    n_tiles = tl.cdiv(n_rows, BLOCK_ROWS)
    for tile in tl.range(pid, n_tiles, programs, num_stages=STAGES):  # STAGES > 1: next rows' loads in flight
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy_offsets = rows64 * dy_row_stride + cols[None, :] * DY_COL_STRIDE
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)

        rstd = _rstd(tl.sum(x * x, axis=1), hidden, eps)
        normed = x * rstd[:, None]
        g = dy * scale[None, :]  # gradient with respect to the normalised row
        mean_g_normed = tl.sum(g * normed, axis=1) / hidden
        dx = rstd[:, None] * (g - normed * mean_g_normed[:, None])
        tl.store(dx_ptr + rows64 * dx_row_stride + cols[None, :], round_to(dx, dx_ptr.dtype.element_ty), mask=mask)

        if WEIGHT_GRAD:
            if GEMMA:
                contribution = dy * normed
            else:
                contribution = dy * round_to(normed, x_ptr.dtype.element_ty).to(tl.float32)
            # Masked rows hold normed = 0 * rsqrt(eps), which is NaN when eps is 0: keep them out.
            dw_acc += tl.sum(tl.where(mask, contribution, 0.0), axis=0)

    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * hidden + cols, dw_acc, mask=col_mask)


def _launch_config(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_ROWS, num_warps): whole rows, several per program when hidden is small."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is above the {MAX_HIDDEN} this kernel holds in registers")
    block_h = triton.next_power_of_2(hidden)
    block_rows = max(1, TILE_ELEMENTS // block_h)
    elements = block_h * block_rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_h, block_rows, num_warps


def _default_programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, sms * BWD_PROGRAMS_PER_SM))
    return max(1, min(n_tiles, 4))  # interpreter on CPU: a few programs, so the partial sums are exercised


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, out_dtype: torch.dtype):
    """y [rows, hidden] of out_dtype from x [rows, hidden] (x.stride(1) == 1) and weight [hidden] (contiguous)."""
    n_rows, hidden = x.shape
    y = torch.empty((n_rows, hidden), dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return y
    block_h, block_rows, num_warps = _launch_config(hidden)
    block_rows, num_warps = FWD_BLOCK_ROWS or block_rows, FWD_NUM_WARPS or num_warps
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_fwd_kernel[grid](
        x, weight, y, n_rows, hidden, x.stride(0), y.stride(0), eps,
        GEMMA=gemma, BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return y


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, weight_grad: bool,
    num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dx [rows, hidden] in x's dtype, dw [hidden] in weight's dtype or None when not weight_grad).

    dy.stride(1) must be 1 or 0; x.stride(1) must be 1; weight contiguous."""
    n_rows, hidden = x.shape
    if dy.stride(1) not in (0, 1):
        raise ValueError(f"dy must have a column stride of 0 or 1, got {dy.stride(1)}")
    dx = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if weight_grad else None)
    block_h, block_rows, num_warps = _launch_config(hidden)
    block_rows, num_warps = BWD_BLOCK_ROWS or block_rows, BWD_NUM_WARPS or num_warps
    n_tiles = triton.cdiv(n_rows, block_rows)
    programs = min(num_programs or _default_programs(x.device, n_tiles), n_tiles)
    partial = torch.empty((programs, hidden) if weight_grad else (1,), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, dx, partial, n_rows, hidden, dy.stride(0), x.stride(0), dx.stride(0), eps,
        DY_COL_STRIDE=dy.stride(1), GEMMA=gemma, WEIGHT_GRAD=weight_grad,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, STAGES=BWD_STAGES, num_warps=num_warps,
    )  # fmt: skip
    dw = partial.sum(dim=0).to(weight.dtype) if weight_grad else None
    return dx, dw
