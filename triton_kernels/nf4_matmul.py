"""Triton kernel: Y = X W^T for a few rows of X (decoding: one token per sequence, a batch of up to 16)
with W in bitsandbytes' NF4 layout, double-quantized, dequantized in registers and never written out.

At decode the product is bound by reading W: dequantizing W to bf16 first writes 2 bytes an element and
the matmul reads them back, 4.5 bytes an element moved against the 0.5 (+ statistics) read here.

Layout (bitsandbytes): W [N, K] row-major, flattened, two codes a byte (the first element in the high
nibble); quantization blocks of `BLOCKSIZE` consecutive elements, each with an 8-bit absmax index
into `code2` scaled by the fp32 absmax of its group of BLOCKSIZE2 blocks, plus `offset`:

    absmax_b = code2[q_b] * absmax2[b // BLOCKSIZE2] + offset       (fp32; a multiply, then an add)
    W_i      = (levels[code_i] * absmax_{i // BLOCKSIZE}) -> X's dtype

the same fp32 operations, in the same order, as loraforge's dequantize (bit-exact with bitsandbytes),
so each W element here equals the dequantized one; only the matmul's summation order differs.

One program per BLOCK_N rows of W (columns of Y), looping over K; X is loaded as a [16, BLOCK_K] tile
(rows past M masked to 0) and multiplied with the tile of W on the tensor cores (tl.dot).
Requires K % BLOCK_K == 0 and BLOCK_K % BLOCKSIZE == 0, which the launcher checks.

Status: correct (tests, CPU and H200) but not fast yet, so nothing calls it: on the H200 (2026-12-03,
results/nf4_matmul.csv) 8 x 14336 x 4096 took 463 us against 75 us for dequantize + cuBLAS and 66 us for
bitsandbytes' matmul_4bit, with 14 us to read the codes once. Suspects: the per-element gather of the
16 levels and of the absmax, int64 index arithmetic per element, and too few programs along N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from loraforge.triton_kernels.cross_entropy import _round_to

MAX_ROWS = 16  # rows of X this kernel serves (one tl.dot tile); more go through dequantize + matmul


@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, levels_ptr, out_ptr,
                       M, N, K, stride_xm, stride_om,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows_w = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W = columns of Y
    w_mask = rows_w < N
    rows_x = tl.arange(0, 16)
    x_mask = rows_x < M
    half_k = tl.arange(0, BLOCK_K // 2)
    offset = tl.load(offset_ptr)
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # The tile's codes: [BLOCK_N, BLOCK_K // 2] bytes, high nibble first.
        byte_index = rows_w[:, None].to(tl.int64) * (K // 2) + (k0 // 2 + half_k)[None, :]
        packed = tl.load(packed_ptr + byte_index, mask=w_mask[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed >> 4, packed & 15), (BLOCK_N, BLOCK_K))
        levels = tl.load(levels_ptr + codes)
        # One absmax per BLOCKSIZE elements of a row: [BLOCK_N, BLOCK_K // BLOCKSIZE].
        blocks = (rows_w[:, None].to(tl.int64) * K + k0) // BLOCKSIZE + tl.arange(0, BLOCK_K // BLOCKSIZE)[None, :]
        q = tl.load(qabsmax_ptr + blocks, mask=w_mask[:, None], other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=w_mask[:, None], other=0.0)
        absmax = absmax + offset
        w = tl.reshape(tl.reshape(levels, (BLOCK_N, BLOCK_K // BLOCKSIZE, BLOCKSIZE)) * absmax[:, :, None],
                       (BLOCK_N, BLOCK_K))  # fmt: skip
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_x[:, None] * stride_xm + cols[None, :], mask=x_mask[:, None], other=0.0)
        w = _round_to(w, x_ptr.dtype.element_ty)  # rounded as the dequantized weight is (nearest even)
        if FP32_DOT:  # the interpreter's dot multiplies 16-bit floats as their raw bits
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(x, tl.trans(w))
    out = out_ptr + rows_x[:, None] * stride_om + rows_w[None, :]
    tl.store(out, _round_to(acc, out_ptr.dtype.element_ty), mask=x_mask[:, None] & w_mask[None, :])


def block_k_for(k: int, blocksize: int) -> int | None:
    """The K tile: 256 where it divides K (and is a whole number of quantization blocks), else the
    largest such power of two down to the blocksize; None when none fits."""
    for block in (256, 128, 64):
        if block >= blocksize and block % blocksize == 0 and k % block == 0:
            return block
    return None


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, qabsmax: torch.Tensor, code2: torch.Tensor,
               absmax2: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor, blocksize: int, blocksize2: int,
               n: int, block_n: int = 32) -> torch.Tensor:  # fmt: skip
    """X [M, K] (M <= 16, unit column stride) times W^T, W = the NF4 codes `packed` ([N*K/2] bytes) with
    their nested statistics; returns [M, N] in X's dtype. The op (ops/nf4_matmul.py) checks arguments."""
    m, k = x.shape
    block_k = block_k_for(k, blocksize)
    if m > MAX_ROWS or block_k is None:
        raise ValueError(f"nf4_matmul serves up to {MAX_ROWS} rows and K a multiple of 64 (with the blocksize "
                         f"dividing the K tile); got {m} rows, K={k}, blocksize {blocksize}")  # fmt: skip
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    _nf4_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, packed, qabsmax, code2, absmax2, offset, levels, out, m, n, k, x.stride(0), out.stride(0),
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, BLOCK_N=block_n, BLOCK_K=block_k, FP32_DOT=not x.is_cuda,
        num_warps=4,
    )  # fmt: skip
    return out
