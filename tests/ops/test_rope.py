"""RoPE: the Triton kernels (on CPU through the interpreter) and the op against float64 and against
transformers' apply_rotary_pos_emb (and the partial-rotary form by hand) in the same precision."""

import warnings

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from loraforge.ops import rope as rope_ops
from loraforge.triton_kernels import rope as kernels
from tests.ops._tolerance import assert_within_rule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Where the Triton kernels run: compiled on a GPU, through the interpreter (conftest) on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Kernel against the torch reference: an FMA on a GPU may move the last bf16 bit.
ONE_BF16_ULP = {"rtol": 2**-7, "atol": 1e-5}
# (batch, heads_q, heads_k, seq, head_dim, rotary_dim): head dim 80, one token, GQA, partial rotary.
CASES = ((2, 4, 2, 5, 80, 80), (1, 3, 1, 1, 64, 64), (2, 5, 3, 3, 80, 32))
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}  # fmt: skip


def transformers_cos_sin(batch, seq, rotary_dim, dtype, rope_type="default", packed=True):
    """cos/sin from transformers' own rotary embedding. packed: each batch row has its own positions
    (two packed sequences restarting at 0, a padded row starting late, a jump past the dynamic limit)."""
    config = LlamaConfig(hidden_size=2 * rotary_dim, num_attention_heads=2, head_dim=rotary_dim,
                         max_position_embeddings=128, rope_parameters=ROPE_PARAMETERS[rope_type])  # fmt: skip
    embedding = LlamaRotaryEmbedding(config)
    if packed:
        starts = torch.tensor([0, 150, 3, 9])[torch.arange(batch) % 4]
        positions = starts[:, None] + torch.arange(seq)[None, :]
        positions[0, seq // 2 :] -= int(positions[0, seq // 2])  # a second packed sequence restarts at 0
    else:
        positions = torch.arange(seq)[None, :]
    return embedding(torch.zeros(1, dtype=dtype), positions)


def partial_rotary(q, k, cos, sin):
    """Phi / StableLM's partial rotary, by hand: rotate the first rotary_dim dims with transformers'
    apply_rotary_pos_emb, pass the rest."""
    r = cos.shape[-1]
    q_embed, k_embed = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
    return torch.cat([q_embed, q[..., r:]], -1), torch.cat([k_embed, k[..., r:]], -1)


def plain_rope(q, k, cos, sin):
    return apply_rotary_pos_emb(q, k, cos, sin) if cos.shape[-1] == q.shape[-1] else partial_rotary(q, k, cos, sin)


def make_inputs(case, dtype, packed=True, transposed=True, device="cpu"):
    batch, heads_q, heads_k, seq, head_dim, rotary_dim = case
    # q as transformers makes it: q_proj(x).view(b, s, h, d).transpose(1, 2), a strided view.
    q = torch.randn(batch, seq, heads_q, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, heads_k, head_dim).to(dtype).transpose(1, 2)
    if not transposed:
        q, k = q.contiguous(), k.contiguous()
    cos, sin = transformers_cos_sin(batch if packed else 1, seq, rotary_dim, dtype, packed=packed)
    return tuple(t.to(device) for t in (q, k, cos, sin))  # .to keeps the transposed layout


def plain_and_exact(q, k, cos, sin, grad_q, grad_k):
    """transformers' forward and autograd in q's dtype, and the same in float64 on the same values."""
    results = []
    for dtype in (q.dtype, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k)]
        outs = plain_rope(*leaves, cos.to(dtype), sin.to(dtype))
        grads = torch.autograd.grad(outs, leaves, (grad_q.to(dtype), grad_k.to(dtype)))
        results.append([t.detach() for t in (*outs, *grads)])
    return results


