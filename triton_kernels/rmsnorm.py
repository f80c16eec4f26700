"""RMSNorm forward and backward in Triton, Llama and Gemma forms. Kernels and launchers only:
argument checks and autograd live in loraforge.ops.rmsnorm.

Layout: x is [rows, hidden] with the hidden dimension contiguous and any row stride. One row (or a
tile of a few rows) sits in registers, so each element of x is read once per pass and the math is
fp32 throughout:

    forward   y = w * cast(x * rstd)          (Llama: the cast to x's dtype happens before the weight)
              y = cast((x * rstd) * (1 + w))  (Gemma: the weight is applied in fp32)
              and rstd [rows] in fp32, 4 bytes a row, for the backward.
    backward  reads rstd (or recomputes it from the row it holds: the kernel keeps both ways, so the
              launch sweep can weigh them), writes dx, and adds its rows into an fp32 partial sum of dw;
              the launcher then sums the [programs, hidden] partials. A persistent grid keeps that
              buffer small.

Why the backward is the hard half: it is latency-bound per row, not bandwidth-bound. A whole row held
in registers, with the weight and the dw accumulator beside it, leaves room for about two programs per
SM (ptxas, sm_90: 1 row and 8 warps take ~120 registers a thread), so few rows are in flight. The levers,
all module-level below so that benchmarks/sweep_kernels.py can compare them in one run: the saved rstd
(one row reduction instead of two in series), several rows per program iteration (BWD_BLOCK_ROWS: the
weight and the accumulator are shared by the tile), software pipelining of the row loop (BWD_STAGES:
the next tiles' loads go to shared memory asynchronously, which costs no registers), warps, programs
per SM, one launch for the final dw sum, and for a frozen weight (LoRA), no persistent grid at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraforge.triton_kernels._rounding import round_to

MAX_HIDDEN = 65536  # a whole row sits in one program's registers (at 16,384 ptxas already spills a little)
TILE_ELEMENTS = 2048  # small hidden sizes are tiled several rows per program up to about this many elements
# Launch choices. The defaults are the best measured so far (8192 x 4096 bf16, H100).
# Backward tile, (rows per tile, warps) by BLOCK_H, where one row fills a tile (hidden >= TILE_ELEMENTS):
# measured sizes only; the others keep the forward's rule (_launch_config).
BWD_WIDE_TILES = {4096: (1, 8)}  # from the sweep (sweep_kernels.py rmsnorm)
BWD_PROGRAMS_PER_SM = 1  # from the sweep (sweep_kernels.py rmsnorm)
BWD_STAGES = 6  # from the sweep (sweep_kernels.py rmsnorm)
BWD_DW_REDUCE = 'triton'  # from the sweep (sweep_kernels.py rmsnorm)
BWD_FROZEN_PERSISTENT = False  # from the sweep (sweep_kernels.py rmsnorm)
DW_REDUCE_COLUMNS, DW_REDUCE_PARTIALS = 32, 32  # _rms_norm_dw_kernel's tile: 128 B of each partial row
# Overrides for benchmarks/sweep_kernels.py, for every hidden size alike (0: the rules above).
FWD_BLOCK_ROWS = FWD_NUM_WARPS = BWD_BLOCK_ROWS = BWD_NUM_WARPS = 0

# The last compiled kernel each launcher ran ("forward", "backward"): its registers, spills and shared
# memory are what bound the programs resident per SM, which the sweep reports beside each time.
last_compiled: dict[str, object] = {}


@triton.jit
def _rstd(sum_of_squares, hidden, eps):
    """1 / sqrt(mean(x**2) + eps), every step correctly rounded: it costs nothing once per row, and an
    approximate rsqrt's last-bit error would be shared by the whole row."""
    mean_square = tl.math.div_rn(sum_of_squares, hidden * 1.0)  # hidden arrives as an int
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(mean_square + eps))


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, hidden, x_row_stride, y_row_stride, eps,
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
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    normed = x * rstd[:, None]
    if GEMMA:
        y = normed * (1.0 + w)[None, :]
    else:
        # Llama rounds the normalised row to the input dtype before the weight multiplies it.
        y = round_to(normed, x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows64 * y_row_stride + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, hidden,
    dy_row_stride, x_row_stride, dx_row_stride, eps,
    DY_COL_STRIDE: tl.constexpr, GEMMA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, SAVED_RSTD: tl.constexpr,
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
    for tile in tl.range(pid, n_tiles, programs, num_stages=STAGES):  # STAGES > 1: next tiles' loads in flight
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy_offsets = rows64 * dy_row_stride + cols[None, :] * DY_COL_STRIDE
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)

        if SAVED_RSTD:  # the forward's value: one reduction over the row below instead of two in series
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        else:
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


