"""loraforge::gated_lora_backward_ (the activation backward with the MLP's LoRA products folded in): its
Triton kernel (on CPU through the interpreter) and the op, against the plain activation backward and
float64 products of what that backward stores; and the fused MLP's gradients with the fold on and off."""

import pytest
import torch

from loraforge.ops import gated_lora_backward as fold_ops
from loraforge.triton_kernels import gated_lora_backward as kernels
from loraforge.triton_kernels import swiglu as glu_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
# (n, I, r_g, r_u, r_d): odd sizes, one row, ranks that are not powers of two and one above 16
SHAPES = ((37, 200, 5, 16, 8), (70, 130, 16, 16, 16), (1, 70, 3, 2, 1), (45, 96, 24, 7, 33))


def inputs(n, cols, ranks, dtype, device=DEVICE):
    """(dHm [n, I], [G | U] buffer [n, 2 I], H_gu [n, r_g + r_u], dHd [n, r_d]); G spread over both tails."""
    gu = torch.cat([torch.randn(n, cols) * 3, torch.randn(n, cols)], dim=1)
    tensors = (torch.randn(n, cols), gu, torch.randn(n, ranks[0] + ranks[1]), torch.randn(n, ranks[2]))
    return tuple(t.to(dtype).to(device) for t in tensors)


def expected(dh, gu, h_gu, ghd, ranks, activation):
    """(Hm, dG, dU) from the plain activation backward kernel (write_h), and the three products in float64
    of those stored values."""
    cols = dh.shape[1]
    dh, gu = dh.clone(), gu.clone()
    glu_kernels.swiglu_backward(dh, gu[:, :cols], gu[:, cols:], activation, gu[:, :cols], gu[:, cols:], write_h=True)
    dg, du = gu[:, :cols], gu[:, cols:]
    h_g, h_u = h_gu[:, : ranks[0]].double(), h_gu[:, ranks[0] :].double()
    products = (dg.double().t() @ h_g, du.double().t() @ h_u, ghd.double().t() @ dh.double())
    return (dh, dg, du), products


def assert_products_close(ours, truth, dtype):
    """fp32 accumulation of exact products: relative to each product's scale, a few fp32 ulps times the
    sqrt of the summed length (fp32 inputs are multiplied in fp32, so their products round too)."""
    for name, mine, exact in zip(("dG^T H_g", "dU^T H_u", "dHd^T Hm"), ours, truth):
        assert mine.dtype == torch.float32 and mine.shape == exact.shape, name
        scale = exact.abs().max().item() + 1e-30
        err = (mine.double().cpu() - exact.cpu()).abs().max().item() / scale
        assert err < 1e-5, f"{name} ({dtype}): relative error {err:.2e}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_kernel_matches_the_activation_backward_and_float64_products(seed, dtype, activation):
    for n, cols, *ranks in SHAPES:
        dh, gu, h_gu, ghd = inputs(n, cols, ranks, dtype)
        (want_h, want_dg, want_du), truth = expected(dh, gu, h_gu, ghd, ranks, activation)
        ours = kernels.gated_lora_backward(dh, gu[:, :cols], gu[:, cols:], activation,
                                           *h_gu.split(ranks[:2], dim=1), ghd)  # fmt: skip
        # The elementwise outputs are the plain kernel's, bit for bit, written in place.
        assert torch.equal(dh, want_h) and torch.equal(gu[:, :cols], want_dg) and torch.equal(gu[:, cols:], want_du)
        assert_products_close(ours, truth, dtype)


