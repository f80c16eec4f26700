"""Several LoRA projections of the same input as one: Q/K/V, and the MLP's gate/up.

For projections i = 1..k of one X [n, in], with NF4 bases W_i [o_i, in], adapters A_i [r_i, in],
B_i [o_i, r_i] and scalings s_i, stack

    W = [W_1; ...; W_k]  [O, in]     A = [A_1; ...; A_k]  [R, in]     Bd = blockdiag(s_1 B_1, ..., s_k B_k)  [O, R]

so that Y = [Y_1 | ... | Y_k] = X W^T + (X A^T) Bd^T in three matmuls instead of 3k, and, given
dY = [dY_1 | ... | dY_k],

    dH = dY Bd                 [n, R]    (block i: s_i dY_i B_i, what each projection's rule gives)
    dX = dY W + dH A           [n, in]
    dA = dH^T X                [R, in]   (rows of block i: dA_i)
    dB = (dY^T (X A^T))        [O, R]    (diagonal block i times s_i: dB_i)

in five instead of 5k. The off-diagonal blocks of dB are computed and dropped: O R n multiply-adds,
a few GFLOP, on a product that reads dY once instead of k times. The training step of an 8B model is
bound by the host's Python and launch time, so fewer, larger calls are faster on both sides.

The NF4 bases are dequantized straight into row slices of one W buffer (no copy); A and Bd are built
once per optimizer step (cached, keyed by the adapters' version counters and the optimizer step count). Only groups whose bases
are all NF4 are stacked (with biases on all or none: Qwen2's q/k/v); 16-bit bases would need a copy of the weights, and keep the per-projection
path (lora_autograd).
"""

from __future__ import annotations

import os
import weakref

import torch

# lora_autograd imports this module at its top; by the time a function here runs, both are loaded.
# (A module-level import, not one inside the functions: those cost ~1.4 us a call.)
from loraforge.models import lora_autograd
from loraforge.models.base_weight import base_bias, dense_weight, dequantize_into
from loraforge.models.identity_cache import IdentityCache


def stackable(projs) -> bool:
    """Whether a group of LoRAProjections can run stacked: NF4 bases, with biases on all or none of them
    (Qwen2's q/k/v have one), and adapters on all or on none of them."""
    with_bias, with_adapter = projs[0].has_bias, projs[0].A is not None
    return all(p.nf4 and p.has_bias == with_bias and (p.A is not None) == with_adapter for p in projs)


def out_sizes(projs) -> list[int]:
    return [int(p.out_features) for p in projs]