@triton.jit
def _rms_norm_dw_kernel(
    partial_ptr, dw_ptr, n_partials, hidden, BLOCK_PARTIALS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """dw[c] = sum over p of partial[p, c] in fp32, rounded once to dw's dtype: one launch where
    torch needs a sum and a cast."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < hidden
    acc = tl.zeros([BLOCK_PARTIALS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_PARTIALS):
        parts = start + tl.arange(0, BLOCK_PARTIALS)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + parts.to(tl.int64)[:, None] * hidden + cols[None, :], mask=mask, other=0.0)
    tl.store(dw_ptr + cols, round_to(tl.sum(acc, axis=0), dw_ptr.dtype.element_ty), mask=col_mask)


def _launch_config(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_ROWS, num_warps): whole rows, several per program when hidden is small."""
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is above the {MAX_HIDDEN} this kernel holds in registers")
    block_h = triton.next_power_of_2(hidden)
    block_rows = max(1, TILE_ELEMENTS // block_h)
    elements = block_h * block_rows
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_h, block_rows, num_warps


def _bwd_launch_config(hidden: int) -> tuple[int, int, int]:
    block_h, block_rows, num_warps = _launch_config(hidden)
    if block_rows == 1 and block_h in BWD_WIDE_TILES:
        block_rows, num_warps = BWD_WIDE_TILES[block_h]
    return block_h, BWD_BLOCK_ROWS or block_rows, BWD_NUM_WARPS or num_warps


def _default_programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, sms * BWD_PROGRAMS_PER_SM))
    return max(1, min(n_tiles, 4))  # interpreter on CPU: a few programs, so the partial sums are exercised


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool, out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y [rows, hidden] of out_dtype, rstd [rows] float32) from x [rows, hidden] (x.stride(1) == 1)
    and weight [hidden] (contiguous). out: where to write y ([rows, hidden] of out_dtype, any row stride,
    column stride 1), else a new tensor."""
    n_rows, hidden = x.shape
    if out is None:
        y = torch.empty((n_rows, hidden), dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be {list(x.shape)} {out_dtype} on {x.device} with unit column stride, got "
                         f"{list(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")  # fmt: skip
    else:
        y = out
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block_h, block_rows, num_warps = _launch_config(hidden)
    block_rows, num_warps = FWD_BLOCK_ROWS or block_rows, FWD_NUM_WARPS or num_warps
    grid = (triton.cdiv(n_rows, block_rows),)
    last_compiled["forward"] = _rms_norm_fwd_kernel[grid](
        x, weight, y, rstd, n_rows, hidden, x.stride(0), y.stride(0), eps,
        GEMMA=gemma, BLOCK_ROWS=block_rows, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return y, rstd


def _sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if BWD_DW_REDUCE == "torch":
        return partial.sum(dim=0).to(dtype)
    if BWD_DW_REDUCE != "triton":
        raise ValueError(f"BWD_DW_REDUCE must be 'torch' or 'triton', got {BWD_DW_REDUCE!r}")
    n_partials, hidden = partial.shape
    dw = torch.empty((hidden,), dtype=dtype, device=partial.device)
    _rms_norm_dw_kernel[(triton.cdiv(hidden, DW_REDUCE_COLUMNS),)](
        partial, dw, n_partials, hidden, BLOCK_PARTIALS=DW_REDUCE_PARTIALS, BLOCK_COLS=DW_REDUCE_COLUMNS,
    )  # fmt: skip
    return dw


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor | None, gemma: bool,
    weight_grad: bool, *, eps: float | None = None, num_programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(dx [rows, hidden] in x's dtype, dw [hidden] in weight's dtype or None when not weight_grad).

    rstd is the forward's [rows] float32 (contiguous), or None to recompute it from x with eps.
    dy.stride(1) must be 1 or 0; x.stride(1) must be 1; weight contiguous."""
    n_rows, hidden = x.shape
    if dy.stride(1) not in (0, 1):
        raise ValueError(f"dy must have a column stride of 0 or 1, got {dy.stride(1)}")
    if rstd is None and eps is None:
        raise ValueError("rms_norm_backward needs the forward's rstd, or eps to recompute it")
    dx = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if weight_grad else None)
    block_h, block_rows, num_warps = _bwd_launch_config(hidden)
    n_tiles = triton.cdiv(n_rows, block_rows)
    stages = BWD_STAGES
    if num_programs:
        programs = min(num_programs, n_tiles)
    elif weight_grad or BWD_FROZEN_PERSISTENT:
        programs = _default_programs(x.device, n_tiles)
    else:  # nothing to accumulate across tiles: one program a tile, as the forward, and no loop to pipeline
        programs, stages = n_tiles, 1
    partial = torch.empty((programs, hidden) if weight_grad else (1,), dtype=torch.float32, device=x.device)
    saved = rstd is not None
    last_compiled["backward"] = _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd if saved else partial, dx, partial, n_rows, hidden,
        dy.stride(0), x.stride(0), dx.stride(0), 0.0 if eps is None else eps,
        DY_COL_STRIDE=dy.stride(1), GEMMA=gemma, WEIGHT_GRAD=weight_grad, SAVED_RSTD=saved,
        BLOCK_ROWS=block_rows, BLOCK_H=block_h, STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
    dw = _sum_partials(partial, weight.dtype) if weight_grad else None
    return dx, dw