def test_row_splits_sum_to_the_same_products(seed, monkeypatch):
    """Several programs per column strip (their fp32 partials summed) give the same results as one."""
    n, cols, ranks = 300, 100, (16, 16, 16)
    dh, gu, h_gu, ghd = inputs(n, cols, ranks, torch.bfloat16)
    (want_h, _, _), truth = expected(dh, gu, h_gu, ghd, ranks, "silu")
    for splits in (1, 3):
        monkeypatch.setattr(kernels, "_splits", lambda *_args, s=splits: s)
        dh_s, gu_s = dh.clone(), gu.clone()
        ours = kernels.gated_lora_backward(dh_s, gu_s[:, :cols], gu_s[:, cols:], "silu",
                                           *h_gu.split(ranks[:2], dim=1), ghd)  # fmt: skip
        assert torch.equal(dh_s, want_h)
        assert_products_close(ours, truth, f"{splits} splits")


def test_op_reference_and_kernel_agree(seed):
    """The op's reference (CPU) and its CUDA kernel path (on CPU tensors through the interpreter), from the
    same inputs: the same in-place results within one bf16 rounding (torch's and Triton's activation may
    differ in the last fp32 bit), products within the accumulation tolerance of what each stored."""
    n, cols, ranks = 41, 150, (16, 16, 16)
    dh, gu, h_gu, ghd = inputs(n, cols, ranks, torch.bfloat16)
    results = []
    for impl in (fold_ops._reference, fold_ops._cuda):
        dh_i, gu_i = dh.clone(), gu.clone()
        products = impl(dh_i, gu_i[:, :cols], gu_i[:, cols:], "gelu", *h_gu.split(ranks[:2], dim=1), ghd)
        truth = (gu_i[:, :cols].double().t() @ h_gu[:, :16].double(), gu_i[:, cols:].double().t() @ h_gu[:, 16:].double(),
                 ghd.double().t() @ dh_i.double())  # fmt: skip
        assert_products_close(products, truth, impl.__name__)
        results.append((dh_i, gu_i))
    torch.testing.assert_close(results[0], results[1], rtol=2**-7, atol=1e-6)


def test_opcheck():
    dh, gu, h_gu, ghd = inputs(6, 24, (3, 4, 5), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.loraforge.gated_lora_backward_.default,
                          (dh, gu[:, :24].clone(), gu[:, 24:].clone(), "silu", h_gu[:, :3], h_gu[:, 3:], ghd))  # fmt: skip


def test_bad_input_raises_clear_errors():
    dh, gu, h_gu, ghd = inputs(6, 24, (3, 4, 5), torch.float32, "cpu")
    g, u = gu[:, :24], gu[:, 24:]
    op = torch.ops.loraforge.gated_lora_backward_
    with pytest.raises(ValueError, match=r"h_gate must be \[6, r\] with 0 < r <= 128"):
        op(dh, g, u, "silu", h_gu[:5, :3], h_gu[:, 3:], ghd)
    with pytest.raises(ValueError, match=r"grad_hd must be \[6, r\] with 0 < r <= 128"):
        op(dh, g, u, "silu", h_gu[:, :3], h_gu[:, 3:], torch.randn(6, 129))
    with pytest.raises(ValueError, match="h_up must be torch.float32 on cpu like gate"):
        op(dh, g, u, "silu", h_gu[:, :3], h_gu[:, 3:].half(), ghd)
    with pytest.raises(ValueError, match="h_gate must have a unit last stride"):
        op(dh, g, u, "silu", h_gu.t().contiguous().t()[:, :3], h_gu[:, 3:], ghd)
    with pytest.raises(ValueError, match="grad_h has shape"):
        op(dh[:, :8], g, u, "silu", h_gu[:, :3], h_gu[:, 3:], ghd)
    with pytest.raises(ValueError, match="activation must be one of"):
        op(dh, g, u, "relu", h_gu[:, :3], h_gu[:, 3:], ghd)


# ------------------------------------------------------------------------------ the fused MLP with it


