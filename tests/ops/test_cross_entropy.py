"""Cross-entropy op: the Triton kernels (under TRITON_INTERPRET=1 on CPU, called through the CUDA
path's functions), the CPU kernel through the op and autograd, against a float64 reference and
within the tolerance rule (tests/ops/_ce_tolerance.py)."""

import pytest
import torch
import torch.nn.functional as F
from loraforge.ops import cross_entropy as ce  # registers loraforge::cross_entropy*

from tests.ops._ce_tolerance import assert_within_torch_error, plain_torch_cross_entropy

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SOFTCAPS = (0.0, 7.5)
REDUCTIONS = ("mean", "sum", "none")
INTERPRETER_SHAPES = ((1, 1000), (29, 3001))  # one token; several blocks of 1,024 with a ragged tail
BLOCK = 1024  # small blocks, so the interpreter walks several per row


def make_logits(n, v, dtype, spread=4.0):
    """Logits of LLM-like spread: a wide bulk and a few large values per row."""
    logits = torch.randn(n, v) * spread
    logits[torch.arange(n), torch.randint(0, v, (n,))] += 12.0
    return logits.to(dtype)


def make_targets(n, v, ignore_index=-100, ignored=0.25):
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < ignored] = ignore_index
    targets[0] = v - 1  # at least one counted row (all-ignored batches have their own test)
    return targets


def upstream(reduction, n):
    return torch.randn(n) if reduction == "none" else torch.tensor(1.7)


def exact(logits, targets, grad_loss, **kw):
    """Float64 loss and gradient by the definition, from the same low-precision logits."""
    wide = logits.double()
    loss, lse = ce.cross_entropy_reference(wide, targets, **kw)
    return loss, ce.cross_entropy_grad_reference(grad_loss.double(), wide, targets, lse, **kw)


