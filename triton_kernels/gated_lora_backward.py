"""The gated MLP's activation backward with three LoRA gradient products folded in (one pass, no extra reads).

In the fused MLP backward (models/lora_autograd.py, stacked gate/up) the activation backward turns
(dHm, G, U) into (dG, dU) and writes Hm over dHm. Right after it, three products each read one of those
[n, I] tensors again, only to reduce it over the tokens to a narrow result:

    Pg = dG^T Hg     [I, r_g]   Hg = X A_g^T (saved from the forward):  dB_g = s_g Pg
    Pu = dU^T Hu     [I, r_u]   Hu = X A_u^T:                            dB_u = s_u Pu
    Pd = dHd^T Hm    [r_d, I]   dHd = s_d dOut B_d:                      dA_d = Pd

At 2 x 2,048 tokens of the 8B shape those reads are 352 MB a layer (~0.12 ms on an H100's 3 TB/s, ~4 ms a
step). Here each program owns a strip of BLOCK_N columns of I and walks the rows (all of them, or a
1/SPLITS share of them), so it holds the whole reduction for its columns: the products cost only the
narrow operands' loads (Hg, Hu, dHd: r columns each) and a few tensor-core dots per tile, and no atomics
(results are deterministic). With SPLITS > 1 each split writes its own fp32 partial and the caller sums them.

Numbers: dG, dU and Hm are rounded to the storage dtype before they enter the dots, so the dots see what
a matmul of the stored tensors would see; accumulation is fp32 (as cuBLAS's). fp32 inputs multiply in
full fp32 ("ieee", not tf32). The elementwise part is the activation backward's own code
(swiglu._activation_and_slope), so dG, dU and Hm are bit for bit those of swiglu_backward(write_h=True).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from loraforge.triton_kernels._rounding import INTERPRETED, round_to
from loraforge.triton_kernels.swiglu import ACTIVATIONS, _activation_and_slope

# Tile and launch shape. Not yet tuned on a GPU (written without one): benchmarks/bench_gated_lora_backward.py
# --sweep times the alternatives and prints the best.
BLOCK_M = 32  # rows per step of the walk
BLOCK_N = 64  # columns of I per program
NUM_WARPS = 4
PROGRAMS_PER_SM = 4


@triton.jit
def _load_narrow(ptr, rows, row_mask, row_stride, RANK, PADDED: tl.constexpr):
    """[BLOCK_M, PADDED] of a narrow [n, RANK] operand (unit column stride), zeros beyond RANK and n."""
    ranks = tl.arange(0, PADDED)
    mask = row_mask[:, None] & (ranks < RANK)[None, :]
    return tl.load(ptr + rows[:, None] * row_stride + ranks[None, :], mask=mask, other=0.0)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in fp32. FP32: in full fp32 ("ieee", not tf32), for fp32 inputs, and under the
    interpreter, whose dot multiplies 16-bit floats as their raw bits (16-bit values are exact in fp32, so
    the result is that of the tensor cores' 16-bit dot up to summation order)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _gated_lora_bwd_kernel(
    dh_ptr, gate_ptr, up_ptr, hg_ptr, hu_ptr, ghd_ptr, pg_ptr, pu_ptr, pd_ptr,
    n_rows, n_cols, rows_per_split, dh_rs, gate_rs, up_rs, hg_rs, hu_rs, ghd_rs, RG, RU, RD,
    ACTIVATION: tl.constexpr, PG: tl.constexpr, PU: tl.constexpr, PD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_mask = cols < n_cols
    split = tl.program_id(1)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, n_rows)
    acc_g = tl.zeros((BN, PG), dtype=tl.float32)
    acc_u = tl.zeros((BN, PU), dtype=tl.float32)
    acc_d = tl.zeros((PD, BN), dtype=tl.float32)
    dtype = dh_ptr.dtype.element_ty
    for m0 in range(row_start, row_end, BM):
        rows = (m0 + tl.arange(0, BM)).to(tl.int64)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dh_at = dh_ptr + rows[:, None] * dh_rs + cols[None, :]
        gate_at = gate_ptr + rows[:, None] * gate_rs + cols[None, :]
        up_at = up_ptr + rows[:, None] * up_rs + cols[None, :]
        dh = tl.load(dh_at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_at, mask=mask, other=0.0).to(tl.float32)
        a, slope = _activation_and_slope(g, ACTIVATION)
        # Outside the rows and columns every loaded value is 0, so dg, du and hm are 0 there too.
        dg = round_to(dh * u * slope, dtype)
        du = round_to(dh * a, dtype)
        hm = round_to(a * u, dtype)
        tl.store(gate_at, dg, mask=mask)  # over G, U and dHm: all three were loaded above
        tl.store(up_at, du, mask=mask)
        tl.store(dh_at, hm, mask=mask)
        hg = _load_narrow(hg_ptr, rows, row_mask, hg_rs, RG, PG)
        hu = _load_narrow(hu_ptr, rows, row_mask, hu_rs, RU, PU)
        ghd = _load_narrow(ghd_ptr, rows, row_mask, ghd_rs, RD, PD)
        acc_g += _dot(tl.trans(dg), hg, FP32_DOT)
        acc_u += _dot(tl.trans(du), hu, FP32_DOT)
        acc_d += _dot(tl.trans(ghd), hm, FP32_DOT)
    cols64 = cols.to(tl.int64)
    split64 = split.to(tl.int64)
    ranks_g = tl.arange(0, PG)
    at_g = pg_ptr + split64 * n_cols * RG + cols64[:, None] * RG + ranks_g[None, :]
    tl.store(at_g, acc_g, mask=col_mask[:, None] & (ranks_g < RG)[None, :])
    ranks_u = tl.arange(0, PU)
    at_u = pu_ptr + split64 * n_cols * RU + cols64[:, None] * RU + ranks_u[None, :]
    tl.store(at_u, acc_u, mask=col_mask[:, None] & (ranks_u < RU)[None, :])
    ranks_d = tl.arange(0, PD)
    at_d = pd_ptr + split64 * RD * n_cols + ranks_d[:, None].to(tl.int64) * n_cols + cols64[None, :]
    tl.store(at_d, acc_d, mask=(ranks_d < RD)[:, None] & col_mask[None, :])


def _padded(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot wants dimensions of 16 or more


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Row splits so that there are about PROGRAMS_PER_SM programs per SM (the walk needs several in flight
    per SM to keep memory busy), never fewer than 8 row steps per split (partials cost an fp32 write each)."""
    programs = triton.cdiv(n_cols, BLOCK_N)
    sms = _sm_count(device)
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, programs), n_rows // (8 * BLOCK_M)))