def nf4_mlp(device: str, dtype: torch.dtype, hidden=48, inner=80, ranks=(4, 16, 6)):
    """(X, the six adapter tensors, run(X) = LoRAMLPFunction of NF4 gate/up/down with LoRA on each)."""
    bnb = pytest.importorskip("bitsandbytes")
    from loraforge.models.lora_autograd import LoRAMLPFunction, LoRAProjection

    projs, params = [], []
    for rank, (out, inp) in zip(ranks, ((inner, hidden), (inner, hidden), (hidden, inner))):
        base = bnb.nn.Linear4bit(inp, out, bias=False, quant_type="nf4", compute_dtype=dtype)
        base.weight = bnb.nn.Params4bit(torch.randn(out, inp) / inp**0.5, requires_grad=False, quant_type="nf4")
        base = base.to(device)  # quantizes
        A = (torch.randn(rank, inp, device=device) / inp**0.5).requires_grad_()
        B = torch.randn(out, rank, device=device).requires_grad_()
        projs.append(LoRAProjection(base, A, B, 2.0 / rank))
        params += [A, B]
    x = torch.randn(3, 7, hidden, device=device, dtype=dtype, requires_grad=True)  # 21 tokens

    def run(inp):
        return LoRAMLPFunction.apply(inp, *params, *projs, "silu")

    return x, params, run


def mlp_gradients(fold: bool, monkeypatch, device: str, dtype: torch.dtype, seed: int):
    """Every gradient of a stacked NF4 LoRA MLP's forward and backward, the fold on or off."""
    from loraforge.models import lora_autograd

    monkeypatch.setattr(lora_autograd, "CUDA_FOLD_GLU_LORA" if device == "cuda" else "FOLD_GLU_LORA", fold)
    calls = []
    real = torch.ops.loraforge.gated_lora_backward_
    monkeypatch.setattr(torch.ops.loraforge, "gated_lora_backward_", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(seed)
    x, params, run = nf4_mlp(device, dtype)
    out = run(x)
    grads = torch.autograd.grad(out.float().square().sum(), (x, *params))
    assert bool(calls) == fold, "the fold ran" if not fold else "the fold did not run"
    return grads


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_mlp_gradients_equal_with_and_without_the_fold(seed, monkeypatch, dtype):
    unfolded = mlp_gradients(False, monkeypatch, "cpu", dtype, seed)
    folded = mlp_gradients(True, monkeypatch, "cpu", dtype, seed)
    for a, b in zip(folded, unfolded):
        scale = b.float().abs().max().item() + 1e-30
        assert (a.float() - b.float()).abs().max().item() <= 1e-5 * scale


@pytest.mark.gpu
def test_kernel_on_gpu_at_the_8b_shape(seed):
    """2 x 2,048 tokens of the 8B MLP (I = 14,336), r = 16: the compiled kernel against float64 products
    and the plain activation backward, and the fused MLP's gradients with and without it."""
    n, cols, ranks = 4096, 14336, (16, 16, 16)
    dh, gu, h_gu, ghd = inputs(n, cols, ranks, torch.bfloat16, "cuda")
    (want_h, want_dg, want_du), truth = expected(dh, gu, h_gu, ghd, ranks, "silu")
    ours = kernels.gated_lora_backward(dh, gu[:, :cols], gu[:, cols:], "silu", *h_gu.split(ranks[:2], dim=1), ghd)
    assert torch.equal(dh, want_h) and torch.equal(gu[:, :cols], want_dg) and torch.equal(gu[:, cols:], want_du)
    assert_products_close(ours, truth, "bf16 8B shape")


@pytest.mark.gpu
def test_fused_mlp_gradients_on_gpu_with_and_without_the_fold(seed, monkeypatch):
    unfolded = mlp_gradients(False, monkeypatch, "cuda", torch.bfloat16, seed)
    folded = mlp_gradients(True, monkeypatch, "cuda", torch.bfloat16, seed)
    for a, b in zip(folded, unfolded):
        scale = b.float().abs().max().item() + 1e-30
        assert (a.float() - b.float()).abs().max().item() <= 1e-2 * scale
