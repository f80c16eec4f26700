"""SwiGLU / GeGLU: the Triton kernels (on CPU through the interpreter) and the op against float64 and
against plain torch (transformers' `act_fn(gate) * up`) in the same precision."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from loraforge.ops import swiglu as glu_ops
from loraforge.triton_kernels import swiglu as kernels
from tests.ops._tolerance import assert_within_rule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
SHAPES = ((7, 320), (1, 4100), (2, 3, 80))  # rows 7 and 1, widths not a power of two, leading dims
# Where the Triton kernels run: compiled on a GPU, through the interpreter (conftest) on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernel against reference: torch's and Triton's sigmoid/erf may differ in the last fp32 bit, which can
# flip a bf16 rounding.
ONE_BF16_ULP = {"rtol": 2**-7, "atol": 1e-6}


def plain_activation(g, activation):
    """What transformers' ACT2FN applies: silu, gelu (erf), gelu_pytorch_tanh."""
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def plain_and_exact(gate, up, grad_h, activation):
    """act(gate) * up and its autograd, in gate's dtype and in float64 on the same values."""
    results = []
    for dtype in (gate.dtype, torch.float64):
        g, u = (t.detach().to(dtype).requires_grad_() for t in (gate, up))
        h = plain_activation(g, activation) * u
        grad_gate, grad_up = torch.autograd.grad(h, (g, u), grad_h.to(dtype))
        results.append((h.detach(), grad_gate, grad_up))
    return results


def check_all(ours, gate, up, grad_h, activation, what):
    """Ours against plain torch and float64, all computed on CPU from the same values."""
    ours = [t.cpu() for t in ours]
    gate, up, grad_h = (t.cpu() for t in (gate, up, grad_h))
    plain, exact = plain_and_exact(gate, up, grad_h, activation)
    for name, mine, theirs, truth in zip(("h", "grad_gate", "grad_up"), ours, plain, exact):
        assert_within_rule(mine, theirs, truth, f"{what} {name}")


def random_inputs(shape, dtype, device="cpu"):
    # gate spread wide enough to reach both tails of the activations
    gate, up, grad_h = torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape)
    return tuple(t.to(dtype).to(device) for t in (gate, up, grad_h))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_within_rule(seed, dtype, activation):
    for shape in SHAPES:
        gate, up, grad_h = (t.reshape(-1, shape[-1]) for t in random_inputs(shape, dtype, DEVICE))
        h = torch.empty_like(gate)
        kernels.swiglu_forward(gate, up, activation, h)
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        kernels.swiglu_backward(grad_h, gate, up, activation, grad_gate, grad_up)
        check_all((h, grad_gate, grad_up), gate, up, grad_h, activation, f"{shape}")
        # Written over the inputs instead: the same bits.
        gate_buffer, up_buffer = gate.clone(), up.clone()
        kernels.swiglu_backward(grad_h, gate_buffer, up_buffer, activation, gate_buffer, up_buffer)
        assert torch.equal(gate_buffer, grad_gate) and torch.equal(up_buffer, grad_up)
        # And with h written over grad_h: h bit for bit the forward kernel's, the same gradients.
        gate_buffer, up_buffer, h_buffer = gate.clone(), up.clone(), grad_h.clone()
        kernels.swiglu_backward(h_buffer, gate_buffer, up_buffer, activation, gate_buffer, up_buffer, write_h=True)
        assert torch.equal(h_buffer, h)
        assert torch.equal(gate_buffer, grad_gate) and torch.equal(up_buffer, grad_up)