def check_all(ours, q, k, cos, sin, grad_q, grad_k, what):
    """Ours against transformers and float64, all computed on CPU from the same values."""
    ours = [t.cpu() for t in ours]
    q, k, cos, sin, grad_q, grad_k = (t.cpu() for t in (q, k, cos, sin, grad_q, grad_k))
    plain, exact = plain_and_exact(q, k, cos, sin, grad_q, grad_k)
    for name, mine, theirs, truth in zip(("q_embed", "k_embed", "grad_q", "grad_k"), ours, plain, exact):
        assert_within_rule(mine, theirs, truth, f"{what} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_kernels_within_rule(seed, dtype):
    # packed: cos/sin per batch row and transposed q/k; else one cos/sin row for all, contiguous q/k.
    for case, packed in [(case, True) for case in CASES] + [(CASES[0], False)]:
        q, k, cos, sin = make_inputs(case, dtype, packed=packed, transposed=packed, device=DEVICE)
        q_embed, k_embed = torch.empty_like(q), torch.empty_like(k)
        kernels.rope_forward(q, k, cos, sin, q_embed, k_embed)
        assert q_embed.stride() == q.stride()
        grad_q, grad_k = (torch.randn(t.shape).to(dtype).to(DEVICE) for t in (q, k))
        grad_q_in, grad_k_in = torch.empty_like(q), torch.empty_like(k)
        kernels.rope_backward(grad_q, grad_k, cos, sin, grad_q_in, grad_k_in)
        check_all((q_embed, k_embed, grad_q_in, grad_k_in), q, k, cos, sin, grad_q, grad_k, f"{case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_matches_transformers(seed, dtype):
    for case in CASES:
        q, k, cos, sin = make_inputs(case, dtype)
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        q_embed, k_embed = rope_ops.apply_rotary_pos_emb(qg, kg, cos, sin)
        grad_q, grad_k = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
        grads = torch.autograd.grad((q_embed, k_embed), (qg, kg), (grad_q, grad_k))
        check_all((q_embed.detach(), k_embed.detach(), *grads), q, k, cos, sin, grad_q, grad_k, f"{case}")


@pytest.mark.parametrize("rope_type", ROPE_PARAMETERS)
def test_every_transformers_rope_scaling(seed, rope_type):
    """We take transformers' cos/sin, so every scaling is exact in fp32: the kernels equal its formula."""
    q = torch.randn(2, 4, 6, 64)
    k = torch.randn(2, 2, 6, 64)
    cos, sin = transformers_cos_sin(2, 6, 64, torch.float32, rope_type)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    on_device = [t.to(DEVICE) for t in (q, k, cos, sin)]
    q_embed, k_embed = torch.empty_like(on_device[0]), torch.empty_like(on_device[1])
    kernels.rope_forward(*on_device, q_embed, k_embed)
    for ours in ((q_embed, k_embed), rope_ops.apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours[0].cpu(), expected[0], rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(ours[1].cpu(), expected[1], rtol=2e-6, atol=2e-6)


def test_cuda_kernels_of_the_ops(seed):
    """The ops' CUDA kernels (layouts, broadcast cos, broadcast gradients) against the reference
    kernels; on CPU tensors through the interpreter."""
    q, k, cos, sin = make_inputs((2, 4, 2, 5, 80, 48), torch.bfloat16, packed=False, device=DEVICE)
    ours = rope_ops._rope_cuda(q, k, cos, sin)
    reference = rope_ops.rope_reference(q, k, cos, sin)
    for mine, ref, given in zip(ours, reference, (q, k)):
        assert mine.stride() == ref.stride() == given.stride()  # the transposed layout is kept
        torch.testing.assert_close(mine, ref, **ONE_BF16_ULP)
    # `loss = q_embed.sum() + k_embed.sum()` hands gradients with every stride 0: read without copying.
    ones_q, ones_k = (torch.ones((), dtype=t.dtype, device=DEVICE).expand(t.shape) for t in (q, k))
    grads = rope_ops._backward_cuda(ones_q, ones_k, cos, sin)
    for mine, ref in zip(grads, rope_ops.rope_backward_reference(ones_q, ones_k, cos, sin)):
        assert mine.is_contiguous()
        torch.testing.assert_close(mine, ref, **ONE_BF16_ULP)
    # A last stride other than 0 or 1 is copied first.
    q_odd = torch.randn(2, 4, 5, 160, device=DEVICE)[..., ::2]
    torch.testing.assert_close(rope_ops._rope_cuda(q_odd, k.float(), cos.float(), sin.float())[0],
                               rope_ops.rope_reference(q_odd, k.float(), cos.float(), sin.float())[0])  # fmt: skip


def test_in_place(seed):
    q, k, cos, sin = make_inputs((2, 4, 2, 5, 80, 32), torch.bfloat16, device=DEVICE)
    expected = torch.empty_like(q), torch.empty_like(k)
    kernels.rope_forward(q, k, cos, sin, *expected)
    # The Triton kernel writing over its inputs (pass-through dims untouched), and the op's kernel doing so.
    for rotate in (lambda q, k: kernels.rope_forward(q, k, cos, sin, q, k),
                   lambda q, k: rope_ops._rope_inplace_cuda(q, k, cos, sin)):  # fmt: skip
        q1, k1 = q.clone(), k.clone()
        rotate(q1, k1)
        assert torch.equal(q1, expected[0]) and torch.equal(k1, expected[1])
    # The op (the reference on CPU) and the wrapper, without grad and under no_grad; refused while
    # autograd records.
    q2, k2 = q.clone(), k.clone()
    torch.ops.loraforge.rope_(q2, k2, cos, sin)
    torch.testing.assert_close((q2, k2), expected, **ONE_BF16_ULP)
    q3, k3 = q.clone(), k.clone()
    out = rope_ops.apply_rotary_pos_emb(q3, k3, cos, sin, inplace=True)
    assert out[0] is q3 and out[1] is k3
    torch.testing.assert_close((q3, k3), expected, **ONE_BF16_ULP)
    with pytest.raises(ValueError, match="inplace=True cannot be differentiated"):
        rope_ops.apply_rotary_pos_emb(q.clone().requires_grad_(), k, cos, sin, inplace=True)
    with torch.no_grad():
        q4 = q.clone().requires_grad_()
        rope_ops.apply_rotary_pos_emb(q4, k.clone(), cos, sin, inplace=True)
    torch.testing.assert_close(q4.detach(), expected[0], **ONE_BF16_ULP)
    with pytest.raises(ValueError, match="in place needs a last stride of 1"):
        torch.ops.loraforge.rope_(q.clone(), k[:1].expand(2, -1, -1, -1), cos, sin)


def test_only_one_of_q_k_needs_grad(seed):
    q, k, cos, sin = make_inputs((1, 2, 2, 3, 64, 64), torch.float32)
    qg = q.clone().requires_grad_()
    q_embed, _ = rope_ops.apply_rotary_pos_emb(qg, k, cos, sin)
    q_embed.sum().backward()  # k_embed unused: its gradient arrives as zeros
    expected = rope_ops.rope_backward_reference(torch.ones(q.shape), torch.zeros(k.shape), cos, sin)[0]
    assert torch.equal(qg.grad, expected) and k.grad is None


def test_opcheck_and_compile(seed):
    q, k, cos, sin = make_inputs((2, 2, 1, 3, 16, 8), torch.float32)
    torch.library.opcheck(torch.ops.loraforge.rope.default, (q.requires_grad_(), k.requires_grad_(), cos, sin))
    q, k = q.detach(), k.detach()
    torch.library.opcheck(torch.ops.loraforge.rope_backward.default, (torch.randn(q.shape), k.clone(), cos, sin))
    torch.library.opcheck(torch.ops.loraforge.rope_.default, (q.contiguous(), k.clone(), cos, sin))
    # A last stride of 2 (copied before the kernel): outputs contiguous, as the fake kernel says.
    q_odd = torch.randn(2, 2, 3, 32)[..., ::2]
    torch.library.opcheck(torch.ops.loraforge.rope.default, (q_odd, k, cos, sin))

    def attention_scores(q, k, cos, sin):
        q_embed, k_embed = rope_ops.apply_rotary_pos_emb(q, k.repeat(1, 2, 1, 1), cos, sin)
        return (q_embed @ k_embed.transpose(-1, -2)).square().sum()

    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(attention_scores, fullgraph=True, backend="aot_eager")
        for fn in (attention_scores, compiled):
            qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
            fn(qg, kg, cos, sin).backward()
            grads.append((qg.grad, kg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_bad_input_raises_clear_errors():
    q, k, cos, sin = make_inputs((2, 4, 2, 5, 16, 16), torch.float32, packed=False)
    rope = rope_ops.apply_rotary_pos_emb
    with pytest.raises(ValueError, match=r"q must be \[batch, heads_q, seq, head_dim\]"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"k must be \[2, heads_k, 5, 16\]"):
        rope(q, k[..., :8], cos, sin)
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        rope(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="cos must be float32"):
        rope(q, k, cos.double(), sin)
    with pytest.raises(TypeError, match="sin is torch.float16 but cos"):
        rope(q, k, cos, sin.half())
    with pytest.raises(ValueError, match=r"cos must be \[2 or 1, 5, rotary_dim\]"):
        rope(q, k, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="sin has shape"):
        rope(q, k, cos, sin.expand(2, -1, -1))
    with pytest.raises(ValueError, match="rotary_dim, 7"):
        rope(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos is on meta but q is on cpu"):
        rope(q, k, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="grad_k_embed must be"):
        torch.ops.loraforge.rope_backward(q, k[0], cos, sin)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("rotary_dim", (128, 64), ids=("full", "partial"))
def test_op_on_gpu_within_rule(seed, rotary_dim):
    """Through dispatch and autograd on CUDA at a model's size, eager and under torch.compile (inductor)."""
    q, k, cos, sin = make_inputs((2, 32, 8, 515, 128, rotary_dim), torch.bfloat16, device="cuda")
    grad_q, grad_k = (torch.randn(t.shape, device="cuda").to(torch.bfloat16) for t in (q, k))
    for rope in (rope_ops.apply_rotary_pos_emb, torch.compile(rope_ops.apply_rotary_pos_emb, fullgraph=True)):
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        q_embed, k_embed = rope(qg, kg, cos, sin)
        grads = torch.autograd.grad((q_embed, k_embed), (qg, kg), (grad_q, grad_k))
        check_all((q_embed.detach(), k_embed.detach(), *grads), q, k, cos, sin, grad_q, grad_k, "cuda")
