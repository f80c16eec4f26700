"""Cross-entropy over large vocabularies (up to 262,144 classes and beyond), with logit scaling,
Gemma2-style softcapping, an ignore index and an external normaliser for exact gradient accumulation.

    loraforge::cross_entropy(logits, targets, ignore_index, logit_scale, softcap, reduction,
                             num_items_in_batch, inplace_backward) -> (loss fp32, lse fp32 [N])
    loraforge::cross_entropy_backward(grad_loss, logits, targets, lse, ...) -> grad_logits (logits' dtype)
    loraforge::cross_entropy_backward_(grad_loss, logits!, targets, lse, ...) -> ()   (grad into logits)

Definition, for a row i of logits x_i (V classes) with target t_i:

    z_ij   = softcap * tanh(logit_scale * x_ij / softcap)     (z_ij = logit_scale * x_ij when softcap = 0)
    lse_i  = log sum_j exp(z_ij)
    loss_i = lse_i - z_i,t_i                                   (0 where t_i == ignore_index)

    reduction "sum":  L = sum_i loss_i
              "mean": L = sum_i loss_i / n_valid, n_valid = #{i : t_i != ignore_index}
              "none": L_i = loss_i
    num_items_in_batch = n (with "mean" or "sum"): L = sum_i loss_i / n, whatever n_valid is, so that
    micro-batches that each divide by the whole batch's token count add up to the full-batch loss and
    gradient exactly (each row's gradient does not depend on which micro-batch holds it).

When every target is ignored, "sum" gives 0 and "mean" gives nan (0 / 0), as torch's cross_entropy
does; the gradient is 0 in both. num_items_in_batch = 0 is refused with a ValueError (when it is a
Python number or a CPU tensor; a CUDA tensor is not read back, to keep the step asynchronous).

Backward. With g the upstream gradient and c_i = g / n_valid ("mean"), g / n (num_items_in_batch),
g ("sum") or g_i ("none"):

    dL/dz_ij = c_i * (softmax(z_i)_j - [j == t_i]),  softmax(z_i)_j = exp(z_ij - lse_i)
    dz_ij/dx_ij = logit_scale * (1 - tanh^2(logit_scale * x_ij / softcap)) = logit_scale * (1 - (z_ij/softcap)^2)
                  (logit_scale without a cap)
    dL/dx_ij = c_i * (exp(z_ij - lse_i) - [j == t_i]) * dz_ij/dx_ij,   0 on ignored rows.

So the forward keeps only lse (fp32 [N]) besides the logits themselves; the backward reads the
logits once more and writes the gradient in the logits' dtype, into a new tensor or, with
`inplace_backward=True`, over the logits (saves one [N, V] buffer; the logits are gone after the
backward, so nothing else may still need them: e.g. no torch op on the logits that saved them).

Kernels: the reference below is the definition (fp32, whole tensor). CPU: the same math over blocks
of rows (an fp32 copy of one block at a time). CUDA: Triton (triton_kernels/cross_entropy.py), which
reads the low-precision logits in blocks with an online log-sum-exp and never makes an fp32 copy.
The loss is always fp32.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools

import torch
from torch._subclasses.fake_tensor import is_fake

from loraforge.ops._library import define_op

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_BLOCK_BYTES = 64 << 20  # the CPU kernel upcasts this many bytes of fp32 logits at a time


def _kernels():
    # Imported on first use so that the op (and its CPU kernel) works where triton is not installed.
    from loraforge.triton_kernels import cross_entropy

    return cross_entropy


# ---------------------------------------------------------------------------------------------
# Argument checks, shared with the fused linear cross-entropy op.


def check_targets(targets: torch.Tensor, n_rows: int, device: torch.device) -> None:
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 (class indices), got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n_rows:
        raise ValueError(f"targets must have shape [{n_rows}] (one class index per row), got {list(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the logits are on {device}")


def check_reduction(reduction: str, num_items_in_batch: torch.Tensor | None) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is None:
        return
    if reduction == "none":
        raise ValueError("num_items_in_batch normalises a summed loss; it cannot go with reduction='none'")
    if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
        raise ValueError(f"num_items_in_batch must be one real number, got {num_items_in_batch.dtype} "
                         f"of shape {list(num_items_in_batch.shape)}")  # fmt: skip
    # A CPU value is checked for free; a CUDA one would cost a device sync per call, so it is trusted.
    if num_items_in_batch.device.type == "cpu" and not bool(num_items_in_batch > 0):
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch.item()} "
                         "(a batch with no target to count has nothing to normalise)")  # fmt: skip


def check_target_values(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise ValueError when a target is neither a class index nor the ignore index (at once)."""
    finish_target_check(start_target_check(targets, n_classes, ignore_index))


