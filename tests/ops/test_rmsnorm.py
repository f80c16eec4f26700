"""RMSNorm: the Triton kernels (on CPU through the interpreter) and the op against float64 and against
transformers' LlamaRMSNorm / GemmaRMSNorm in the same precision."""

import math
import warnings

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraforge.ops import rmsnorm
from loraforge.triton_kernels import rmsnorm as kernels
from tests.ops._tolerance import assert_within_rule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd on purpose: hidden not a power of two, one row, 7 rows, leading dims to flatten, many small rows,
# an odd hidden just above a Llama size.
SHAPES = ((7, 320), (1, 4100), (2, 3, 80), (37, 64), (5, 4097))
EPS = 1e-6
# Where the Triton kernels run: compiled on a GPU, through the interpreter (conftest) on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def exact_rms_norm(x, weight, eps, gemma):
    """The definition in float64, without the intermediate roundings of the low-precision forms."""
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + weight.double()) if gemma else weight.double())


def exact_grads(x, weight, grad_y, eps, gemma):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    return torch.autograd.grad(exact_rms_norm(x64, w64, eps, gemma), (x64, w64), grad_y.double())


def plain_module(weight, eps, gemma):
    """transformers' own module holding `weight`, in weight's dtype."""
    module = GemmaRMSNorm(weight.shape[0], eps=eps) if gemma else LlamaRMSNorm(weight.shape[0], eps=eps)
    module.weight = torch.nn.Parameter(weight.detach().clone())
    return module


def plain_forward_backward(x, weight, grad_y, eps, gemma):
    module = plain_module(weight, eps, gemma)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    grad_x, grad_w = torch.autograd.grad(y, (x, module.weight), grad_y)
    return y.detach(), grad_x, grad_w


def random_inputs(shape, dtype, gemma, weight_dtype=None, device="cpu"):
    x = (torch.randn(shape) * 3 + 0.5).to(dtype)
    # Llama weights sit near 1, Gemma's near 0 (it applies 1 + weight).
    weight = (torch.randn(shape[-1]) * 0.2 + (0.0 if gemma else 1.0)).to(weight_dtype or dtype)
    return x.to(device), weight.to(device)


def check_rstd(rstd, x2d, what):
    """The saved statistic against float64, under the same rule (plain torch: fp32 as transformers)."""
    x2d = x2d.cpu()
    plain = torch.rsqrt(x2d.float().pow(2).mean(-1) + EPS)
    assert rstd.dtype == torch.float32
    assert_within_rule(rstd.cpu(), plain, torch.rsqrt(x2d.double().pow(2).mean(-1) + EPS), what)


def check_all(y, grad_x, grad_w, x, weight, grad_y, gemma, what):
    """Ours against transformers and float64, all computed on CPU from the same values."""
    y, grad_x, grad_w, x, weight, grad_y = (t.cpu() for t in (y, grad_x, grad_w, x, weight, grad_y))
    plain_y, plain_gx, plain_gw = plain_forward_backward(x, weight, grad_y, EPS, gemma)
    exact_gx, exact_gw = exact_grads(x, weight, grad_y, EPS, gemma)
    assert_within_rule(y, plain_y, exact_rms_norm(x, weight, EPS, gemma), f"{what} y")
    assert_within_rule(grad_x, plain_gx, exact_gx, f"{what} grad_x")
    assert_within_rule(grad_w, plain_gw, exact_gw, f"{what} grad_weight")


