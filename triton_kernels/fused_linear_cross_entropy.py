"""The Triton part of the fused linear cross-entropy: one kernel that takes a chunk of logits
(X_c @ W^T, made by cuBLAS outside), computes each row's loss and overwrites the row with
d loss / d logits, so the chunk buffer is reused for the gradient and no [N, V] tensor ever exists.
The matmuls and the chunk loop live in loraforge/ops/fused_linear_cross_entropy.py; no autograd here.

Per row (one program): pass 1 reads the row for the online log-sum-exp (and the target logit);
pass 2 reads it again (mostly from L2: a 128k-vocab bf16 row is 256 KB) and writes
coef * (softmax - onehot) * dz/dx over it. Ignored rows are only zeroed. See
triton_kernels/cross_entropy.py for the helpers and the math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from loraforge.triton_kernels.cross_entropy import (
    _row_logsumexp,
    _softcap_args,
    _store_row_grad,
    _store_row_zeros,
    _target_logit,
    num_warps,
)

# Row tile of this kernel: 4,096 logits a pass with 4 warps (32 a thread) read a 128k-vocab bf16 chunk
# 8% faster than the standalone kernels' 8,192 with 16 warps (236 against 256 us for 1,024 x 128,256 on
# an H200, 78% of the copy rate for its 3 passes; sweep_kernels.py ce_row, in results/sweep_kernels_h200.json):
# smaller programs keep more rows in flight per SM.
FUSED_MAX_BLOCK = 4096


def fused_block_size(n_cols: int) -> int:
    return min(FUSED_MAX_BLOCK, triton.next_power_of_2(n_cols))


@triton.jit
def _fused_linear_cross_entropy_fwd_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, coef_ptr, n_cols,
                                           ignore_index, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr,
                                           WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            _store_row_zeros(row_ptr, n_cols, BLOCK)
    else:
        lse = _row_logsumexp(row_ptr, n_cols, logit_scale, softcap, HAS_SOFTCAP, BLOCK)
        # (read before pass 2 overwrites the row)
        z_target = _target_logit(row_ptr, target, n_cols, logit_scale, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - z_target)
        if WRITE_GRAD:
            coef = tl.load(coef_ptr)
            _store_row_grad(row_ptr, row_ptr, n_cols, target, lse, coef, logit_scale, softcap, HAS_SOFTCAP, BLOCK)


def cross_entropy_loss_and_grad_(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                                 loss_out: torch.Tensor, *, ignore_index: int, logit_scale: float, softcap: float,
                                 write_grad: bool = True, block: int | None = None,
                                 warps: int | None = None) -> None:  # fmt: skip
    """Per-row losses into loss_out (fp32 [n]); with write_grad, d loss_row / d logits * coef over
    `logits` (a chunk [n, V] with unit column stride). coef: 0-d fp32 on the device."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block = block or fused_block_size(n_cols)
    cap, has_cap = _softcap_args(softcap)
    _fused_linear_cross_entropy_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss_out, coef, n_cols, ignore_index, float(logit_scale), cap,
        HAS_SOFTCAP=has_cap, WRITE_GRAD=write_grad, BLOCK=block, num_warps=warps or min(4, num_warps(block)),
    )  # fmt: skip