class _PendingTargetCheck:
    """A CUDA target check under way: its verdict (one bool) is copied to pinned host memory behind an
    event, so the host can go on launching kernels while the device computes it."""

    def __init__(self, targets: torch.Tensor, n_classes: int, ignore_index: int):
        self.targets, self.n_classes, self.ignore_index = targets, n_classes, ignore_index
        any_bad = _bad_targets(targets, n_classes, ignore_index).any()
        self.verdict = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.verdict.copy_(any_bad, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()


def _bad_targets(targets, n_classes, ignore_index) -> torch.Tensor:
    return ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)


# What a caller checked before launching the op (targets_checked_ahead): the targets' elements (device, address,
# count, contiguous), their version, n_classes and ignore_index. The op's own check is then skipped.
_CHECKED_AHEAD: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("loraforge_targets_checked_ahead",
                                                                             default=None)  # fmt: skip


@contextlib.contextmanager
def targets_checked_ahead(targets: torch.Tensor, n_classes: int, ignore_index: int):
    """Check `targets` now, before the work that leads to the loss, and read the verdict when the block ends;
    inside it, a cross-entropy op given these very targets (the same elements, contiguous, unchanged: a view
    such as a reshape counts; with the same classes and ignore index) skips its own check.

    Why: on CUDA the op reads its check's verdict at its end, and the check is queued behind everything
    before it. Called from a model's loss, that is the whole forward: the host then waits for the GPU to
    finish the forward before it can issue the backward (models/causal_lm_loss.py). Begun before the
    forward, the check runs first on the GPU, and its verdict is ready when the block ends. Bad targets still
    raise ValueError, at the block's end (the work queued in between reads no target out of range: see
    start_target_check). On CPU the check runs, and raises, at once."""
    pending = start_target_check(targets, n_classes, ignore_index)
    token = _CHECKED_AHEAD.set(_ahead_key(targets, n_classes, ignore_index) if targets.is_contiguous() else None)
    try:
        yield
    finally:
        _CHECKED_AHEAD.reset(token)
    finish_target_check(pending)


def _ahead_key(targets: torch.Tensor, n_classes: int, ignore_index: int) -> tuple:
    return (targets.device, targets.data_ptr(), targets.numel(), targets._version, n_classes, ignore_index)


def _checked_ahead(targets: torch.Tensor, n_classes: int, ignore_index: int) -> bool:
    ahead = _CHECKED_AHEAD.get()
    return ahead is not None and targets.is_contiguous() and ahead == _ahead_key(targets, n_classes, ignore_index)


def start_target_check(targets: torch.Tensor, n_classes: int, ignore_index: int):
    """Begin checking that every target is a class index in [0, n_classes) or the ignore index.

    On CPU the check runs now and raises at once. On CUDA it is queued on the device and
    `finish_target_check` reads its verdict: called after the op's kernels are launched, it waits
    only for the check itself (queued first), never for those kernels, so the device does not drain
    and idle while the host launches them, as a read of the verdict up front (a sync) made it do.
    The kernels queued in between therefore see the bad targets: ours never read out of range with
    one (the Triton kernels mask the target's load; the matmuls do not use targets), and the results
    are dropped when finish_target_check raises. Skipped while a CUDA graph is captured (no host read
    there). Returns what finish_target_check takes (None when nothing is pending)."""
    if targets.numel() == 0 or _checked_ahead(targets, n_classes, ignore_index):
        return None
    if targets.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return None
        return _PendingTargetCheck(targets, n_classes, ignore_index)
    _raise_if_bad(targets, n_classes, ignore_index, bool(_bad_targets(targets, n_classes, ignore_index).any()))
    return None