def stacked_weight(projs, dtype: torch.dtype, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """[W_1; ...; W_k] in `dtype`, each NF4 weight dequantized into its rows of one buffer (`out` when
    given: [O, in], contiguous or the first `in` columns of a wider buffer)."""
    sizes = out_sizes(projs)
    weight = torch.empty((sum(sizes), int(projs[0].base.in_features)), dtype=dtype, device=device) if out is None \
        else out  # fmt: skip
    for proj, rows in zip(projs, weight.split(sizes)):  # row blocks
        dequantize_into(proj.base, rows)
    return weight


# Inner-dimension concatenation (stacked_forward_h): where the output is at least this many times as wide
# as the input, Y = [X | H] [W | Bd]^T in one matmul instead of Y = X W^T, then Y += H Bd^T. The second
# product reads and writes all of Y: for the 8B shape's gate/up (Y [4,096, 28,672]) a 0.24 ms memory-bound
# pass (H100 profile of 2026-12-07: 64 a step, 15.5 ms), against a copy of X into [X | H] (n x in) and
# R more inner columns in the big matmul. At a ratio of 1 the copy moves as many bytes as the pass it
# replaces (Q/K/V at 1.5 and the output projection at 1 take it too; a single NF4 projection runs as a
# stack of one, lora_autograd._forward_h). The down projection (0.29) would need a copy of Hm 3.5x the
# pass saved; instead the fused MLP writes Hm straight into a wide buffer (wide_input, at ratios <= 1).
#
# Y is also rounded once instead of twice, and that matters for training: in Y = round(round(X W^T) +
# H Bd^T) every LoRA contribution smaller than half a 16-bit ulp of X W^T is lost, which is most of
# them early in training (bf16 keeps 8 bits: |delta| < 0.2% of |Y|). PEFT's bf16 forward and Unsloth's do
# that. The 8B benchmark shows it (H100, 2026-12-07, results/train_step.csv, the same 7 steps from the
# same weights): loss 12.567 -> 11.380 with two roundings (Unsloth: 11.379), 11.262 with the
# concatenation of gate/up alone (ratio 3 then), 11.163 in fp32.
# LORAFORGE_CONCAT_MIN_RATIO overrides the threshold (a huge value turns the concatenation off).
CONCAT_MIN_RATIO = float(os.environ.get("LORAFORGE_CONCAT_MIN_RATIO", "1"))


def _concat_pad(rank: int) -> int:
    """The adapter columns of [X | H] and [W | Bd], padded with zeros to a multiple of 8 (rows of 16-byte
    multiples in 16-bit dtypes, which the dequantization kernel and cuBLAS want)."""
    return -(-rank // 8) * 8


def concatenates(projs, in_features: int) -> bool:
    """Whether stacked_forward_h takes the concatenation for these projections (with adapters) at this input
    width: their stacked output at least CONCAT_MIN_RATIO times as wide."""
    return projs[0].A is not None and sum(out_sizes(projs)) >= CONCAT_MIN_RATIO * in_features


def wide_input(n: int, projs, like: torch.Tensor) -> torch.Tensor:
    """An [n, in + R padded] buffer whose first `in` columns a producer can write X into, so that
    stacked_forward_h(projs, buffer[:, :in], wide=buffer) concatenates without copying X."""
    rank = sum(p.A.shape[0] for p in projs)
    return like.new_empty((n, int(projs[0].base.in_features) + _concat_pad(rank)))


def _forward_concat(projs, x: torch.Tensor, a: torch.Tensor, bd: torch.Tensor, bias,
                    wide: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(Y, H) as stacked_forward_h returns them, Y from one matmul of [X | H] and [W | Bd] (CONCAT_MIN_RATIO).
    wide: [X | free columns] already (wide_input), X its first columns: no copy of X."""
    n, k = x.shape
    rank, width = a.shape[0], k + _concat_pad(a.shape[0])
    if wide is None:
        x_ext = x.new_empty((n, width))
        x_ext[:, :k] = x
    else:
        x_ext = wide
    h = torch.mm(x, a.t())
    x_ext[:, k : k + rank] = h
    x_ext[:, k + rank :].zero_()
    w_ext = x.new_empty((bd.shape[0], width))
    stacked_weight(projs, x.dtype, x.device, out=w_ext[:, :k])
    w_ext[:, k : k + rank] = bd
    w_ext[:, k + rank :].zero_()
    y = x_ext @ w_ext.t() if bias is None else torch.addmm(bias, x_ext, w_ext.t())
    return y, h


_STACKED_ADAPTERS = IdentityCache()  # first A of a group -> (key, A, Bd)


def _adapters_key(projs, dtype: torch.dtype) -> list:
    """What the stacked adapters are made of: each A's and B's storage and version, the scalings, and the
    optimizer step count (see adapter_in: torch's fused AdamW bumps no version)."""
    key = [dtype, lora_autograd.optimizer_steps()]
    for p in projs:
        A, B = p.A, p.B
        key += (A._version, A.data_ptr(), B._version, B.data_ptr(), p.scaling)
    return key


def stacked_adapters(projs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [R, in], Bd [O, R]) in `dtype`, rebuilt only when an adapter changed (an optimizer step)."""
    key = _adapters_key(projs, dtype)
    cached = _STACKED_ADAPTERS.get(projs[0].A)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        a = torch.cat([p.A for p in projs]).to(dtype)
        # s_i B_i in B's dtype, then rounded once to `dtype`, as a copy into a zeroed `dtype` buffer would
        # (block_diag: one call for the zeros and the block copies, ~half the host time of doing them here).
        bd = torch.block_diag(*[p.B * p.scaling for p in projs]).to(dtype)
    if not torch.compiler.is_compiling() and all(type(p.A) in (torch.Tensor, torch.nn.Parameter) for p in projs):
        _STACKED_ADAPTERS[projs[0].A] = (key, a, bd)
    return a, bd


def release_adapter_caches(params) -> None:
    """Forget the compute-dtype copies made of these adapter weights (lora_autograd.adapter_in's casts and
    the stacked adapters keyed by them). The offloaded checkpoint calls it with a layer's parameters once
    that layer's backward is done: the copies made in its forward served its recompute and backward and
    are stale after the optimizer step anyway. Without this all layers' copies (~125 MB of bf16 at r=16 on
    an 8B model) stayed alive to the end of backward, where the step's memory peaks."""
    for param in params:
        lora_autograd.ADAPTER_CASTS.pop(param)
        _STACKED_ADAPTERS.pop(param)


# The RMSNorm in front of Q/K/V and of gate/up writes its output with rows padded for the adapter
# columns (ops/rmsnorm.py, row_padding), so that the concatenation finds X already in the first columns
# of an [X | free columns] buffer and copies nothing: a [n, in] copy saved per stacked product (3 a
# layer a step: forward Q/K/V and gate/up, and gate/up's rerun; 67 MB each at 8B, 2 x 2,048 tokens).
# The norm does not know its readers: it offers each output here (offer_norm_output) with a place to
# note the padding wanted, and the projections that read it note the padding their concatenation needs
# (0 if they do not concatenate), which the norm uses from its next call on; the first call copies as
# before. A padded output is an ordinary tensor with strided rows: any other reader gets the same
# values. Off by default (LORAFORGE_NORM_INTO_WIDE=1 turns it on): measured on the 8B step (H100,
# 2026-12-07, 9d391fb, rows in results/train_step.csv) it took 4.5 ms of GPU work off the step, as
# expected, but made the step slower, 405.9 against 367.8 ms in one call and 355.2 against 343.3 ms in
# two profiled runs: the forward's host time grew from 166.5 to 206.7 ms (every fused forward slower,
# the untouched output projection too), so the host fell behind the GPU. Why is not yet known
# (profiles/train_step_profile_h100_9d391fb_norm_into_wide*.json).
NORM_INTO_WIDE = os.environ.get("LORAFORGE_NORM_INTO_WIDE", "0") == "1"
ROW_PADDING = "_loraforge_row_padding"  # in a norm's instance dict: the row padding its readers want
_offered: tuple | None = None  # (weak reference to the last norm output offered, that norm's instance dict)


def offer_norm_output(y: torch.Tensor, norm_state: dict) -> None:
    """A norm's output, offered to the stacked projection that may read it next (see above)."""
    global _offered
    _offered = (weakref.ref(y), norm_state)


def _wide_from_norm(x: torch.Tensor, projs, concatenated: bool) -> torch.Tensor | None:
    """When X [n, in] is the offered norm output (or its flat view): notes on the norm the padding this
    product wants, and returns [X | padding] as one [n, in + padding] tensor over X's own storage when X
    already has it (else None: the caller copies)."""
    global _offered
    y = _offered[0]()
    if y is None or not (x is y or x._base is y):
        return None
    norm_state = _offered[1]
    _offered = None
    padding = _concat_pad(sum(p.A.shape[0] for p in projs)) if concatenated and projs[0].A is not None else 0
    if norm_state.get(ROW_PADDING, 0) != padding:
        norm_state[ROW_PADDING] = padding  # its next output is laid out for this product
    n, k = x.shape
    width = k + padding
    if padding == 0 or x.stride() != (width, 1):
        return None
    offset, storage = x.storage_offset(), x.untyped_storage()
    if storage.nbytes() < (offset + n * width) * x.element_size():
        return None
    return x.new_empty(0).set_(storage, offset, (n, width), (width, 1))


def stacked_forward_h(projs, x: torch.Tensor, wide: torch.Tensor | None = None):
    """(Y = [Y_1 | ... | Y_k] [n, O], H = X A^T [n, R] or None without adapters) for X [n, in] (rows with a
    unit last stride). H is what stacked_backward's dB needs: kept from here, it is not recomputed from X
    there. Wide outputs (CONCAT_MIN_RATIO) take one matmul over the concatenated inner dimension, and so
    does any X that lies in a `wide` buffer (wide_input: X = wide[:, :in]), at any ratio, or that a norm
    wrote with padded rows (_wide_from_norm)."""
    # frozen biases: added in the matmul's epilogue
    bias = torch.cat([base_bias(p.base) for p in projs]).to(x.dtype) if projs[0].has_bias else None
    concatenated = wide is not None or concatenates(projs, x.shape[1])
    if wide is None and _offered is not None:
        wide = _wide_from_norm(x, projs, concatenated)
    if concatenated:
        return _forward_concat(projs, x, *stacked_adapters(projs, x.dtype), bias, wide)
    weight = stacked_weight(projs, x.dtype, x.device)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    del weight
    h = None
    if projs[0].A is not None:
        a, bd = stacked_adapters(projs, x.dtype)
        h = x @ a.t()
        y.addmm_(h, bd.t())
    return y, h


def stacked_backward(projs, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor | None = None,
                     weight_at_once: bool = True, h: torch.Tensor | None = None):  # fmt: skip
    """(dX [n, in] (accumulated into dx when given), [dA_i], [dB_i]) from dY [n, O]. h: X A^T from
    stacked_forward_h (recomputed from X when not given).

    weight_at_once=False forms dY W one base at a time (dY_i W_i summed, each W_i freed before the next
    is dequantized): the MLP's gate/up backward is where a layer's backward peaks, and the stacked
    [2 I, H] weight alive there costs one [I, H] more (117 MB for the 8B shape) than needed. Two
    [n, I] x [I, H] products are as efficient as one [n, 2 I] x [2 I, H]; it costs one launch."""
    sizes = out_sizes(projs)
    if weight_at_once:
        w = stacked_weight(projs, dy.dtype, dy.device)
        grad_x = dy @ w if dx is None else dx.addmm_(dy, w)
        del w
    else:
        grad_x = dx
        # column blocks of dY: strided rows, which cuBLAS takes as they are
        for proj, dy_i in zip(projs, dy.split(sizes, dim=1)):
            w = dense_weight(proj.base, dy.dtype)
            grad_x = dy_i @ w if grad_x is None else grad_x.addmm_(dy_i, w)
            del w
    if projs[0].A is None:
        return grad_x, [None] * len(projs), [None] * len(projs)
    a, bd = stacked_adapters(projs, dy.dtype)
    grad_h = dy @ bd
    # The adapters' gradients straight in their own dtype (fp32 under PEFT: see adapter_grad).
    grad_b_all = lora_autograd.adapter_grad(dy.t(), x @ a.t() if h is None else h, projs[0].B.dtype)
    grad_a_all = lora_autograd.adapter_grad(grad_h.t(), x, projs[0].A.dtype)
    grad_x.addmm_(grad_h, a)
    grads_a, grads_b = per_projection_grads(projs, grad_a_all, grad_b_all)
    return grad_x, grads_a, grads_b


def per_projection_grads(projs, grad_a_all: torch.Tensor, grad_b_all: torch.Tensor):
    """([dA_i], [dB_i]) from the gradients of the stacked A [R, in] and of the block-diagonal Bd [O, R]
    (scalings not applied): dA_i are row blocks of the first (contiguous views, no copy), dB_i the
    diagonal blocks of the second times s_i, each in its adapter's dtype."""
    grads_a, grads_b = [], []
    ranks = [p.A.shape[0] for p in projs]
    col = 0
    for proj, grad_a, rows_b, rank in zip(projs, grad_a_all.split(ranks), grad_b_all.split(out_sizes(projs)), ranks):
        grads_a.append(lora_autograd.cast(grad_a, proj.A.dtype))
        grads_b.append(lora_autograd.cast(rows_b.narrow(1, col, rank) * proj.scaling, proj.B.dtype))
        col += rank
    return grads_a, grads_b
