"""Triton kernels for cross-entropy over large vocabularies, and their launchers (no autograd here:
see loraforge/ops/cross_entropy.py for the op, its reference and the derivation).

One program per row. A row of V logits is read in blocks of BLOCK in its own dtype (bf16/fp16/fp32)
and turned into fp32 z = softcap * tanh(logit_scale * x / softcap) (or z = logit_scale * x without a
cap); the log-sum-exp is accumulated online (running max, running sum rescaled when the max grows),
so no fp32 copy of the logits ever exists. Rows whose target is the ignore index skip the reading.

    forward:   loss_row = lse - z[target]                (0 for an ignored row; lse stored as 0 there)
    backward:  dx_j = coef * (exp(z_j - lse) - [j == target]) * dz_j/dx_j   (0 for an ignored row)
               dz_j/dx_j = logit_scale * (1 - tanh^2)   with a cap, logit_scale without

`coef` is the upstream gradient of the row's loss, read from device memory (a scalar shared by all
rows, or one per row), so launching never waits for the device. The jit helpers below are shared
with the fused linear cross-entropy kernel (triton_kernels/fused_linear_cross_entropy.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 8192  # elements of a row in flight per program; 32 fp32 values a thread at 8 warps


def block_size(n_cols: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(n_cols))


def num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


# ---------------------------------------------------------------------------------------------
# Shared jit helpers.


@triton.jit
def _tanh_and_complement(y):
    """tanh(y) and 1 - |tanh(y)|, both accurate to a few fp32 ulps.

    libdevice's tanh does not run under the interpreter, so tanh is built from exp: for |y| >= 0.25,
    tanh|y| = (1 - e) / (1 + e) with e = exp(-2|y|), and 1 - tanh|y| = 2e / (1 + e) keeps its digits
    where tanh nears 1 (the derivative 1 - tanh^2 = (1 - |t|)(1 + |t|) needs them). Below 0.25,
    1 - e cancels, so the odd Taylor series to y^9 (next term under 2e-9 relative there) takes over.
    """
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)  # one division for both
    big = (1.0 - e) * r
    big_complement = 2.0 * e * r
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    use_small = a < 0.25
    t_abs = tl.where(use_small, small, big)
    complement = tl.where(use_small, 1.0 - small, big_complement)
    return tl.where(y < 0, -t_abs, t_abs), complement


@triton.jit
def _transformed_logits(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x) in fp32, and dz/dx."""
    scaled = x.to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        t, complement = _tanh_and_complement(scaled * (1.0 / softcap))  # a scalar reciprocal, not a division each
        z = softcap * t
        dz_dx = logit_scale * complement * (2.0 - complement)  # 1 - t^2 = (1 - |t|)(1 + |t|)
    else:
        z = scaled
        dz_dx = tl.zeros_like(scaled) + logit_scale
    return z, dz_dx