def gated_lora_backward(grad_h, gate, up, activation: str, h_gate, h_up, grad_hd):
    """In place: dG over gate, dU over up, Hm = act(G) * U over grad_h (all [n, I], unit last stride, any
    row stride). Returns fp32 (dG^T h_gate [I, r_g], dU^T h_up [I, r_u], grad_hd^T Hm [r_d, I]); h_gate,
    h_up, grad_hd are [n, r] with a unit last stride, in grad_h's dtype."""
    n_rows, n_cols = gate.shape
    ranks = (h_gate.shape[1], h_up.shape[1], grad_hd.shape[1])
    splits = _splits(n_rows, n_cols, gate.device)
    f32 = {"dtype": torch.float32, "device": gate.device}
    pg = torch.empty((splits, n_cols, ranks[0]), **f32)
    pu = torch.empty((splits, n_cols, ranks[1]), **f32)
    pd = torch.empty((splits, ranks[2], n_cols), **f32)
    if n_rows * n_cols:
        rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), BLOCK_M) * BLOCK_M
        grid = (triton.cdiv(n_cols, BLOCK_N), splits)
        _gated_lora_bwd_kernel[grid](
            grad_h, gate, up, h_gate, h_up, grad_hd, pg, pu, pd,
            n_rows, n_cols, rows_per_split, grad_h.stride(0), gate.stride(0), up.stride(0),
            h_gate.stride(0), h_up.stride(0), grad_hd.stride(0), *ranks,
            ACTIVATION=ACTIVATIONS[activation], PG=_padded(ranks[0]), PU=_padded(ranks[1]), PD=_padded(ranks[2]),
            BM=BLOCK_M, BN=BLOCK_N, FP32_DOT=INTERPRETED or gate.dtype == torch.float32, num_warps=NUM_WARPS,
        )  # fmt: skip
    else:
        pg.zero_(), pu.zero_(), pd.zero_()
    if splits == 1:
        return pg[0], pu[0], pd[0]
    return pg.sum(0), pu.sum(0), pd.sum(0)