def check_against_reference(loss, grad, logits, targets, grad_loss, what, **kw):
    exact_loss, exact_grad = exact(logits, targets, grad_loss, **kw)
    torch_loss, torch_grad = plain_torch_cross_entropy(logits, targets, grad_loss, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_within_torch_error(loss, torch_loss, exact_loss, f"{what} loss")
    assert_within_torch_error(grad, torch_grad, exact_grad, f"{what} grad")


# ---------------------------------------------------------------------------------------------
# Triton kernels, through the CUDA path's functions, on CPU tensors under the interpreter.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_forward_backward_match_reference(seed, dtype, softcap, reduction):
    for n, v in INTERPRETER_SHAPES:
        logits, targets = make_logits(n, v, dtype), make_targets(n, v)
        kw = {"ignore_index": -100, "logit_scale": 1.25, "softcap": softcap, "reduction": reduction}
        loss, lse = ce.forward_triton(logits, targets, num_items_in_batch=None, block=BLOCK, **kw)
        grad_loss = upstream(reduction, n)
        grad = ce.backward_triton_into(None, grad_loss, logits, targets, lse, num_items_in_batch=None, block=BLOCK,
                                       **kw)  # fmt: skip
        check_against_reference(loss, grad, logits, targets, grad_loss, f"triton {n}x{v}", **kw)
        valid = targets != -100
        _, exact_lse = ce.rows_loss_and_lse(logits.double(), targets, -100, 1.25, softcap)
        assert torch.allclose(lse[valid].double(), exact_lse[valid], rtol=1e-6, atol=1e-5)


def test_triton_inplace_backward_and_custom_ignore_index(seed):
    n, v = 17, 2049
    logits, targets = make_logits(n, v, torch.bfloat16), make_targets(n, v, ignore_index=5)
    kw = {"ignore_index": 5, "logit_scale": 1.0, "softcap": 30.0, "reduction": "mean", "num_items_in_batch": None}
    loss, lse = ce.forward_triton(logits, targets, block=BLOCK, **kw)
    grad = ce.backward_triton_into(None, torch.tensor(1.0), logits, targets, lse, block=BLOCK, **kw)
    buffer = logits.clone()
    returned = ce.backward_triton_into(buffer, torch.tensor(1.0), buffer, targets, lse, block=BLOCK, **kw)
    assert returned is buffer and torch.equal(buffer, grad)
    ignored = targets == 5
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    # ignore_index inside the class range, as torch allows.
    expected = F.cross_entropy(softcapped_fp32(logits, 30.0), targets, ignore_index=5)
    assert torch.allclose(loss, expected, rtol=1e-5)


def softcapped_fp32(logits, cap):
    return cap * torch.tanh(logits.float() / cap)


def test_triton_rows_starting_with_minus_inf(seed):
    """A row whose first blocks are all -inf (masked tokens) must not make a nan."""
    logits = make_logits(3, 3001, torch.float32)
    logits[:, :2048] = float("-inf")
    targets = torch.tensor([2100, 3000, -100])
    loss, lse = ce.forward_triton(logits, targets, -100, 1.0, 0.0, "none", None, block=BLOCK)
    expected = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    grad = ce.backward_triton_into(None, torch.ones(3), logits, targets, lse, -100, 1.0, 0.0, "none", None, block=BLOCK)
    assert torch.isfinite(grad).all() and torch.equal(grad[:, :2048], torch.zeros(3, 2048))


# ---------------------------------------------------------------------------------------------
# The op (CPU kernel) through autograd.


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_autograd_matches_reference(seed, dtype, softcap):
    for reduction in REDUCTIONS:
        logits, targets = make_logits(3 * 7, 1000, dtype), make_targets(3 * 7, 1000)
        leaf = logits.view(3, 7, 1000).clone().requires_grad_()
        loss = ce.cross_entropy(leaf, targets.view(3, 7), reduction=reduction, softcap=softcap or None,
                                logit_scale=0.9)  # fmt: skip
        grad_loss = upstream(reduction, 21)
        loss.backward(grad_loss.view(loss.shape))
        assert loss.shape == ((3, 7) if reduction == "none" else ())
        kw = {"ignore_index": -100, "logit_scale": 0.9, "softcap": softcap, "reduction": reduction}
        flat_loss = loss.detach().reshape(-1) if reduction == "none" else loss.detach()
        flat_grad = leaf.grad.view(21, 1000)
        check_against_reference(flat_loss, flat_grad, logits, targets, grad_loss, f"op {reduction}", **kw)


def test_op_vocab_32003(seed):
    logits, targets = make_logits(24, 32003, torch.bfloat16), make_targets(24, 32003)
    leaf = logits.clone().requires_grad_()
    loss = ce.cross_entropy(leaf, targets, softcap=30.0)
    loss.backward()
    check_against_reference(loss.detach(), leaf.grad, logits, targets, torch.tensor(1.0), "V=32003",
                            ignore_index=-100, softcap=30.0)  # fmt: skip


def test_op_vocab_262144(seed):
    logits, targets = make_logits(2, 262144, torch.bfloat16), torch.tensor([7, 262143])
    leaf = logits.clone().requires_grad_()
    loss = ce.cross_entropy(leaf, targets, reduction="sum")
    loss.backward()
    check_against_reference(loss.detach(), leaf.grad, logits, targets, torch.tensor(1.0), "V=262144",
                            reduction="sum")  # fmt: skip


def test_inplace_backward_writes_into_the_logits(seed):
    weight = torch.randn(64, 500, requires_grad=True)
    hidden, targets = torch.randn(12, 64), make_targets(12, 500)
    expected = torch.autograd.grad(ce.cross_entropy(hidden @ weight, targets, softcap=20.0), weight)[0]
    logits = hidden @ weight
    loss = ce.cross_entropy(logits, targets, softcap=20.0, inplace_backward=True)
    logits_grad = []
    logits.register_hook(logits_grad.append)
    loss.backward()
    assert torch.allclose(weight.grad, expected, rtol=1e-6, atol=1e-7)
    assert logits_grad[0].data_ptr() == logits.data_ptr()  # the gradient lives in the logits' buffer


def test_inplace_backward_refuses_when_the_logits_are_needed(seed):
    leaf = torch.randn(4, 300, requires_grad=True)
    logits = leaf * 2
    other = (logits**2).sum()  # saves the logits for its own backward
    loss = ce.cross_entropy(logits, make_targets(4, 300, ignored=0.0), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


# ---------------------------------------------------------------------------------------------
# Normalisers, ignored rows, gradient accumulation.


def test_all_targets_ignored(seed):
    logits = make_logits(5, 1000, torch.bfloat16)
    targets = torch.full((5,), -100)
    for path in ("op", "triton"):
        for reduction, expected in (("sum", 0.0), ("mean", float("nan")), ("none", 0.0)):
            if path == "op":
                leaf = logits.clone().requires_grad_()
                loss = ce.cross_entropy(leaf, targets, reduction=reduction)
                loss.sum().backward()
                grad = leaf.grad
            else:
                loss, lse = ce.forward_triton(logits, targets, -100, 1.0, 0.0, reduction, None, block=BLOCK)
                grad = ce.backward_triton_into(None, torch.ones_like(loss), logits, targets, lse, -100, 1.0, 0.0,
                                               reduction, None, block=BLOCK)  # fmt: skip
            # As torch: 0 for "sum", nan (0 / 0) for "mean"; the gradient is 0 either way.
            assert torch.allclose(loss, torch.full_like(loss, expected), equal_nan=True), (path, reduction, loss)
            assert torch.equal(grad, torch.zeros_like(grad)), (path, reduction)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ce.cross_entropy(logits, targets, num_items_in_batch=0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ce.cross_entropy(logits, targets, num_items_in_batch=torch.tensor(0))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gradient_accumulation_is_exact(seed, dtype):
    """Four micro-batches, each normalised by the whole batch's token count, give the full batch's
    loss and gradient: exactly for each row's gradient, to fp32 summation order for the loss."""
    n, v = 64, 700
    logits, targets = make_logits(n, v, dtype), make_targets(n, v)
    total = int((targets != -100).sum())
    leaf = logits.clone().requires_grad_()
    full = ce.cross_entropy(leaf, targets, num_items_in_batch=total, softcap=15.0)
    full.backward()
    full_grad, leaf.grad = leaf.grad.clone(), None
    parts = 0.0
    for rows in torch.arange(n).chunk(4):
        part = ce.cross_entropy(leaf[rows], targets[rows], num_items_in_batch=total, softcap=15.0)
        part.backward()
        parts = parts + part.detach()
    assert torch.equal(leaf.grad, full_grad)
    assert torch.allclose(parts, full.detach(), rtol=1e-6)
    # Mean over the micro-batch would not be: the normaliser is what makes it exact.
    assert torch.allclose(full, ce.cross_entropy(logits, targets, softcap=15.0), rtol=1e-6)
    # The Triton path, the same way.
    grads = []
    for rows in torch.arange(n).chunk(4):
        _, lse = ce.forward_triton(logits[rows], targets[rows], -100, 1.0, 15.0, "mean", torch.tensor(total),
                                   block=BLOCK)  # fmt: skip
        grads.append(ce.backward_triton_into(None, torch.tensor(1.0), logits[rows], targets[rows], lse, -100, 1.0,
                                             15.0, "mean", torch.tensor(total), block=BLOCK))  # fmt: skip
    _, lse = ce.forward_triton(logits, targets, -100, 1.0, 15.0, "mean", torch.tensor(total), block=BLOCK)
    whole = ce.backward_triton_into(None, torch.tensor(1.0), logits, targets, lse, -100, 1.0, 15.0, "mean",
                                    torch.tensor(total), block=BLOCK)  # fmt: skip
    assert torch.equal(torch.cat(grads), whole)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_gives_clear_errors(seed):
    logits, targets = make_logits(6, 100, torch.bfloat16), make_targets(6, 100)
    with pytest.raises(ValueError, match="targets"):
        ce.cross_entropy(logits, targets[:5])
    with pytest.raises(TypeError, match="targets"):
        ce.cross_entropy(logits, targets.int())
    with pytest.raises(TypeError, match="logits"):
        ce.cross_entropy(logits.to(torch.float64), targets)
    with pytest.raises(ValueError, match="reduction"):
        ce.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ce.cross_entropy(logits, targets, reduction="none", num_items_in_batch=3)
    with pytest.raises(ValueError, match="logits"):
        torch.ops.loraforge.cross_entropy(logits.view(-1), targets, -100, 1.0, 0.0, "mean", None, False)
    for bad in (100, -1, -101, 10**9):
        wrong = targets.clone()
        wrong[2] = bad
        with pytest.raises(ValueError, match="targets"):
            ce.cross_entropy(logits, wrong)
        with pytest.raises(ValueError, match="targets"):
            ce.forward_triton(logits, wrong, -100, 1.0, 0.0, "mean", None)
    # -1 is fine when it is the ignore index.
    wrong = targets.clamp(min=0)
    wrong[2] = -1
    assert torch.isfinite(ce.cross_entropy(logits, wrong, ignore_index=-1))


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile.


def test_opcheck(seed):
    logits, targets = make_logits(5, 300, torch.bfloat16), make_targets(5, 300)
    for args in (
        (logits, targets, -100, 1.0, 0.0, "mean", None, False),
        (logits.float().requires_grad_(), targets, -100, 0.5, 10.0, "sum", torch.tensor(4), False),
        (logits.clone().requires_grad_(), targets, -100, 1.0, 0.0, "none", None, True),
    ):
        torch.library.opcheck(torch.ops.loraforge.cross_entropy, args)
    _, lse = torch.ops.loraforge.cross_entropy(logits, targets, -100, 1.0, 5.0, "mean", None, False)
    rest = (targets, lse, -100, 1.0, 5.0, "mean", None)
    torch.library.opcheck(torch.ops.loraforge.cross_entropy_backward, (torch.tensor(1.0), logits, *rest))
    torch.library.opcheck(torch.ops.loraforge.cross_entropy_backward_, (torch.tensor(1.0), logits.clone(), *rest))


@pytest.mark.parametrize("inplace_backward", (False, True))
def test_torch_compile_fullgraph(seed, inplace_backward):
    hidden, targets = torch.randn(10, 32), make_targets(10, 400)
    weight = torch.randn(32, 400, requires_grad=True)

    def step(hidden, weight, targets):
        return ce.cross_entropy(hidden @ weight, targets, softcap=20.0, num_items_in_batch=8,
                                inplace_backward=inplace_backward)  # fmt: skip

    eager = step(hidden, weight, targets)
    eager_grad = torch.autograd.grad(eager, weight)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, weight, targets)
    compiled_grad = torch.autograd.grad(compiled, weight)[0]
    assert torch.allclose(compiled, eager) and torch.allclose(compiled_grad, eager_grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# On a GPU (the lead's run): the Triton kernels compiled for real.


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_cuda_matches_reference(seed, softcap):
    logits, targets = make_logits(64, 128256, torch.bfloat16).cuda(), make_targets(64, 128256).cuda()
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        buffer = leaf * 1  # a non-leaf buffer the in-place backward may overwrite
        loss = ce.cross_entropy(buffer, targets, softcap=softcap or None, inplace_backward=inplace)
        loss.backward()
        check_against_reference(loss.detach().cpu(), leaf.grad.cpu(), logits.cpu(), targets.cpu(), torch.tensor(1.0),
                                "cuda", softcap=softcap)  # fmt: skip