@triton.jit
def _row_logsumexp(row_ptr, n_cols, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """log(sum_j exp(z_j)) of one row, read once in blocks, accumulated online in fp32."""
    running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0)
        z, _ = _transformed_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 0))
        # A row may open with whole blocks of -inf (masked tokens): shift by 0 then, not by -inf,
        # so that exp(-inf - -inf) never makes a nan.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), 0)
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def _target_logit(row_ptr, target, n_cols, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z[target], transformed exactly as the row's blocks are (same rounding). A target outside
    [0, n_cols) reads nothing (the op's target check, whose verdict the host reads after the launch,
    raises then), so a bad target can never make the kernel read out of bounds."""
    in_range = (target >= 0) & (target < n_cols)
    x = tl.load(row_ptr + tl.where(in_range, target, 0), mask=in_range, other=0.0)
    z, _ = _transformed_logits(x, logit_scale, softcap, HAS_SOFTCAP)
    return z


@triton.jit
def _round_to(x, out_dtype: tl.constexpr):
    """x (fp32) in out_dtype, rounded to nearest even. bf16 is rounded by hand: the interpreter's
    fp32 -> bf16 cast truncates (twice the error), and the tests run there; on a GPU the few integer
    operations give the same bits as the hardware conversion and cost nothing in a memory-bound loop."""
    if out_dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000  # the carry could turn some nan payloads into inf
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(is_nan, x.to(tl.bfloat16), rounded)
    else:
        return x.to(out_dtype)


@triton.jit
def _store_row_grad(in_row_ptr, out_row_ptr, n_cols, target, lse, coef, logit_scale, softcap,
                    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """out_j = coef * (softmax_j - [j == target]) * dz_j/dx_j, in out's dtype. in and out may be the
    same row: each element is read before it is written, by the same program."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(in_row_ptr + cols, mask=mask, other=0.0)
        z, dz_dx = _transformed_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        d_z = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        grad = d_z * (coef * dz_dx)
        tl.store(out_row_ptr + cols, _round_to(grad, out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_zeros(out_row_ptr, n_cols, BLOCK: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        zeros = tl.zeros([BLOCK], tl.float32).to(out_row_ptr.dtype.element_ty)
        tl.store(out_row_ptr + cols, zeros, mask=cols < n_cols)


# ---------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _cross_entropy_fwd_kernel(logits_ptr, logits_row_stride, targets_ptr, loss_ptr, lse_ptr, n_cols,
                              ignore_index, logit_scale, softcap,
                              HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 at 16k tokens x 128k vocab
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        lse = _row_logsumexp(row_ptr, n_cols, logit_scale, softcap, HAS_SOFTCAP, BLOCK)
        z_target = _target_logit(row_ptr, target, n_cols, logit_scale, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - z_target)
        tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, targets_ptr, lse_ptr,
                              coef_ptr, coef_stride, n_cols, ignore_index, logit_scale, softcap,
                              HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    in_row_ptr = logits_ptr + row * logits_row_stride
    out_row_ptr = grad_ptr + row * grad_row_stride
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        _store_row_zeros(out_row_ptr, n_cols, BLOCK)
    else:
        coef = tl.load(coef_ptr + row * coef_stride)
        lse = tl.load(lse_ptr + row)
        _store_row_grad(in_row_ptr, out_row_ptr, n_cols, target, lse, coef, logit_scale, softcap, HAS_SOFTCAP, BLOCK)


# ---------------------------------------------------------------------------------------------
# Launchers. They take tensors already checked by the op (2-D logits with unit column stride, int64
# targets on the same device) and run under TRITON_INTERPRET=1 on CPU tensors as well.


def _softcap_args(softcap: float) -> tuple[float, bool]:
    return (float(softcap) if softcap else 1.0), bool(softcap)


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int, logit_scale: float,
                          softcap: float, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-row losses and log-sum-exps, both fp32 [N] (0 on ignored rows)."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, lse
    block = block or block_size(n_cols)
    cap, has_cap = _softcap_args(softcap)
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), targets, loss, lse, n_cols, ignore_index, float(logit_scale), cap,
        HAS_SOFTCAP=has_cap, BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    return loss, lse


def cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                           out: torch.Tensor, *, ignore_index: int, logit_scale: float, softcap: float,
                           block: int | None = None) -> torch.Tensor:  # fmt: skip
    """Writes d loss / d logits into `out` (any float dtype, unit column stride; `out` may be `logits`
    itself). coef: fp32, 0-d (one upstream gradient for all rows) or [N] (one per row)."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return out
    block = block or block_size(n_cols)
    cap, has_cap = _softcap_args(softcap)
    coef_stride = coef.stride(0) if coef.dim() else 0
    _cross_entropy_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), out, out.stride(0), targets, lse, coef, coef_stride, n_cols, ignore_index,
        float(logit_scale), cap, HAS_SOFTCAP=has_cap, BLOCK=block, num_warps=num_warps(block),
    )  # fmt: skip
    return out