def finish_target_check(pending) -> None:
    """Raise ValueError if the check begun by start_target_check found a bad target."""
    if pending is None:
        return
    pending.done.synchronize()
    _raise_if_bad(pending.targets, pending.n_classes, pending.ignore_index, bool(pending.verdict))


def _raise_if_bad(targets, n_classes, ignore_index, found_bad: bool) -> None:
    if found_bad:
        first = targets[_bad_targets(targets, n_classes, ignore_index)][0].item()
        raise ValueError(f"targets must hold class indices in [0, {n_classes}) or ignore_index={ignore_index}; "
                         f"found {first}")  # fmt: skip


def check_logits_args(logits, targets, ignore_index, reduction, num_items_in_batch) -> None:
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, vocab], got shape {list(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class")
    check_targets(targets, logits.shape[0], logits.device)
    check_reduction(reduction, num_items_in_batch)


# ---------------------------------------------------------------------------------------------
# The math, on whole rows, in fp32 (float64 when given float64: the tests' exact reference).
# Shared by the reference kernels, the CPU kernels and the fused op's CPU path.


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def transformed_logits(x: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    z = x.to(_compute_dtype(x.dtype)) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def rows_loss_and_lse(x, targets, ignore_index: int, logit_scale: float, softcap: float):
    """Per-row loss and log-sum-exp (0 on ignored rows), in the compute dtype."""
    z = transformed_logits(x, logit_scale, softcap)
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    z_target = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    zero = lse.new_zeros(())
    return torch.where(valid, lse - z_target, zero), torch.where(valid, lse, zero)


def rows_grad(x, targets, lse, coef, ignore_index: int, logit_scale: float, softcap: float) -> torch.Tensor:
    """dL/dx for a block of rows, in the compute dtype (see the module docstring)."""
    z = transformed_logits(x, logit_scale, softcap)
    valid = targets != ignore_index
    d_z = torch.exp(z - lse.to(z.dtype).unsqueeze(1))
    d_z.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1), -valid.to(z.dtype).unsqueeze(1))
    dz_dx = logit_scale * (1 - (z / softcap) ** 2) if softcap else logit_scale
    coef = coef.to(z.dtype)
    grad = d_z * dz_dx * (coef.unsqueeze(1) if coef.dim() else coef)
    return torch.where(valid.unsqueeze(1), grad, 0)  # where, not a product: coef may be inf (mean of none)


def normaliser(targets, ignore_index: int, reduction: str, num_items_in_batch) -> torch.Tensor | None:
    """What the summed loss is divided by: None for "sum" and "none"."""
    if num_items_in_batch is not None:
        return num_items_in_batch
    if reduction == "mean":
        return (targets != ignore_index).sum()
    return None


def reduce_loss(loss_rows, targets, ignore_index: int, reduction: str, num_items_in_batch) -> torch.Tensor:
    if reduction == "none" and num_items_in_batch is None:
        return loss_rows
    total = loss_rows.sum()
    denominator = normaliser(targets, ignore_index, reduction, num_items_in_batch)
    # A 0-d CPU normaliser divides a CUDA loss as it is: no copy to the device, no sync.
    return total if denominator is None else total / denominator.to(dtype=total.dtype)


def grad_coefficient(grad_loss, targets, ignore_index: int, reduction: str, num_items_in_batch,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """c of the docstring: the upstream gradient of each row's loss, 0-d (all rows) or [N] ("none")."""
    coef = grad_loss.to(dtype)
    denominator = normaliser(targets, ignore_index, reduction, num_items_in_batch)
    if denominator is not None:
        coef = coef / denominator.to(dtype=dtype)
    return coef.contiguous()


def cross_entropy_reference(logits, targets, ignore_index=-100, logit_scale=1.0, softcap=0.0, reduction="mean",
                            num_items_in_batch=None):  # fmt: skip
    """(loss, lse) by the definition, in fp32 (float64 for float64 logits)."""
    loss_rows, lse = rows_loss_and_lse(logits, targets, ignore_index, logit_scale, softcap)
    return reduce_loss(loss_rows, targets, ignore_index, reduction, num_items_in_batch), lse


def cross_entropy_grad_reference(grad_loss, logits, targets, lse, ignore_index=-100, logit_scale=1.0, softcap=0.0,
                                 reduction="mean", num_items_in_batch=None):  # fmt: skip
    """dL/dlogits by the definition, in the compute dtype."""
    dtype = _compute_dtype(logits.dtype)
    coef = grad_coefficient(grad_loss, targets, ignore_index, reduction, num_items_in_batch, dtype)
    return rows_grad(logits, targets, lse, coef, ignore_index, logit_scale, softcap)


# ---------------------------------------------------------------------------------------------
# Op kernels: forward.


def _empty_forward(logits, reduction):
    n_rows = logits.shape[0]
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((n_rows,), dtype=torch.float32)


def _forward_fake(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch, inplace_backward):
    return _empty_forward(logits, reduction)


def _check_forward(logits, targets, ignore_index, reduction, num_items_in_batch) -> None:
    check_logits_args(logits, targets, ignore_index, reduction, num_items_in_batch)
    check_target_values(targets, logits.shape[1], ignore_index)


def _forward_reference(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch,
                       inplace_backward):  # fmt: skip
    _check_forward(logits, targets, ignore_index, reduction, num_items_in_batch)
    loss, lse = cross_entropy_reference(logits, targets, ignore_index, logit_scale, softcap, reduction,
                                        num_items_in_batch)  # fmt: skip
    return loss.float(), lse.float()


def cpu_row_block(n_cols: int) -> int:
    return max(1, CPU_BLOCK_BYTES // (4 * n_cols))


def _forward_cpu(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch, inplace_backward):
    _check_forward(logits, targets, ignore_index, reduction, num_items_in_batch)
    n_rows = logits.shape[0]
    loss_rows = logits.new_empty((n_rows,), dtype=torch.float32)
    lse = logits.new_empty((n_rows,), dtype=torch.float32)
    step = cpu_row_block(logits.shape[1])
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        loss_rows[rows], lse[rows] = rows_loss_and_lse(logits[rows], targets[rows], ignore_index, logit_scale, softcap)
    return reduce_loss(loss_rows, targets, ignore_index, reduction, num_items_in_batch), lse


def forward_triton(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch,
                   inplace_backward=False, block=None):  # fmt: skip
    """The CUDA kernel; also runs on CPU tensors under TRITON_INTERPRET=1 (tests call it so)."""
    check_logits_args(logits, targets, ignore_index, reduction, num_items_in_batch)
    target_check = start_target_check(targets, logits.shape[1], ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss_rows, lse = _kernels().cross_entropy_forward(
        logits, targets, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, block=block
    )
    loss = reduce_loss(loss_rows, targets, ignore_index, reduction, num_items_in_batch)
    finish_target_check(target_check)
    return loss, lse


def _forward_cuda(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch, inplace_backward):
    with torch.cuda.device(logits.device):
        return forward_triton(logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch)


# ---------------------------------------------------------------------------------------------
# Op kernels: backward, into a new tensor (`grad_out=None`) or over the logits (`grad_out=logits`).


def _check_backward(grad_loss, logits, targets, lse, ignore_index, reduction, num_items_in_batch) -> None:
    check_logits_args(logits, targets, ignore_index, reduction, num_items_in_batch)
    n_rows = logits.shape[0]
    if lse.dtype != torch.float32 or lse.shape != (n_rows,):
        raise ValueError(f"lse must be float32 of shape [{n_rows}], got {lse.dtype} {list(lse.shape)}")
    expected = (n_rows,) if reduction == "none" and num_items_in_batch is None else ()
    if tuple(grad_loss.shape) != expected:
        raise ValueError(f"grad_loss must have shape {list(expected)}, got {list(grad_loss.shape)}")


def _check_inplace_target(logits) -> None:
    if logits.stride(1) != 1:
        raise ValueError("an in-place backward needs logits with unit stride along the vocabulary")


def _backward_reference_into(grad_out, grad_loss, logits, targets, lse, ignore_index, logit_scale, softcap,
                             reduction, num_items_in_batch):  # fmt: skip
    _check_backward(grad_loss, logits, targets, lse, ignore_index, reduction, num_items_in_batch)
    grad = cross_entropy_grad_reference(grad_loss, logits, targets, lse, ignore_index, logit_scale, softcap,
                                        reduction, num_items_in_batch)  # fmt: skip
    if grad_out is None:
        return grad.to(logits.dtype)
    grad_out.copy_(grad)
    return grad_out


def _backward_cpu_into(grad_out, grad_loss, logits, targets, lse, ignore_index, logit_scale, softcap, reduction,
                       num_items_in_batch):  # fmt: skip
    _check_backward(grad_loss, logits, targets, lse, ignore_index, reduction, num_items_in_batch)
    out = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_out is None else grad_out
    coef = grad_coefficient(grad_loss, targets, ignore_index, reduction, num_items_in_batch)
    step = cpu_row_block(logits.shape[1])
    for start in range(0, logits.shape[0], step):
        rows = slice(start, start + step)
        row_coef = coef[rows] if coef.dim() else coef
        out[rows] = rows_grad(logits[rows], targets[rows], lse[rows], row_coef, ignore_index, logit_scale, softcap)
    return out


def backward_triton_into(grad_out, grad_loss, logits, targets, lse, ignore_index, logit_scale, softcap, reduction,
                         num_items_in_batch, block=None):  # fmt: skip
    """The CUDA kernel; also runs on CPU tensors under TRITON_INTERPRET=1 (tests call it so)."""
    _check_backward(grad_loss, logits, targets, lse, ignore_index, reduction, num_items_in_batch)
    if grad_out is None:
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        grad_out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    coef = grad_coefficient(grad_loss, targets, ignore_index, reduction, num_items_in_batch)
    return _kernels().cross_entropy_backward(
        logits, targets, lse, coef, grad_out, ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        block=block,
    )  # fmt: skip


def _on_device(fn):
    def run(*args):
        with torch.cuda.device(args[1].device):  # args[1]: the logits
            return fn(*args)

    return run


def _functional(into):
    def backward(grad_loss, logits, *rest):
        return into(None, grad_loss, logits, *rest)

    return backward


def _inplace(into):
    def backward_(grad_loss, logits, *rest):
        _check_inplace_target(logits)
        into(logits, grad_loss, logits, *rest)

    return backward_


def _backward_fake(grad_loss, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward_fake_(grad_loss, logits, *rest):
    return None


_BACKWARD_ARGS = ("Tensor targets, Tensor lse, int ignore_index, float logit_scale, float softcap, str reduction, "
                  "Tensor? num_items_in_batch")  # fmt: skip

cross_entropy_backward_op = define_op(
    f"cross_entropy_backward(Tensor grad_loss, Tensor logits, {_BACKWARD_ARGS}) -> Tensor",
    reference=_functional(_backward_reference_into),
    cpu=_functional(_backward_cpu_into),
    cuda=_on_device(_functional(backward_triton_into)),
    fake=_backward_fake,
)

cross_entropy_backward_inplace_op = define_op(
    f"cross_entropy_backward_(Tensor grad_loss, Tensor(a!) logits, {_BACKWARD_ARGS}) -> ()",
    reference=_inplace(_backward_reference_into),
    cpu=_inplace(_backward_cpu_into),
    cuda=_on_device(_inplace(backward_triton_into)),
    fake=_backward_fake_,
)


# ---------------------------------------------------------------------------------------------
# Autograd on the forward op: save lse (and the logits the caller already holds), nothing [N, V].


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, logit_scale, softcap, reduction, num_items_in_batch, inplace_backward = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, lse, num_items_in_batch)
    ctx.args = (ignore_index, logit_scale, softcap, reduction)
    ctx.inplace_backward = inplace_backward


def is_traced(t: torch.Tensor) -> bool:
    """Whether t is being traced (torch.compile, export, aot_function) rather than run eagerly."""
    return torch.compiler.is_compiling() or is_fake(t)


def _backward(ctx, grad_loss, _grad_lse):
    logits, targets, lse, num_items_in_batch = ctx.saved_tensors
    args = (targets, lse, *ctx.args, num_items_in_batch)
    # In place only eagerly: a traced graph would turn the mutation into a copy anyway.
    if ctx.inplace_backward and not is_traced(logits):
        torch.ops.loraforge.cross_entropy_backward_(grad_loss, logits, *args)
        # Our op bumps no version counter by itself: do it, so that autograd refuses (rather than
        # silently misuses) any other saved reference to the logits that were just overwritten.
        torch.autograd.graph.increment_version(logits)
        grad = logits
    else:
        grad = torch.ops.loraforge.cross_entropy_backward(grad_loss, logits, *args)
    return grad, None, None, None, None, None, None, None


cross_entropy_op = define_op(
    # No schema defaults: the dispatcher drops trailing arguments equal to their default before it calls
    # a Python kernel, and every argument here is always spelled out by `cross_entropy` below.
    "cross_entropy(Tensor logits, Tensor targets, int ignore_index, float logit_scale, float softcap, "
    "str reduction, Tensor? num_items_in_batch, bool inplace_backward) -> (Tensor loss, Tensor lse)",
    reference=_forward_reference,
    cpu=_forward_cpu,
    cuda=_forward_cuda,
    fake=_forward_fake,
    backward=_backward,
    setup_context=_setup_context,
)


# ---------------------------------------------------------------------------------------------
# The function that code above ops/ calls.


def as_normaliser(num_items_in_batch) -> torch.Tensor | None:
    """num_items_in_batch as the op takes it: None, or a one-element tensor (ints become one here)."""
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch must be an int, a float or a tensor, got {type(num_items_in_batch)}")
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch} "
                         "(a batch with no target to count has nothing to normalise)")  # fmt: skip
    return torch.tensor(num_items_in_batch)


def leading_dims_flatten_to_view(t: torch.Tensor) -> bool:
    """Whether t.reshape(-1, t.shape[-1]) is a view (so a gradient written into it lands in t)."""
    dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    return all(outer_stride == size * stride for (_, outer_stride), (size, stride) in itertools.pairwise(dims))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  num_items_in_batch: int | torch.Tensor | None = None, softcap: float | None = None,
                  logit_scale: float = 1.0, inplace_backward: bool = False) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of logits [..., V] against int64 targets [...], as F.cross_entropy with the extras
    of the module docstring. The loss is fp32; the gradient comes in the logits' dtype, written over
    the logits themselves when `inplace_backward` (they must not be needed after the backward)."""
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the logits' shape without its last (vocabulary) dimension: "
                         f"logits {list(logits.shape)}, targets {list(targets.shape)}")  # fmt: skip
    if inplace_backward and not leading_dims_flatten_to_view(logits):
        raise ValueError("inplace_backward needs logits whose leading dimensions flatten without a copy")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    loss, _ = cross_entropy_op(
        flat_logits, targets.reshape(-1), ignore_index, float(logit_scale), float(softcap or 0.0), reduction,
        as_normaliser(num_items_in_batch), inplace_backward,
    )  # fmt: skip
    return loss.view(targets.shape) if reduction == "none" and num_items_in_batch is None else loss
