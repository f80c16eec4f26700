"""Fused linear cross-entropy op: the chunked path with the Triton row kernel (under
TRITON_INTERPRET=1 on CPU tensors, matmuls by torch), the CPU kernel through the op and autograd,
against a float64 reference (matmul then cross-entropy) and within the tolerance rule."""

import math

import pytest
import torch
from loraforge.ops import cross_entropy as ce  # registers loraforge::cross_entropy*
from loraforge.ops import fused_linear_cross_entropy as flce  # registers loraforge::fused_linear_cross_entropy
from loraforge.triton_kernels import fused_linear_cross_entropy as kernels

from tests.ops._ce_tolerance import (
    assert_within_torch_error,
    max_error,
    plain_torch_cross_entropy,
    plain_torch_linear_cross_entropy,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOFTCAPS = (0.0, 7.5)
N, H, V = 37, 72, 1003  # hidden not a power of two; several kernel blocks per row at BLOCK
BLOCK = 512
TRITON_STEP = flce._chunk_loss_and_grad_triton_


def make_inputs(n, h, v, dtype, bias=False):
    x = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) * (2.0 / math.sqrt(h))).to(dtype)  # logits of spread ~2
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.25] = -100
    targets[0] = v - 1  # at least one counted row
    return x, weight, b, targets


def exact(x, weight, bias, targets, **kw):
    return flce.fused_linear_cross_entropy_reference(
        x.double(), weight.double(), bias.double() if bias is not None else None, targets, **kw
    )


DEFAULTS = {"ignore_index": -100, "logit_scale": 1.0, "softcap": 0.0, "reduction": "mean", "num_items_in_batch": None}


def run_chunked(x, weight, bias, targets, chunk_rows, step=TRITON_STEP, grad_weight_fp32=False,
                needs=(True, True, True), **kw):  # fmt: skip
    args = DEFAULTS | kw
    step_with_block = step
    if step is TRITON_STEP:

        def step_with_block(*a, **k):
            return kernels.cross_entropy_loss_and_grad_(*a, block=BLOCK, **k)

    return flce.chunked_forward(x, weight, bias, targets, args["ignore_index"], args["logit_scale"], args["softcap"],
                                args["reduction"], args["num_items_in_batch"], *needs, grad_weight_fp32, chunk_rows,
                                loss_and_grad_chunk_=step_with_block)  # fmt: skip


def check_all(outputs, x, weight, bias, targets, what, grad_weight_factor=2.0, other_matmul=False, **kw):
    """The tolerance rule on the loss and every gradient. On CPU our chunk matmuls round each logit
    as plain torch's one matmul does. `other_matmul` (cuBLAS against torch on CPU): the logits round
    differently, which moves a low-precision scalar loss by a coin flip of rounding noise, so the loss
    is held to 2^-9 of its size instead (the gradients, max over many values, still to the rule)."""
    loss, grad_x, grad_w, grad_b = outputs
    exact_out = exact(x, weight, bias, targets, **kw)
    torch_out = plain_torch_linear_cross_entropy(x, weight, bias, targets, **kw)
    assert loss.dtype == torch.float32 and grad_x.dtype == x.dtype and grad_w.dtype == weight.dtype
    if other_matmul:
        assert max_error(loss, exact_out[0]) <= 2**-9 * abs(exact_out[0].item()), f"{what} loss"
    else:
        assert_within_torch_error(loss, torch_out[0], exact_out[0], f"{what} loss")
    assert_within_torch_error(grad_x, torch_out[1], exact_out[1], f"{what} dX")
    assert_within_torch_error(grad_w, torch_out[2], exact_out[2], f"{what} dW", factor=grad_weight_factor)
    if bias is not None:
        assert_within_torch_error(grad_b, torch_out[3], exact_out[3], f"{what} db")


