"""Attention kept from the checkpointed forward (models/kept_attention.py): the kept output and its
backward are SDPA's own, bit for bit where the same kernel runs; calls it does not reproduce are left
to the module's attention."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraforge.models import backward_recompute, kept_attention


def _qkv(batch, heads, kv_heads, seq, head_dim, dtype, device):
    """q, k, v as the attention interface receives them: [batch, heads, seq, head_dim] views of
    [batch, seq, heads, head_dim] tensors (the projections' layout)."""
    make = lambda h: torch.randn(batch, seq, h, head_dim, dtype=dtype, device=device).transpose(1, 2)
    return make(heads), make(kv_heads), make(kv_heads)


def _module(implementation="sdpa", is_causal=True):
    return types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=implementation), is_causal=is_causal)


def _reference(q, k, v, scale):
    """float64 causal attention with key/value heads repeated, as [batch, seq, heads, head_dim]."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    seq = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1).to(q.device), -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _kept_run(q, k, v, scale, grad):
    """The checkpoint's two visits: a forward without autograd that keeps O and L, then the rerun that
    takes them; returns (the forward's O, the rerun's O, dq, dk, dv)."""
    module = _module()
    options = {"dropout": 0.0, "scaling": scale}
    sink = {}
    with torch.no_grad(), backward_recompute.keeping_products(sink, {"attention"}):
        first = kept_attention.kept_or_keeping(module, q, k, v, None, options)
    assert first is not None and set(sink) == {"attention"} and sink["attention"][0] is first
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with backward_recompute.reusing_products(sink):
        again = kept_attention.kept_or_keeping(module, *leaves, None, options)
    assert again is not None and torch.equal(again, first)
    again.backward(grad)
    return first, again, *(t.grad for t in leaves)


def _sdpa_run(q, k, v, scale, grad):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = out.transpose(1, 2)
    out.backward(grad)
    return out, *(t.grad for t in leaves)


@pytest.mark.parametrize("shape", [(2, 4, 2, 7, 16), (1, 3, 3, 33, 80), (3, 8, 1, 2, 8)])
def test_kept_attention_is_sdpa_on_cpu(shape, seed):
    """fp32 on CPU: the forward, and the rerun's output and gradients, equal SDPA's (same flash kernel)
    and are close to a float64 reference; GQA, odd lengths, head dim 80, two tokens."""
    batch, heads, kv_heads, seq, head_dim = shape
    q, k, v = _qkv(batch, heads, kv_heads, seq, head_dim, torch.float32, "cpu")
    scale = 0.5 + torch.rand(()).item()
    grad = torch.randn(batch, seq, heads, head_dim)
    first, _, *grads = _kept_run(q, k, v, scale, grad)
    out, *grads_sdpa = _sdpa_run(q, k, v, scale, grad)
    torch.testing.assert_close(first, out, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, grads_sdpa):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.double(), _reference(q, k, v, scale), rtol=1e-4, atol=1e-5)
    # gradients against float64 autograd
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    _reference(*leaves, scale).backward(grad.double())
    for ours, ref in zip(grads, leaves):
        torch.testing.assert_close(ours.double(), ref.grad, rtol=1e-4, atol=1e-4)


def test_kept_attention_declines_what_it_does_not_reproduce():
    q, k, v = _qkv(1, 2, 2, 5, 8, torch.float32, "cpu")
    plain = {"dropout": 0.0, "scaling": 0.3}
    assert kept_attention.choose_backend(_module(), q, k, v, None, plain) == int(SDPBackend.FLASH_ATTENTION)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    declined = [
        (_module("eager"), q, k, v, None, plain),
        (_module(is_causal=False), q, k, v, None, plain),
        (_module(), q, k, v, mask, plain),
        (_module(), q, k, v, None, {**plain, "dropout": 0.1}),
        (_module(), q, k, v, None, {**plain, "softcap": 30.0}),
        (_module(), q, k, v, None, {**plain, "sliding_window": 4}),
        (_module(), q, k, v, None, {**plain, "is_causal": False}),
        (_module(), q[:, :, :1], k[:, :, :1], v[:, :, :1], None, plain),  # one token: decoding
        (_module(), q, k[:, :, :4], v[:, :, :4], None, plain),  # key shorter than query
        (_module(), *_qkv(1, 2, 2, 5, 12, torch.float32, "cpu"), None, plain),  # head dim not a multiple of 8
    ]
    for args in declined:
        assert kept_attention.choose_backend(*args) is None
    assert kept_attention.choose_backend(_module(), q, k, v, None, {**plain, "sliding_window": 5}) is not None
    # Nothing asked for or handed back: the module's attention runs (None), whatever the call.
    assert kept_attention.kept_or_keeping(_module(), q, k, v, None, plain) is None
    # A declined call inside a keeping forward keeps nothing.
    sink = {}
    with torch.no_grad(), backward_recompute.keeping_products(sink, {"attention"}):
        assert kept_attention.kept_or_keeping(_module("eager"), q, k, v, None, plain) is None
    assert sink == {}


def test_kept_attention_of_another_shape_is_not_taken():
    """A rerun whose query has another shape than what was kept computes the attention itself."""
    q, k, v = _qkv(1, 2, 2, 6, 8, torch.float32, "cpu")
    options = {"dropout": 0.0, "scaling": 0.3}
    sink = {}
    with torch.no_grad(), backward_recompute.keeping_products(sink, {"attention"}):
        kept_attention.kept_or_keeping(_module(), q, k, v, None, options)
    with backward_recompute.reusing_products(sink):
        assert kept_attention.kept_or_keeping(_module(), q[:, :, :5], k[:, :, :5], v[:, :, :5], None, options) is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kept_attention_is_sdpa_on_cuda(backend, dtype, seed):
    """On the GPU, for each backend SDPA may choose: the kept output and the rerun's gradients are
    bit for bit what SDPA's own autograd gives with the same kernel (8B-like heads: 32 query, 8 key).
    Flash's backward sums dQ with atomic adds, in an order that may vary from run to run, unless torch
    is asked for deterministic algorithms (without it, this comparison failed for flash on the H100 on
    2026-12-07 while cuDNN's held): flash's comparison runs in that mode (cuDNN's cannot: SDPA offers no
    cuDNN kernel there)."""
    q, k, v = _qkv(2, 32, 8, 333, 128, dtype, "cuda")
    grad = torch.randn(2, 333, 32, 128, dtype=dtype, device="cuda")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(backend == SDPBackend.FLASH_ATTENTION)
    try:
        with sdpa_kernel([backend]):
            chosen = kept_attention.choose_backend(_module(), q, k, v, None, {"dropout": 0.0, "scaling": 0.088})
            if chosen is None:
                pytest.skip(f"SDPA does not offer {backend} here")
            assert chosen == int(backend)
            first, _, *grads = _kept_run(q, k, v, 0.088, grad)
            out, *grads_sdpa = _sdpa_run(q, k, v, 0.088, grad)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert torch.equal(first, out)
    for ours, theirs in zip(grads, grads_sdpa):
        assert torch.equal(ours, theirs)