@pytest.mark.parametrize("gemma", (False, True), ids=("llama", "gemma"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_within_rule(seed, dtype, gemma):
    for shape in SHAPES:
        x, weight = random_inputs(shape, dtype, gemma, device=DEVICE)
        x2d = x.reshape(-1, shape[-1])
        y, rstd = kernels.rms_norm_forward(x2d, weight, EPS, gemma, rmsnorm.output_dtype(x, weight, gemma))
        grad_y = torch.randn(y.shape).to(y.dtype).to(DEVICE)
        grad_x, grad_w = kernels.rms_norm_backward(grad_y, x2d, weight, rstd, gemma, weight_grad=True)
        check_all(y.view(shape), grad_x.view(shape), grad_w, x, weight, grad_y.view(shape), gemma, f"{shape}")
        check_rstd(rstd, x2d, f"{shape} rstd")


# Launch choices benchmarks/sweep_kernels.py compares (module-level overrides in the kernels' file). On a
# GPU each is its own compiled kernel; under the interpreter warps and stages change nothing, but tiles of
# several rows, a tail tile, the dw reduction and the grid do.
VARIANTS = {
    "defaults": {},
    "2rows_triton_dw": dict(BWD_BLOCK_ROWS=2, BWD_NUM_WARPS=16, BWD_STAGES=3, BWD_DW_REDUCE="triton",
                            DW_REDUCE_COLUMNS=128, FWD_BLOCK_ROWS=2, FWD_NUM_WARPS=4),
    "4rows_frozen_grid": dict(BWD_BLOCK_ROWS=4, BWD_STAGES=1, BWD_FROZEN_PERSISTENT=False, FWD_BLOCK_ROWS=1),
    "wide_tiles_4stages": dict(BWD_WIDE_TILES={8192: (2, 16)}, BWD_STAGES=4, BWD_FROZEN_PERSISTENT=False,
                               BWD_DW_REDUCE="triton", DW_REDUCE_COLUMNS=1024, DW_REDUCE_PARTIALS=2),
}  # fmt: skip
# (Wide dw-reduction tiles here only because the interpreter pays per program; test_dw_reductions_agree
# runs the default tile.)


def check_grad_x(grad_x, x, weight, grad_y, gemma, what):
    x, weight, grad_y = x.cpu(), weight.cpu(), grad_y.cpu()
    plain_gx = plain_forward_backward(x, weight, grad_y, EPS, gemma)[1]
    assert_within_rule(grad_x.cpu(), plain_gx, exact_grads(x, weight, grad_y, EPS, gemma)[0], what)


@pytest.mark.parametrize("gemma", (False, True), ids=("llama", "gemma"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_launch_variants_within_rule(seed, monkeypatch, variant, dtype, gemma):
    """Every launch variant, on odd shapes (rows not a multiple of the tile), with a full and a broadcast
    gradient, a trainable and a frozen weight, the saved rstd and the recomputed one."""
    for name, value in VARIANTS[variant].items():
        monkeypatch.setattr(kernels, name, value)
    for shape in SHAPES:
        x, weight = random_inputs(shape, dtype, gemma, device=DEVICE)
        x2d, what = x.reshape(-1, shape[-1]), f"{variant} {shape}"
        y, rstd = kernels.rms_norm_forward(x2d, weight, EPS, gemma, rmsnorm.output_dtype(x, weight, gemma))
        check_rstd(rstd, x2d, f"{what} rstd")
        grad_y = torch.randn(y.shape).to(y.dtype).to(DEVICE)
        ones = torch.ones((), dtype=y.dtype, device=DEVICE).expand(y.shape)
        grad_x, grad_w = kernels.rms_norm_backward(grad_y, x2d, weight, rstd, gemma, True)
        check_all(y.view(shape), grad_x.view(shape), grad_w, x, weight, grad_y.view(shape), gemma, what)

        # The recomputed rstd is the same computation as the forward's: under the interpreter (one
        # summation order) the same bits; on a GPU the reduction trees of the two launches may differ.
        again_x, again_w = kernels.rms_norm_backward(grad_y, x2d, weight, None, gemma, True, eps=EPS)
        if DEVICE == "cpu":
            assert torch.equal(again_x, grad_x) and torch.equal(again_w, grad_w), what
        check_all(y.view(shape), again_x.view(shape), again_w, x, weight, grad_y.view(shape), gemma,
                  f"{what} recomputed")  # fmt: skip

        frozen_x, none = kernels.rms_norm_backward(grad_y, x2d, weight, rstd, gemma, False)
        assert none is None and torch.equal(frozen_x, grad_x), what
        for weight_grad in (True, False):
            bcast_x, bcast_w = kernels.rms_norm_backward(ones, x2d, weight, rstd, gemma, weight_grad)
            if weight_grad:
                check_all(y.view(shape), bcast_x.view(shape), bcast_w, x, weight, ones.view(shape), gemma,
                          f"{what} broadcast dy")  # fmt: skip
            else:
                check_grad_x(bcast_x.view(shape), x, weight, ones.view(shape), gemma, f"{what} broadcast dy, frozen")


def test_backward_tile_rule(monkeypatch):
    """Measured wide-row tiles apply at their BLOCK_H only; the sweep's overrides win over both."""
    monkeypatch.setattr(kernels, "BWD_WIDE_TILES", {4096: (2, 16)})
    assert kernels._bwd_launch_config(4096) == (4096, 2, 16)
    assert kernels._bwd_launch_config(3000) == (4096, 2, 16)
    assert kernels._bwd_launch_config(8192) == kernels._launch_config(8192)
    assert kernels._bwd_launch_config(80) == kernels._launch_config(80)  # many rows a tile: the forward's rule
    monkeypatch.setattr(kernels, "BWD_NUM_WARPS", 4)
    assert kernels._bwd_launch_config(4096) == (4096, 2, 4)


def test_dw_reductions_agree(seed, monkeypatch):
    """The one-launch Triton sum of the dw partials against torch's sum then cast."""
    partial = torch.randn(37, 333, device=DEVICE) * 10
    for dtype in DTYPES:
        monkeypatch.setattr(kernels, "BWD_DW_REDUCE", "triton")
        ours = kernels._sum_partials(partial, dtype)
        plain = partial.cpu().sum(0).to(dtype)
        assert ours.dtype == dtype
        assert_within_rule(ours.cpu(), plain, partial.cpu().double().sum(0), f"{dtype}")
    monkeypatch.setattr(kernels, "BWD_DW_REDUCE", "atomics")
    with pytest.raises(ValueError, match="BWD_DW_REDUCE must be"):
        kernels._sum_partials(partial, torch.float32)


@pytest.mark.parametrize("gemma", (False, True), ids=("llama", "gemma"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_transformers(seed, dtype, gemma):
    for shape in SHAPES[:3]:
        x, weight = random_inputs(shape, dtype, gemma)
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = rmsnorm.rms_norm(xg, wg, EPS, gemma)
        plain_y = plain_module(weight, EPS, gemma)(x)
        assert y.dtype == plain_y.dtype and torch.equal(y, plain_y)  # the reference is transformers' formula
        grad_y = torch.randn(shape).to(y.dtype)
        grad_x, grad_w = torch.autograd.grad(y, (xg, wg), grad_y)
        check_all(y.detach(), grad_x, grad_w, x, weight, grad_y, gemma, f"{shape}")


@pytest.mark.parametrize("gemma", (False, True), ids=("llama", "gemma"))
def test_cuda_kernels_of_the_op(seed, gemma):
    """The op's CUDA kernels (reshape, strides, Triton launch); on CPU tensors through the interpreter."""
    x, weight = random_inputs((3, 5, 96), torch.bfloat16, gemma, device=DEVICE)
    x = x.transpose(0, 1)  # leading dims that cannot be flattened as a view
    grad_y = torch.randn(x.shape).to(torch.bfloat16).to(DEVICE)
    y, rstd = rmsnorm._forward_cuda(x, weight, EPS, gemma)
    grad_x, grad_w = rmsnorm._backward_cuda(grad_y, x, weight, rstd, gemma, True)
    assert y.shape == x.shape and rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    check_all(y, grad_x, grad_w, x, weight, grad_y, gemma, "cuda path")
    no_grad_x, empty = rmsnorm._backward_cuda(grad_y, x, weight, rstd, gemma, False)
    assert torch.equal(no_grad_x, grad_x) and empty.numel() == 0


def test_mixed_dtypes_follow_transformers(seed):
    """fp32 norm weights (as PEFT's prepare_model_for_kbit_training leaves them) with bf16 activations:
    Llama's output is promoted to fp32, Gemma's stays bf16."""
    for gemma in (False, True):
        x, weight = random_inputs((4, 320), torch.bfloat16, gemma, weight_dtype=torch.float32)
        plain_y = plain_module(weight, EPS, gemma)(x)
        assert torch.equal(rmsnorm.rms_norm(x, weight, EPS, gemma), plain_y)
        x, weight = x.to(DEVICE), weight.to(DEVICE)
        y, rstd = kernels.rms_norm_forward(x, weight, EPS, gemma, rmsnorm.output_dtype(x, weight, gemma))
        assert y.dtype == plain_y.dtype == (torch.bfloat16 if gemma else torch.float32)
        grad_y = torch.randn(x.shape).to(y.dtype).to(DEVICE)
        grad_x, grad_w = kernels.rms_norm_backward(grad_y, x, weight, rstd, gemma, weight_grad=True)
        check_all(y, grad_x, grad_w, x, weight, grad_y, gemma, f"gemma={gemma}")


def test_broadcast_gradient_and_program_counts(seed):
    """`y.sum().backward()` hands a gradient with all strides 0: read in place; and the dw partial
    sums give the same answer whatever the number of programs."""
    x, weight = random_inputs((9, 200), torch.float32, False, device=DEVICE)
    ones = torch.ones((), device=DEVICE).expand(9, 200)
    rstd = kernels.rms_norm_forward(x, weight, EPS, False, x.dtype)[1]
    expected = kernels.rms_norm_backward(ones.contiguous(), x, weight, rstd, False, True)
    for programs in (1, 2, 9):
        grad_x, grad_w = kernels.rms_norm_backward(ones, x, weight, rstd, False, True, num_programs=programs)
        assert torch.equal(grad_x, expected[0])
        torch.testing.assert_close(grad_w, expected[1], rtol=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient(seed):
    x, weight = random_inputs((5, 64), torch.float32, False)
    xg = x.clone().requires_grad_()
    rmsnorm.rms_norm(xg, weight).sum().backward()
    assert xg.grad is not None and weight.grad is None
    y, rstd = torch.ops.loraforge.rms_norm(xg, weight, EPS, False)
    assert y.requires_grad and not rstd.requires_grad  # rstd is a statistic for the backward, not differentiable
    _, grad_w = torch.ops.loraforge.rms_norm_backward(torch.ones(5, 64), x, weight, rstd, False, False)
    assert grad_w.numel() == 0


def test_reference_backward_reads_the_forwards_rstd(seed):
    """On CPU the op saves exactly the rstd the reference forward computes (and the backward computed
    before it was saved), so gradients are the same bits as with the statistic recomputed."""
    x, weight = random_inputs((3, 7, 96), torch.bfloat16, False)
    y, rstd = torch.ops.loraforge.rms_norm(x, weight, EPS, False)
    assert torch.equal(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + EPS))
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grad_y = torch.randn(x.shape).to(torch.bfloat16)
    grad_x, grad_w = torch.autograd.grad(rmsnorm.rms_norm(xg, wg, EPS), (xg, wg), grad_y)
    recomputed = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)  # what the backward did before
    expected = rmsnorm.rms_norm_backward_reference(grad_y, x, weight, recomputed, False, True)
    assert torch.equal(grad_x, expected[0]) and torch.equal(grad_w, expected[1])


@pytest.mark.parametrize("shape", [(3, 5, 96), (7, 40), (1, 1, 8)])
def test_padded_rows_hold_the_same_output(seed, shape):
    """row_padding: y's rows lie hidden + padding elements apart in a storage that holds every row's
    padding (so a reader may use those columns); the values are the unpadded output's, bit for bit, in
    both kernels (the CUDA one on CPU through the interpreter), and y is no view of anything."""
    x, weight = random_inputs(shape, torch.bfloat16, False, device=DEVICE)
    rows, hidden = math.prod(shape[:-1]), shape[-1]
    for forward in (rmsnorm._forward_cuda, rmsnorm._forward_reference):
        plain, plain_rstd = forward(x, weight, EPS, False)
        y, rstd = forward(x, weight, EPS, False, 24)
        assert y.shape == x.shape and y.stride()[-2:] == (hidden + 24, 1) and y._base is None
        assert y.untyped_storage().nbytes() == rows * (hidden + 24) * y.element_size()
        assert torch.equal(y, plain) and torch.equal(rstd, plain_rstd)
    x = x.cpu().float().requires_grad_()
    torch.library.opcheck(torch.ops.loraforge.rms_norm.default, (x, weight.cpu().float(), EPS, False, 8))
    y = rmsnorm.rms_norm(x, weight.cpu().float(), EPS, False, 8)
    grad = torch.randn(shape)
    assert torch.equal(torch.autograd.grad(y, x, grad)[0],
                       torch.autograd.grad(rmsnorm.rms_norm(x, weight.cpu().float(), EPS), x, grad)[0])  # fmt: skip
    with pytest.raises(ValueError, match="row_padding"):
        rmsnorm.rms_norm(x, weight.cpu().float(), EPS, False, -1)


def test_opcheck_and_compile(seed):
    for gemma in (False, True):
        x, weight = random_inputs((6, 48), torch.float32, gemma)
        torch.library.opcheck(torch.ops.loraforge.rms_norm.default, (x.requires_grad_(), weight.requires_grad_(),
                                                                      EPS, gemma))  # fmt: skip
        x, weight = x.detach(), weight.detach()
        rstd = torch.ops.loraforge.rms_norm(x, weight, EPS, gemma)[1]
        for weight_grad in (True, False):
            torch.library.opcheck(torch.ops.loraforge.rms_norm_backward.default,
                                  (torch.randn(6, 48), x, weight, rstd, gemma, weight_grad))  # fmt: skip
    # Leading dims that cannot be flattened as a view: outputs stay contiguous, as the fake kernel says.
    x = random_inputs((4, 3, 48), torch.float32, False)[0].transpose(0, 1)
    torch.library.opcheck(torch.ops.loraforge.rms_norm.default, (x, weight, EPS, False))
    rstd = torch.ops.loraforge.rms_norm(x, weight, EPS, False)[1]
    torch.library.opcheck(torch.ops.loraforge.rms_norm_backward.default, (torch.randn(3, 4, 48), x, weight, rstd,
                                                                          False, True))  # fmt: skip

    def norm_then_loss(x, weight):
        return (rmsnorm.rms_norm(x, weight, EPS, True) * 2).square().sum()

    x, weight = random_inputs((6, 48), torch.float32, True)
    eager_x, eager_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    norm_then_loss(eager_x, eager_w).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(norm_then_loss, fullgraph=True, backend="aot_eager")
        comp_x, comp_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        compiled(comp_x, comp_w).backward()
    assert torch.equal(comp_x.grad, eager_x.grad) and torch.equal(comp_w.grad, eager_w.grad)


def test_bad_input_raises_clear_errors():
    x, weight = torch.randn(4, 64), torch.randn(64)
    with pytest.raises(ValueError, match=r"weight must be \[64\]"):
        rmsnorm.rms_norm(x, torch.randn(32))
    with pytest.raises(TypeError, match="x must be float32"):
        rmsnorm.rms_norm(x.to(torch.int32), weight)
    with pytest.raises(TypeError, match="weight must be float32"):
        rmsnorm.rms_norm(x, weight.double())
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        rmsnorm.rms_norm(x, weight.to("meta"))
    with pytest.raises(ValueError, match="eps must be"):
        rmsnorm.rms_norm(x, weight, eps=-1.0)
    rstd = torch.ones(4)
    with pytest.raises(ValueError, match="grad_y has shape"):
        torch.ops.loraforge.rms_norm_backward(torch.randn(4, 32), x, weight, rstd, False, True)
    with pytest.raises(ValueError, match=r"rstd must be \[4\]"):
        torch.ops.loraforge.rms_norm_backward(x, x, weight, torch.ones(4, 1), False, True)
    with pytest.raises(TypeError, match="rstd must be the forward's float32"):
        torch.ops.loraforge.rms_norm_backward(x, x, weight, rstd.double(), False, True)
    with pytest.raises(ValueError, match="needs the forward's rstd, or eps"):
        kernels.rms_norm_backward(x, x, weight, None, False, True)
    with pytest.raises(ValueError, match="above the 65536"):
        kernels.rms_norm_forward(torch.randn(1, 70000), torch.randn(70000), EPS, False, torch.float32)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", (False, True), ids=("llama", "gemma"))
def test_op_on_gpu_within_rule(seed, gemma):
    """Through dispatch and autograd on CUDA at a model's size, eager and under torch.compile (inductor)."""
    x, weight = random_inputs((2, 1027, 4096), torch.bfloat16, gemma, device="cuda")
    grad_y = torch.randn(x.shape, device="cuda").to(torch.bfloat16)
    for norm in (rmsnorm.rms_norm, torch.compile(rmsnorm.rms_norm, fullgraph=True)):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = norm(xg, wg, EPS, gemma)
        grad_x, grad_w = torch.autograd.grad(y, (xg, wg), grad_y)
        check_all(y.detach(), grad_x, grad_w, x, weight, grad_y, gemma, "cuda")