# ---------------------------------------------------------------------------------------------
# The Triton row kernel alone, on a chunk of logits.


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_chunk_kernel_matches_reference(seed, dtype, softcap):
    x, weight, _, targets = make_inputs(N, H, V, dtype)
    logits = x @ weight.T
    coef = torch.tensor(1.0 / 23)
    kw = {"ignore_index": -100, "logit_scale": 1.3, "softcap": softcap}
    loss_rows = torch.empty(N)
    untouched = logits.clone()
    kernels.cross_entropy_loss_and_grad_(untouched, targets, coef, loss_rows, write_grad=False, block=BLOCK, **kw)
    assert torch.equal(untouched, logits)  # write_grad=False reads only
    buffer = logits.clone()
    kernels.cross_entropy_loss_and_grad_(buffer, targets, coef, loss_rows, block=BLOCK, **kw)

    grad_loss = torch.tensor(1.0)
    exact_loss, lse = ce.cross_entropy_reference(logits.double(), targets, reduction="sum", **kw)
    exact_grad = ce.rows_grad(logits.double(), targets, lse, coef.double(), **kw)
    torch_loss, torch_grad = plain_torch_cross_entropy(logits, targets, grad_loss / 23, reduction="sum", **kw)
    assert_within_torch_error(loss_rows.sum(), torch_loss, exact_loss, "chunk loss")
    assert_within_torch_error(buffer, torch_grad, exact_grad, "chunk grad")


# ---------------------------------------------------------------------------------------------
# The CUDA path's chunk loop with the Triton step, on CPU tensors.


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_path_matches_reference(seed, dtype, softcap):
    x, weight, bias, targets = make_inputs(N, H, V, dtype, bias=True)
    kw = {"logit_scale": 0.8, "softcap": softcap}
    chunk_rows = 8  # 5 chunks, the last one ragged
    chunks = math.ceil(N / chunk_rows)
    fp32_acc = run_chunked(x, weight, bias, targets, chunk_rows, grad_weight_fp32=True, **kw)
    check_all(fp32_acc, x, weight, bias, targets, "fp32 dW", **kw)
    # dW accumulated in the weight's dtype rounds once per chunk (module docstring): held to twice
    # torch's error per sqrt(chunks), torch rounding dW once. Identical to the above for fp32.
    own_acc = run_chunked(x, weight, bias, targets, chunk_rows, **kw)
    check_all(own_acc, x, weight, bias, targets, "dW in weight dtype", grad_weight_factor=2.0 * math.sqrt(chunks), **kw)
    for ours, fp32 in zip(own_acc[:2], fp32_acc[:2]):
        assert torch.equal(ours, fp32)  # the loss and dX do not depend on how dW accumulates


def test_triton_path_one_token_and_sum(seed):
    x, weight, _, targets = make_inputs(1, 40, 777, torch.bfloat16)
    out = run_chunked(x, weight, None, targets, 0, reduction="sum", softcap=30.0)
    check_all(out, x, weight, None, targets, "one token", reduction="sum", softcap=30.0)


