"""Fused linear cross-entropy: from hidden states X [N, H] and an lm_head W [V, H] (+ bias b [V]) to
the cross-entropy loss, without ever holding the [N, V] logits.

    loraforge::fused_linear_cross_entropy(x, weight, bias, targets, ignore_index, logit_scale, softcap,
        reduction, num_items_in_batch, needs_grad_x, needs_grad_weight, needs_grad_bias, grad_weight_fp32,
        chunk_rows) -> (loss fp32, grad_x, grad_weight, grad_bias)

Definition: logits = X W^T + b, then loraforge::cross_entropy of the logits (ops/cross_entropy.py:
logit scaling, softcapping, ignore index, "mean" / "sum", num_items_in_batch; "none" is not offered,
since the gradients are formed before the upstream gradient is known, see below).

Backward. With D = dL/dlogits [N, V] (ops/cross_entropy.py derives it; it is c * (softmax(z) - onehot)
* dz/dlogits, c = 1 / normaliser for a unit upstream gradient):

    dL/dX = D W          dL/dW = D^T X          dL/db = sum_i D_i

D is linear in the upstream gradient g (a scalar for "mean" and "sum"), so all three are g times
their value at g = 1.

How it runs (CPU and CUDA alike; the CUDA one runs Triton's row kernel and cuBLAS):

    for each chunk of rows c (chunk_rows of them, logits of the chunk within a fixed byte budget):
        logits_c = X_c W^T (+ b)                         # one buffer [chunk_rows, V], reused
        loss_c, and D_c written over logits_c            # triton_kernels/fused_linear_cross_entropy.py
        dX_c = D_c W                                     # straight into dX's rows
        dW  += D_c^T X_c     (the first chunk writes dW; b: db += column sums of D_c in fp32)

The gradients are computed during the forward, for g = 1, and the op's backward only scales them by
g (in place, and not at all when g == 1, as after loss.backward()). The alternative, recomputing the
logits in the backward, costs a fourth matmul of 2 N H V FLOPs (+33% on the part that dominates);
keeping dX and dW from the forward costs no memory beyond the gradients themselves, which the
backward must produce anyway. X is not saved. Peak extra memory: dX + dW + one chunk of logits
(+ the [N] losses). When nothing needs a gradient (no_grad, evaluation) the kernel skips the D pass
and no gradient is formed. A graph through this op can be backpropagated once: the in-place scaling
bumps the saved gradients' versions, so a second backward (retain_graph) raises instead of scaling twice.

dW accumulation, the one numerical choice: by default dW accumulates in W's dtype (bf16/fp16: cuBLAS
adds D_c^T X_c to the bf16 dW in fp32 and rounds once per chunk). Its memory is then exactly the
gradient's (1 GiB for 128,256 x 4,096 in bf16), which is what makes ~1.3 GiB extra possible for that
head; the price is one rounding of dW per chunk instead of one in all, an error that grows like
sqrt(chunks): at 8 chunks about 2x plain torch's dW error (rms; plain torch rounds dW once).
`grad_weight_fp32=True` accumulates in an fp32 buffer (cuBLAS with bf16 operands into the fp32 dW
where torch's addmm takes out_dtype, else vocab slices of D_c^T X_c made in fp32 and added) and rounds
once at the end: within the 2x rule, at +2x W's size in memory (the fp32 buffer, then the cast). For
an fp32 W both are the same. A frozen head (the LoRA case) forms no dW at all. dX has no such
choice: each row of dX comes from one matmul over the whole vocabulary.

Chunk size: by default the chunk's logits take CHUNK_BYTES (256 MiB): 1,024 rows of a 128,256-vocab
bf16 head, so that dW (0.98 GiB) + dX (64 MiB at 8k x 4k) + the chunk stay under 1.3 GiB. Larger
chunks cost memory and save time: each chunk's dW update reads and writes all of dW (2 GB in bf16,
~0.7 ms on an H100), and 1,024 rows still keep the three matmuls large. `chunk_rows` overrides it.
The target check (ops/cross_entropy.py) is queued first and its verdict read after the chunk loop is
launched, so the host never waits for the device before launching (no drain of the device's queue).

Every row's loss and gradient depend on that row alone, and with num_items_in_batch = n every row is
scaled by 1/n, so micro-batches (each given the whole batch's n) accumulate to the full batch's
gradient exactly up to the summation order of dW.
"""