@pytest.mark.parametrize("reuse", (False, True), ids=("new-buffers", "reuse-inputs"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_plain_torch(seed, dtype, reuse):
    for activation in ACTIVATIONS:
        gate, up, grad_h = random_inputs(SHAPES[0], dtype)
        # gate and up as an MLP makes them: intermediates of the graph, not leaves.
        gate_leaf, up_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
        gate_act, up_act = gate_leaf * 1, up_leaf * 1
        h = glu_ops.gated_activation(gate_act, up_act, activation, reuse)
        grad_gate, grad_up = torch.autograd.grad(h, (gate_act, up_act), grad_h)
        check_all((h.detach(), grad_gate, grad_up), gate, up, grad_h, activation, activation)
        # reuse: the gradients live in the storage of gate and up; otherwise those are untouched.
        assert (grad_gate.data_ptr() == gate_act.data_ptr()) == reuse
        assert (grad_up.data_ptr() == up_act.data_ptr()) == reuse
        assert torch.equal(gate_act.detach(), grad_gate if reuse else gate)


def test_wrappers(seed):
    gate, up, _ = random_inputs((3, 40), torch.float32)
    torch.testing.assert_close(glu_ops.swiglu(gate, up), F.silu(gate) * up)
    torch.testing.assert_close(glu_ops.geglu(gate, up), F.gelu(gate) * up)
    torch.testing.assert_close(glu_ops.geglu(gate, up, approximate="tanh"), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="approximate must be"):
        glu_ops.geglu(gate, up, approximate="sigmoid")


def test_reused_inputs_fall_back_where_they_cannot_be_overwritten(seed):
    """The halves of a fused gate_up projection (not contiguous) get new buffers, and the same tensor
    as gate and up too; both stay correct."""
    gate_up = (torch.randn(4, 2 * 48) * 1).requires_grad_()
    fused = gate_up * 1
    gate, up = fused.chunk(2, dim=-1)
    h = glu_ops.swiglu(gate, up, reuse_inputs_in_backward=True)
    grad_gate, grad_up = torch.autograd.grad(h.sum(), (gate, up))
    expected = glu_ops.gated_activation_backward_reference(torch.ones(4, 48), gate, up, "silu")
    assert torch.equal(grad_gate, expected[0]) and torch.equal(grad_up, expected[1])
    same = torch.randn(3, 8).requires_grad_() * 1
    (grad_same,) = torch.autograd.grad(glu_ops.swiglu(same, same, True).sum(), same)
    torch.testing.assert_close(grad_same, torch.autograd.grad((F.silu(same) * same).sum(), same)[0])


def test_cuda_kernels_of_the_ops(seed):
    """The ops' CUDA kernels (strided halves, broadcast gradients, in place) against the reference
    kernels; on CPU tensors through the interpreter."""
    fused = torch.randn(2, 3, 2 * 80).to(torch.bfloat16).to(DEVICE)
    gate, up = fused.chunk(2, dim=-1)  # row stride 160, read where they lie
    for activation in ACTIVATIONS:
        expected_h = glu_ops.gated_activation_reference(gate, up, activation)
        torch.testing.assert_close(glu_ops._forward_cuda(gate, up, activation, False), expected_h, **ONE_BF16_ULP)
        ones = torch.ones((), dtype=torch.bfloat16, device=DEVICE).expand(gate.shape)  # `h.sum().backward()`
        expected = glu_ops.gated_activation_backward_reference(ones, gate, up, activation)
        ours = glu_ops._backward_cuda(ones, gate, up, activation)
        torch.testing.assert_close(ours, expected, **ONE_BF16_ULP)
        gate_c, up_c = gate.contiguous(), up.contiguous()
        glu_ops._backward_inplace_cuda(ones, gate_c, up_c, activation)
        assert torch.equal(gate_c, ours[0]) and torch.equal(up_c, ours[1])
        # gated_activation_backward_h_: h over grad_h, gradients over gate and up, against the reference.
        grad_h = torch.randn(gate.shape).to(torch.bfloat16).to(DEVICE)
        expected = glu_ops.gated_activation_backward_reference(grad_h, gate, up, activation)
        gate_c, up_c, h_c = gate.contiguous(), up.contiguous(), grad_h.clone()
        glu_ops._backward_h_inplace_cuda(h_c, gate_c, up_c, activation)
        torch.testing.assert_close(h_c, expected_h, **ONE_BF16_ULP)
        torch.testing.assert_close((gate_c, up_c), expected, **ONE_BF16_ULP)


def test_opcheck_and_compile(seed):
    gate, up, grad_h = random_inputs((5, 24), torch.float32)
    # One activation per op keeps this fast; the activation only picks a branch inside the same kernel.
    torch.library.opcheck(torch.ops.loraforge.gated_activation.default,
                          (gate.clone().requires_grad_(), up.clone().requires_grad_(), "gelu_tanh", False))  # fmt: skip
    torch.library.opcheck(torch.ops.loraforge.gated_activation_backward.default, (grad_h, gate, up, "silu"))
    torch.library.opcheck(torch.ops.loraforge.gated_activation_backward_.default,
                          (grad_h, gate.clone(), up.clone(), "gelu"))  # fmt: skip
    torch.library.opcheck(torch.ops.loraforge.gated_activation_backward_h_.default,
                          (grad_h.clone(), gate.clone(), up.clone(), "silu"))  # fmt: skip
    # Transposed inputs: outputs stay contiguous, as the fake kernel says.
    torch.library.opcheck(torch.ops.loraforge.gated_activation.default, (gate.t(), up.t(), "silu", False))
    torch.library.opcheck(torch.ops.loraforge.gated_activation_backward.default, (grad_h.t(), gate.t(), up.t(), "silu"))

    weight_gate, weight_up = torch.randn(24, 16), torch.randn(24, 16)

    def mlp_loss(x, reuse):
        return glu_ops.geglu(x @ weight_gate.t(), x @ weight_up.t(), "tanh", reuse).square().sum()

    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(mlp_loss, fullgraph=True, backend="aot_eager")
        for reuse in (False, True):
            eager_x, comp_x = x.clone().requires_grad_(), x.clone().requires_grad_()
            mlp_loss(eager_x, reuse).backward()
            compiled(comp_x, reuse).backward()
            assert torch.equal(comp_x.grad, eager_x.grad)


def test_bad_input_raises_clear_errors():
    gate, up = torch.randn(4, 32), torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"up has shape \[4, 16\] but gate has \[4, 32\]"):
        glu_ops.swiglu(gate, up[:, :16])
    with pytest.raises(TypeError, match="up is torch.float16 but gate is torch.float32"):
        glu_ops.swiglu(gate, up.half())
    with pytest.raises(TypeError, match="gate must be float32"):
        glu_ops.swiglu(gate.long(), up.long())
    with pytest.raises(ValueError, match="up is on meta but gate is on cpu"):
        glu_ops.swiglu(gate, up.to("meta"))
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.loraforge.gated_activation(gate, up, "relu", False)
    with pytest.raises(ValueError, match="grad_h has shape"):
        torch.ops.loraforge.gated_activation_backward(torch.randn(4, 8), gate, up, "silu")
    with pytest.raises(ValueError, match="must be contiguous .or 2-D row-strided views. to receive"):
        torch.ops.loraforge.gated_activation_backward_(torch.randn(32, 4), gate.t(), up.t(), "silu")
    with pytest.raises(ValueError, match="grad_h must be contiguous with gate's shape"):
        torch.ops.loraforge.gated_activation_backward_h_(torch.randn(32, 4).t(), gate, up, "silu")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("reuse", (False, True), ids=("new-buffers", "reuse-inputs"))
def test_op_on_gpu_within_rule(seed, reuse):
    """Through dispatch and autograd on CUDA at a model's size (Llama-3-8B's MLP width)."""
    for activation in ACTIVATIONS:
        gate, up, grad_h = random_inputs((1027, 14336), torch.bfloat16, "cuda")
        gate_act, up_act = gate.clone().requires_grad_() * 1, up.clone().requires_grad_() * 1
        h = glu_ops.gated_activation(gate_act, up_act, activation, reuse)
        grad_gate, grad_up = torch.autograd.grad(h, (gate_act, up_act), grad_h)
        assert (grad_gate.data_ptr() == gate_act.data_ptr()) == reuse
        check_all((h.detach(), grad_gate, grad_up), gate, up, grad_h, activation, activation)


def test_gated_activation_into_the_columns_of_a_wider_buffer(seed):
    """gated_activation_into: h written into out, here the first columns of a wider buffer (the fused MLP's
    [Hm | adapter columns]): the reference and the CUDA kernel path (through the interpreter on CPU) give
    bit for bit what the forward op's reference and CUDA kernels give, and write nothing else."""
    fused = torch.randn(37, 2 * 80).to(torch.bfloat16).to(DEVICE) * 3
    gate, up = fused.chunk(2, dim=-1)
    for activation in ACTIVATIONS:
        for into, forward in ((glu_ops._into_reference, glu_ops._forward_reference),
                              (glu_ops._into_cuda, glu_ops._forward_cuda)):  # fmt: skip
            wide = torch.full((37, 80 + 16), 7.0, dtype=torch.bfloat16, device=DEVICE)
            into(gate, up, activation, wide[:, :80])
            assert torch.equal(wide[:, :80], forward(gate, up, activation, False))
            assert bool((wide[:, 80:] == 7.0).all())


def test_gated_activation_into_opcheck_and_bad_input():
    gate, up = torch.randn(5, 24), torch.randn(5, 24)
    torch.library.opcheck(torch.ops.loraforge.gated_activation_into.default, (gate, up, "gelu", torch.empty(5, 24)))
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor on cpu of gate's shape \[5, 24\]"):
        torch.ops.loraforge.gated_activation_into(gate, up, "silu", torch.empty(5, 23))
    with pytest.raises(ValueError, match="out must be a torch.float32"):
        torch.ops.loraforge.gated_activation_into(gate, up, "silu", torch.empty(5, 24, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous or a 2-D view of rows"):
        torch.ops.loraforge.gated_activation_into(gate, up, "silu", torch.empty(24, 5).t())