def test_cpu_step_equals_reference_step_closely(seed):
    x, weight, bias, targets = make_inputs(N, H, V, torch.float32, bias=True)
    triton_out = run_chunked(x, weight, bias, targets, 16, softcap=7.5)
    torch_out = run_chunked(x, weight, bias, targets, 16, step=flce._chunk_loss_and_grad_torch_, softcap=7.5)
    for a, b in zip(triton_out, torch_out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The op (CPU kernel) through autograd.


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_autograd_matches_reference(seed, dtype):
    x, weight, bias, targets = make_inputs(N, H, V, dtype, bias=True)
    for softcap, reduction, chunk_rows in ((0.0, "mean", None), (7.5, "sum", 10)):
        leaves = [t.clone().requires_grad_() for t in (x.view(1, N, H), weight, bias)]
        loss = flce.fused_linear_cross_entropy(
            leaves[0], leaves[1], targets.view(1, N), leaves[2], softcap=softcap, reduction=reduction,
            chunk_rows=chunk_rows, grad_weight_fp32=True,
        )  # fmt: skip
        loss.backward()
        outputs = (loss.detach(), leaves[0].grad.view(N, H), leaves[1].grad, leaves[2].grad)
        check_all(outputs, x, weight, bias, targets, f"op {reduction}", softcap=softcap, reduction=reduction)


def test_op_vocab_32003(seed):
    x, weight, _, targets = make_inputs(16, 96, 32003, torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    loss = flce.fused_linear_cross_entropy(*leaves, targets, softcap=30.0, chunk_rows=6)
    loss.backward()
    check_all((loss.detach(), leaves[0].grad, leaves[1].grad, None), x, weight, None, targets, "V=32003",
              grad_weight_factor=2.0 * math.sqrt(3), softcap=30.0)  # fmt: skip


def test_op_vocab_262144(seed):
    x, weight, _, _ = make_inputs(2, 24, 262144, torch.bfloat16)
    targets = torch.tensor([262143, 5])
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    loss = flce.fused_linear_cross_entropy(*leaves, targets, reduction="sum")
    loss.backward()
    check_all((loss.detach(), leaves[0].grad, leaves[1].grad, None), x, weight, None, targets, "V=262144",
              reduction="sum")  # fmt: skip


def test_frozen_head_forms_no_weight_gradient(seed):
    x, weight, _, targets = make_inputs(N, H, V, torch.bfloat16)
    hidden = x.clone().requires_grad_()
    loss = flce.fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert weight.grad is None
    _, grad_x, grad_w, _ = torch.ops.loraforge.fused_linear_cross_entropy(
        x, weight, None, targets, -100, 1.0, 0.0, "mean", None, True, False, False, False, 0
    )
    assert grad_w.numel() == 0 and torch.equal(grad_x, hidden.grad)
    with torch.no_grad():
        assert torch.equal(flce.fused_linear_cross_entropy(hidden, weight, targets), loss.detach())


def test_upstream_gradient_scales_and_single_backward(seed):
    x, weight, _, targets = make_inputs(N, H, V, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    flce.fused_linear_cross_entropy(*leaves, targets).backward()
    unit = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    loss = flce.fused_linear_cross_entropy(*leaves, targets)
    (loss * -2.5).backward(retain_graph=True)
    for t, g in zip(leaves, unit):
        assert torch.allclose(t.grad, -2.5 * g, rtol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()  # the gradients were scaled in place: a second backward must not reuse them


# ---------------------------------------------------------------------------------------------
# Normalisers, ignored rows, gradient accumulation.


def test_all_targets_ignored(seed):
    x, weight, _, _ = make_inputs(6, 32, 500, torch.bfloat16)
    targets = torch.full((6,), -100)
    for reduction, expected in (("sum", 0.0), ("mean", float("nan"))):
        for step in (TRITON_STEP, flce._chunk_loss_and_grad_torch_):
            loss, grad_x, grad_w, _ = run_chunked(x, weight, None, targets, 4, step=step, reduction=reduction,
                                                  needs=(True, True, False))  # fmt: skip
            assert torch.allclose(loss, torch.tensor(expected), equal_nan=True), (reduction, loss)
            assert not grad_x.any() and not grad_w.any()
    with pytest.raises(ValueError, match="num_items_in_batch"):
        flce.fused_linear_cross_entropy(x, weight, targets, num_items_in_batch=0)


def test_gradient_accumulation_is_exact(seed):
    """Four micro-batches normalised by the whole batch's token count accumulate to the full batch's
    gradient: dX row for row exactly, dW to fp32 summation order."""
    x, weight, _, targets = make_inputs(64, 48, 900, torch.float32)
    total = int((targets != -100).sum())
    hidden, head = x.clone().requires_grad_(), weight.clone().requires_grad_()
    full = flce.fused_linear_cross_entropy(hidden, head, targets, num_items_in_batch=total, chunk_rows=16)
    full.backward()
    full_grads = hidden.grad.clone(), head.grad.clone()
    hidden.grad = head.grad = None
    parts = 0.0
    for rows in torch.arange(64).chunk(4):
        part = flce.fused_linear_cross_entropy(hidden[rows], head, targets[rows], num_items_in_batch=total,
                                               chunk_rows=16)  # fmt: skip
        part.backward()
        parts = parts + part.detach()
    assert torch.allclose(parts, full.detach(), rtol=1e-6)
    assert torch.equal(hidden.grad, full_grads[0])
    assert torch.allclose(head.grad, full_grads[1], rtol=1e-5, atol=1e-8)
    # And the Triton path.
    outputs = [run_chunked(x[rows], weight, None, targets[rows], 16, num_items_in_batch=torch.tensor(total))
               for rows in torch.arange(64).chunk(4)]  # fmt: skip
    whole = run_chunked(x, weight, None, targets, 16, num_items_in_batch=torch.tensor(total))
    assert torch.equal(torch.cat([out[1] for out in outputs]), whole[1])
    assert torch.allclose(sum(out[2] for out in outputs), whole[2], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Chunk sizing, bad input, torch.library, torch.compile.


def test_default_chunk_rows():
    assert flce.default_chunk_rows(8192, 128256, 2) == 1024  # 251 MiB of bf16 logits
    assert flce.default_chunk_rows(8192, 262144, 2) == 512
    assert flce.default_chunk_rows(100, 32000, 2) == 100
    assert flce.default_chunk_rows(10**6, 10**9, 4) == 1


def test_bad_input_gives_clear_errors(seed):
    x, weight, bias, targets = make_inputs(8, 32, 100, torch.bfloat16, bias=True)
    call = flce.fused_linear_cross_entropy
    with pytest.raises(ValueError, match="hidden"):
        call(x[:, :16], weight, targets)
    with pytest.raises(ValueError, match="targets"):
        call(x, weight, targets[:7])
    with pytest.raises(TypeError, match="weight"):
        call(x, weight.float(), targets)
    with pytest.raises(TypeError, match="bias"):
        call(x, weight, targets, bias.float())
    with pytest.raises(ValueError, match="bias"):
        call(x, weight, targets, bias[:50])
    with pytest.raises(TypeError, match="targets"):
        call(x, weight, targets.int())
    with pytest.raises(ValueError, match="reduction"):
        call(x, weight, targets, reduction="none")
    for bad in (100, -1, 12345):
        wrong = targets.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match="targets"):
            call(x, weight, wrong)
        with pytest.raises(ValueError, match="targets"):
            run_chunked(x, weight, None, wrong, 4)


def test_opcheck(seed):
    x, weight, bias, targets = make_inputs(N, H, V, torch.bfloat16, bias=True)
    for args in (
        (x, weight, None, targets, -100, 1.0, 0.0, "mean", None, False, False, False, False, 0),
        (x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_(), targets, -100,
         0.5, 10.0, "sum", torch.tensor(9), True, True, True, False, 8),
        (x.float().requires_grad_(), weight.float(), None, targets, -100, 1.0, 0.0, "mean", None, True, False, False,
         True, 16),
    ):  # fmt: skip
        torch.library.opcheck(torch.ops.loraforge.fused_linear_cross_entropy, args)


def test_torch_compile_fullgraph(seed):
    x, weight, bias, targets = make_inputs(N, H, V, torch.float32, bias=True)

    def step(x, weight, bias, targets):
        return flce.fused_linear_cross_entropy(torch.tanh(x), weight, targets, bias, softcap=20.0, num_items_in_batch=9,
                                               chunk_rows=8) * 3  # fmt: skip

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        loss = fn(*leaves, targets)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for eager, compiled in zip(*grads):
        assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# On a GPU (the lead's run): Triton compiled for real, cuBLAS, both dW accumulations.


@pytest.mark.gpu
@pytest.mark.parametrize("grad_weight_fp32", (False, True))
def test_cuda_matches_reference(seed, grad_weight_fp32):
    x, weight, bias, targets = make_inputs(300, 256, 32003, torch.bfloat16, bias=True)
    leaves = [t.cuda().requires_grad_() for t in (x, weight, bias)]
    loss = flce.fused_linear_cross_entropy(leaves[0], leaves[1], targets.cuda(), leaves[2], softcap=30.0,
                                           chunk_rows=128, grad_weight_fp32=grad_weight_fp32)  # fmt: skip
    loss.backward()
    outputs = [loss.detach().cpu()] + [t.grad.cpu() for t in leaves]
    factor = 2.0 if grad_weight_fp32 else 2.0 * math.sqrt(3)
    check_all(outputs, x, weight, bias, targets, "cuda", grad_weight_factor=factor, other_matmul=True, softcap=30.0)


def test_backward_allocates_no_weight_sized_tensor(seed):
    """The gradients are formed in the forward; the backward must not fill, clone or copy anything of
    dW's size (autograd's zero gradients for the unused gradient outputs, or AccumulateGrad copying
    dW, each cost a whole extra [V, H] buffer on the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightSized(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.ops = tuple(shape), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            is_view = func._schema.is_mutable is False and any(a.alias_info for a in func._schema.returns)
            if not is_view and any(isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape for t in outs):
                self.ops.append(str(func))
            return out

    x = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(101, 24, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    loss = flce.fused_linear_cross_entropy(x, w, t)
    with WeightSized(w.shape) as mode:
        loss.backward()
    assert mode.ops == [], f"backward made weight-sized tensors with {mode.ops}"
    ref = flce.fused_linear_cross_entropy_reference(x.detach(), w.detach(), None, t)
    torch.testing.assert_close(w.grad, ref[2], rtol=1e-5, atol=1e-6)


def test_row_kernel_never_reads_a_bad_target_out_of_range(seed):
    """The target check's verdict is read after the kernels are queued, so the kernel itself must read
    nothing for a target outside [0, V): the row's loss is then lse - z(0), with no read past the row."""
    logits = torch.randn(3, 40) * 2
    expected_lse = torch.logsumexp(logits.double(), dim=1)
    for bad in (40, 10**6, -7):
        chunk = logits.clone()
        targets = torch.tensor([5, bad, 39])
        loss = torch.empty(3)
        kernels.cross_entropy_loss_and_grad_(chunk, targets, torch.tensor(1.0), loss, ignore_index=-100,
                                             logit_scale=1.0, softcap=0.0, write_grad=True, block=16)  # fmt: skip
        assert torch.allclose(loss[1].double(), expected_lse[1], atol=1e-5)
        assert torch.allclose(loss[[0, 2]].double(), expected_lse[[0, 2]] - logits[[0, 2], [5, 39]].double(),
                              atol=1e-5)  # fmt: skip
        assert torch.isfinite(chunk).all()


@pytest.mark.gpu
def test_cuda_bad_targets_raise_after_launch_and_leave_the_device_usable(seed):
    x, weight, _, targets = make_inputs(300, 64, 1000, torch.bfloat16)
    x, weight, targets = x.cuda().requires_grad_(), weight.cuda(), targets.cuda()
    for bad in (1000, 10**9, -3):
        wrong = targets.clone()
        wrong[-1] = bad
        with pytest.raises(ValueError, match=f"found {bad}"):
            flce.fused_linear_cross_entropy(x, weight, wrong, chunk_rows=64)
        with pytest.raises(ValueError, match=f"found {bad}"):
            ce.cross_entropy((x @ weight.T).detach(), wrong)
    loss = flce.fused_linear_cross_entropy(x, weight, targets, chunk_rows=64)
    loss.backward()
    torch.cuda.synchronize()  # a read out of range would surface here as a CUDA error
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