from __future__ import annotations

import torch

from loraforge.ops._library import define_op
from loraforge.ops.cross_entropy import (
    _compute_dtype,
    as_normaliser,
    check_reduction,
    check_target_values,
    check_targets,
    finish_target_check,
    start_target_check,
    cpu_row_block,
    grad_coefficient,
    is_traced,
    reduce_loss,
    rows_grad,
    rows_loss_and_lse,
)

FUSED_REDUCTIONS = ("mean", "sum")
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK_BYTES = 256 << 20  # the reused logits buffer: 1,024 rows of a 128,256-vocab bf16 head
FP32_GRAD_WEIGHT_SLICE_BYTES = 128 << 20  # fp32 scratch for one vocab slice of D_c^T X_c


def _kernels():
    from loraforge.triton_kernels import fused_linear_cross_entropy

    return fused_linear_cross_entropy


def default_chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so that a chunk of logits fits CHUNK_BYTES; a multiple of 128 when that many
    fit (matmul tiles), at least 1, at most n_rows."""
    rows = max(1, CHUNK_BYTES // (vocab * element_size))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(rows, n_rows))


# ---------------------------------------------------------------------------------------------
# Checks.


def _check_args(x, weight, bias, targets, ignore_index, reduction, num_items_in_batch, chunk_rows) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden] and weight [vocab, hidden], got {list(x.shape)} "
                         f"and {list(weight.shape)}")  # fmt: skip
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight [vocab, hidden] has hidden {weight.shape[1]} but x has {x.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (one class)")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != x.device:
            raise ValueError(f"bias must be [{weight.shape[0]}] on {x.device}, got {list(bias.shape)} on {bias.device}")
    check_targets(targets, x.shape[0], x.device)
    if reduction not in FUSED_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FUSED_REDUCTIONS} for the fused op, got {reduction!r}")
    check_reduction(reduction, num_items_in_batch)
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be >= 0 (0: chosen from the vocabulary size), got {chunk_rows}")


# ---------------------------------------------------------------------------------------------
# Reference: the definition, whole tensors, fp32 (float64 for float64 inputs: the tests' exact).


def fused_linear_cross_entropy_reference(x, weight, bias, targets, ignore_index=-100, logit_scale=1.0, softcap=0.0,
                                         reduction="mean", num_items_in_batch=None):  # fmt: skip
    """(loss, dL/dx, dL/dweight, dL/dbias) for a unit upstream gradient, in the compute dtype."""
    dtype = _compute_dtype(x.dtype)
    x, weight = x.to(dtype), weight.to(dtype)
    logits = x @ weight.T + (bias.to(dtype) if bias is not None else 0)
    loss_rows, lse = rows_loss_and_lse(logits, targets, ignore_index, logit_scale, softcap)
    loss = reduce_loss(loss_rows, targets, ignore_index, reduction, num_items_in_batch)
    coef = grad_coefficient(torch.ones((), device=x.device), targets, ignore_index, reduction, num_items_in_batch,
                            dtype)  # fmt: skip
    d_logits = rows_grad(logits, targets, lse, coef, ignore_index, logit_scale, softcap)
    return loss, d_logits @ weight, d_logits.T @ x, d_logits.sum(0)


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _reference_kernel(x, weight, bias, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch,
                      needs_grad_x, needs_grad_weight, needs_grad_bias, grad_weight_fp32, chunk_rows):  # fmt: skip
    _check_args(x, weight, bias, targets, ignore_index, reduction, num_items_in_batch, chunk_rows)
    check_target_values(targets, weight.shape[0], ignore_index)
    loss, gx, gw, gb = fused_linear_cross_entropy_reference(x, weight, bias, targets, ignore_index, logit_scale,
                                                            softcap, reduction, num_items_in_batch)  # fmt: skip
    return (loss.float(), gx.to(x.dtype) if needs_grad_x else _empty(x),
            gw.to(weight.dtype) if needs_grad_weight else _empty(weight),
            gb.to(x.dtype) if needs_grad_bias and bias is not None else _empty(x))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The chunked forward (+ gradients), shared by the CPU and CUDA kernels; they differ only in the
# per-chunk loss-and-gradient step.


def _chunk_loss_and_grad_torch_(logits, targets, coef, loss_out, *, ignore_index, logit_scale, softcap, write_grad):
    """CPU step: the cross_entropy math on blocks of the chunk in fp32, the gradient over the chunk."""
    step = cpu_row_block(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        block_loss, block_lse = rows_loss_and_lse(logits[rows], targets[rows], ignore_index, logit_scale, softcap)
        loss_out[rows] = block_loss
        if write_grad:
            logits[rows] = rows_grad(logits[rows], targets[rows], block_lse, coef, ignore_index, logit_scale, softcap)


def _chunk_loss_and_grad_triton_(logits, targets, coef, loss_out, *, ignore_index, logit_scale, softcap, write_grad):
    _kernels().cross_entropy_loss_and_grad_(
        logits, targets, coef, loss_out, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        write_grad=write_grad,
    )  # fmt: skip


_ADDMM_INTO_FP32 = {"works": None}  # whether cuBLAS addmm takes bf16/fp16 operands into an fp32 acc


def _add_grad_weight_fp32_(acc: torch.Tensor, d_logits_t: torch.Tensor, x_chunk: torch.Tensor) -> None:
    """acc (fp32 [V, H]) += d_logits_t @ x_chunk, for low-precision operands, rounding only in fp32."""
    if d_logits_t.dtype == torch.float32:
        acc.addmm_(d_logits_t, x_chunk)
        return
    if not acc.is_cuda:
        acc.addmm_(d_logits_t.float(), x_chunk.float())
        return
    if _ADDMM_INTO_FP32["works"] is not False:
        # One cuBLAS call, fp32 C read and written in place (torch versions whose addmm takes
        # out_dtype with an fp32 `self`); older ones refuse, and we remember that.
        try:
            torch.addmm(acc, d_logits_t, x_chunk, out_dtype=torch.float32, out=acc)
            _ADDMM_INTO_FP32["works"] = True
            return
        except (RuntimeError, TypeError):
            if _ADDMM_INTO_FP32["works"]:
                raise
            _ADDMM_INTO_FP32["works"] = False
    # Fallback: mm into an fp32 scratch one vocab slice at a time (bounded memory), then add.
    rows = max(1, FP32_GRAD_WEIGHT_SLICE_BYTES // (4 * acc.shape[1]))
    for start in range(0, acc.shape[0], rows):
        acc[start : start + rows] += torch.mm(d_logits_t[start : start + rows], x_chunk, out_dtype=torch.float32)


def chunked_forward(x, weight, bias, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch,
                    needs_grad_x, needs_grad_weight, needs_grad_bias, grad_weight_fp32, chunk_rows,
                    loss_and_grad_chunk_=_chunk_loss_and_grad_torch_):  # fmt: skip
    """The op's kernel on any device (see the module docstring); `loss_and_grad_chunk_` is the
    per-chunk step: torch on CPU, Triton on CUDA (tests pass the Triton one on CPU tensors)."""
    _check_args(x, weight, bias, targets, ignore_index, reduction, num_items_in_batch, chunk_rows)
    target_check = start_target_check(targets, weight.shape[0], ignore_index)  # read at the end: no sync here
    n_rows, vocab = x.shape[0], weight.shape[0]
    needs_grad_bias = needs_grad_bias and bias is not None
    write_grad = needs_grad_x or needs_grad_weight or needs_grad_bias
    rows = min(chunk_rows, n_rows) if chunk_rows else default_chunk_rows(n_rows, vocab, x.element_size())

    coef = grad_coefficient(torch.ones((), device=x.device), targets, ignore_index, reduction, num_items_in_batch)
    loss_rows = x.new_empty((n_rows,), dtype=torch.float32)
    logits_buffer = x.new_empty((max(1, rows), vocab))
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_grad_x else _empty(x)
    weight_acc_fp32 = grad_weight_fp32 and weight.dtype != torch.float32
    grad_w = None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if needs_grad_bias else None
    weight_t = weight.t()

    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        x_chunk, logits = x[start:stop], logits_buffer[: stop - start]
        if bias is not None:
            torch.addmm(bias, x_chunk, weight_t, out=logits)
        else:
            torch.mm(x_chunk, weight_t, out=logits)
        loss_and_grad_chunk_(logits, targets[start:stop], coef, loss_rows[start:stop], ignore_index=ignore_index,
                             logit_scale=logit_scale, softcap=softcap, write_grad=write_grad)  # fmt: skip
        # From here `logits` holds D_c, the chunk's dL/dlogits.
        if needs_grad_x:
            torch.mm(logits, weight, out=grad_x[start:stop])
        if needs_grad_weight:
            if weight_acc_fp32:
                if grad_w is None:
                    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
                _add_grad_weight_fp32_(grad_w, logits.t(), x_chunk)
            elif grad_w is None:
                grad_w = torch.mm(logits.t(), x_chunk)  # the first chunk writes: no zero-fill of dW
            else:
                grad_w.addmm_(logits.t(), x_chunk)
        if needs_grad_bias:
            grad_b += logits.sum(0, dtype=torch.float32)
    del logits_buffer

    loss = reduce_loss(loss_rows, targets, ignore_index, reduction, num_items_in_batch)
    if not needs_grad_weight:
        grad_w = _empty(weight)
    elif grad_w is None:  # no rows at all
        grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    elif grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    grad_b = grad_b.to(x.dtype) if needs_grad_bias else _empty(x)
    finish_target_check(target_check)
    return loss, grad_x, grad_w, grad_b


def _cuda_kernel(*args):
    with torch.cuda.device(args[0].device):
        return chunked_forward(*args, loss_and_grad_chunk_=_chunk_loss_and_grad_triton_)


def _fake(x, weight, bias, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch,
          needs_grad_x, needs_grad_weight, needs_grad_bias, grad_weight_fp32, chunk_rows):  # fmt: skip
    loss = x.new_empty((), dtype=torch.float32)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_grad_x else _empty(x)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if needs_grad_weight else _empty(weight)
    grad_b = x.new_empty((weight.shape[0],)) if needs_grad_bias and bias is not None else _empty(x)
    return loss, grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd: the gradients exist already; scale them by the upstream gradient.


def _setup_context(ctx, inputs, output):
    _, grad_x, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_x, grad_w, grad_b)
    # The gradient outputs are never differentiated, but autograd would still hand backward a zero
    # tensor for each of them: a [V, H] zero-fill (1 GiB at 128k x 4k, measured on an H100) at the
    # moment dW is alive. Unused outputs get None instead.
    ctx.set_materialize_grads(False)
    if is_traced(grad_w):
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.eager_grads = None
    else:
        # Eagerly, hold the gradients as plain references that backward hands over and drops: then
        # autograd's gradient accumulation takes dW as it is instead of cloning it (a saved tensor
        # would keep a second reference alive and cost another [V, H] buffer, 1 GB at 128k x 4k).
        ctx.eager_grads = [grad_x, grad_w, grad_b]
    ctx.formed = inputs[9:12]  # needs_grad_x, needs_grad_weight, needs_grad_bias (with a bias)
    ctx.has_bias = inputs[2] is not None


def _upstream_is_one(grad_loss: torch.Tensor) -> bool:
    """Whether g == 1 (one scalar read), except while a CUDA graph is captured (no sync allowed then)."""
    if grad_loss.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(grad_loss == 1)


def _backward(ctx, grad_loss, *_grads_of_grads):
    if grad_loss is None:  # not materialized (see _setup_context): nothing flows back
        return (None,) * 14
    if ctx.eager_grads is None and not ctx.saved_tensors:
        raise RuntimeError("loraforge::fused_linear_cross_entropy: backward ran twice through one graph; "
                           "its gradients were formed in the forward and have been handed over already")
    saved, ctx.eager_grads = (ctx.eager_grads or ctx.saved_tensors), None
    wanted = ctx.needs_input_grad[:3]
    formed = (ctx.formed[0], ctx.formed[1], ctx.formed[2] and ctx.has_bias)
    for name, want, have in zip(("x", "weight", "bias"), wanted, formed):
        if want and not have:
            raise RuntimeError(
                f"loraforge::fused_linear_cross_entropy was called with needs_grad_{name}=False but {name} requires "
                "grad; call the function fused_linear_cross_entropy, which sets the flags from requires_grad"
            )
    if is_traced(grad_loss):
        # A traced graph may not mutate what its forward saved, nor branch on g: scale out of place.
        return (*(grad * grad_loss.to(grad.dtype) if have else None for grad, have in zip(saved, formed)),
                *([None] * 11))  # fmt: skip
    # Eager: scale in place (no second [V, H] buffer for dW), and not at all when g == 1, which is what
    # loss.backward() passes (saves reading and writing dW: 2 GB at 128k x 4k). Reading g is a device
    # sync, which stalls the host at the start of backward: worth it only when dW was formed; dX alone
    # (a frozen head: LoRA) is cheaper to scale by 1 than to sync for. The version bump makes a second
    # backward through this graph (retain_graph) fail loudly instead of scaling twice.
    one = formed[1] and _upstream_is_one(grad_loss)
    for grad, have in zip(saved, formed):
        if have:
            if not one:
                grad.mul_(grad_loss)
            torch.autograd.graph.increment_version(grad)
    # Hand over fresh aliases (same storage): AccumulateGrad adopts a gradient without copying it only
    # when nothing else references that tensor, and some torch versions keep the op's outputs
    # referenced (torch 2.11 on the GPU machine cloned dW here: +1 GiB at 128k x 4k).
    return (*(grad.detach() if have else None for grad, have in zip(saved, formed)), *([None] * 11))


fused_linear_cross_entropy_op = define_op(
    "fused_linear_cross_entropy(Tensor x, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
    "float logit_scale, float softcap, str reduction, Tensor? num_items_in_batch, bool needs_grad_x, "
    "bool needs_grad_weight, bool needs_grad_bias, bool grad_weight_fp32, int chunk_rows) "
    "-> (Tensor loss, Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
    reference=_reference_kernel,
    cpu=chunked_forward,
    cuda=_cuda_kernel,
    fake=_fake,
    backward=_backward,
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The function that code above ops/ calls.


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                               num_items_in_batch: int | torch.Tensor | None = None, softcap: float | None = None,
                               logit_scale: float = 1.0, grad_weight_fp32: bool = False,
                               chunk_rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """cross_entropy(hidden @ weight.T + bias, targets) without the logits: hidden [..., H],
    weight [V, H], targets [...] int64. Returns the fp32 loss. Gradients are formed for what
    requires grad (none under no_grad); see the module docstring for chunk_rows and grad_weight_fp32."""
    if hidden.dim() < 1 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have hidden's shape without its last dimension: hidden "
                         f"{list(hidden.shape)}, targets {list(targets.shape)}")  # fmt: skip
    grad_on = torch.is_grad_enabled()
    loss, *_ = fused_linear_cross_entropy_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), ignore_index, float(logit_scale),
        float(softcap or 0.0), reduction, as_normaliser(num_items_in_batch), grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad, grad_weight_fp32,
        int(chunk_rows or 0),
    )  # fmt: skip
    return loss
