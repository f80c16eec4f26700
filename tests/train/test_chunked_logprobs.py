"""chunked_token_logprobs against the plain log_softmax(hidden @ W.T / T).gather(...) definition:
forward and backward, fp64 and fp32, odd sizes, temperature, logit scale, Gemma-2 softcapping,
entropy and its gradient, and no [N, V] tensor kept for backward."""

import pytest
import torch

from loraforge.train.chunked_logprobs import (
    ChunkedLogProbFunction,
    chunked_token_logprobs,
    default_chunk_rows,
    reference_token_logprobs,
)

# (tolerance on values, tolerance on gradients) per dtype, relative to the reference's scale.
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (2e-5, 2e-5)}


def _inputs(dtype, batch, seq, hidden, vocab, bias, generator):
    # Scaled so logits are O(1-5): a realistic spread where fp32 error stays comparable to torch's own.
    x = (torch.randn(batch, seq, hidden, generator=generator, dtype=torch.float64) / hidden**0.25).to(dtype)
    w = (torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) / hidden**0.25).to(dtype)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, vocab, (batch, seq), generator=generator)
    return x, w, b, y


def _close(ours, ref, tol):
    scale = ref.abs().max().clamp(min=1.0)
    assert (ours - ref).abs().max() <= tol * scale, (ours - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape,chunk_rows,temperature,softcap,logit_scale,bias",
    [
        ((3, 37, 24, 101), 8, 1.0, None, 1.0, False),  # odd sizes, chunks that do not divide N
        ((2, 19, 40, 257), 7, 0.7, None, 1.0, True),  # temperature, bias
        ((1, 50, 32, 130), 64, 1.3, 3.0, 1.0, False),  # one chunk larger than N, Gemma-2 softcap
        ((2, 11, 16, 67), 1, 0.9, 5.0, 0.6, True),  # one row per chunk, logit scale + softcap
    ],
)
def test_forward_backward_match_reference(dtype, shape, chunk_rows, temperature, softcap, logit_scale, bias, seed):
    g = torch.Generator().manual_seed(seed)
    batch, seq, hidden, vocab = shape
    x, w, b, y = _inputs(dtype, batch, seq, hidden, vocab, bias, g)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    kw = {"temperature": temperature, "softcap": softcap, "logit_scale": logit_scale}
    logp, entropy = chunked_token_logprobs(x, w, y, b, with_entropy=True, chunk_rows=chunk_rows, **kw)
    ref_logp, ref_entropy = reference_token_logprobs(x, w, y, b, **kw)
    assert logp.shape == y.shape and entropy.shape == y.shape and logp.dtype == ref_logp.dtype
    tol_value, tol_grad = TOL[dtype]
    _close(logp, ref_logp, tol_value)
    _close(entropy, ref_entropy, tol_value)

    # A loss that uses both outputs with arbitrary weights, as GRPO (ratio, KL) and an entropy bonus do.
    g_logp, g_ent = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(y.shape, generator=g, dtype=dtype)
    ours = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_ent).sum(), leaves)
    ref = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_entropy * g_ent).sum(), leaves)
    for a, r in zip(ours, ref):
        assert a.dtype == r.dtype
        _close(a, r, tol_grad)


def test_logprob_only_gradient_and_no_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    x, w, _, y = _inputs(torch.float64, 2, 13, 8, 29, False, g)
    x.requires_grad_()
    logp, entropy = chunked_token_logprobs(x, w, y, chunk_rows=5)  # frozen head, as with LoRA
    assert entropy is None
    ref_logp, _ = reference_token_logprobs(x, w, y)
    (gx,) = torch.autograd.grad(logp.square().sum(), x)
    (rx,) = torch.autograd.grad(ref_logp.square().sum(), x)
    _close(gx, rx, 1e-11)


def test_entropy_only_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    x, w, _, y = _inputs(torch.float64, 1, 9, 8, 31, False, g)
    x.requires_grad_()
    _, entropy = chunked_token_logprobs(x, w, y, with_entropy=True, chunk_rows=4, temperature=0.8)
    _, ref_entropy = reference_token_logprobs(x, w, y, temperature=0.8)
    (gx,) = torch.autograd.grad(entropy.sum(), x)
    (rx,) = torch.autograd.grad(ref_entropy.sum(), x)
    _close(gx, rx, 1e-11)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(0)
    x, w, b, y = _inputs(torch.float64, 1, 5, 4, 7, True, g)
    for t in (x, w, b):
        t.requires_grad_()

    def both(x, w, b):
        logp, entropy = chunked_token_logprobs(x, w, y, b, with_entropy=True, chunk_rows=2, temperature=0.9,
                                               softcap=2.0, logit_scale=1.1)  # fmt: skip
        return logp, entropy

    assert torch.autograd.gradcheck(both, (x, w, b))


def test_bf16_error_within_twice_plain_torch(seed):
    """DESIGN's rule: the error against fp64 is at most twice plain torch's in the same precision."""
    g = torch.Generator().manual_seed(seed)
    x, w, _, y = _inputs(torch.float64, 4, 64, 64, 1000, False, g)
    exact, _ = reference_token_logprobs(x, w, y)
    ours, _ = chunked_token_logprobs(x.bfloat16(), w.bfloat16(), y, chunk_rows=96)
    plain, _ = reference_token_logprobs(x.bfloat16(), w.bfloat16(), y)  # bf16 logits, fp32 log_softmax
    ours_err, plain_err = (ours.double() - exact).abs().mean(), (plain.double() - exact).abs().mean()
    assert ours.dtype == torch.float32 and ours_err <= 2 * plain_err + 1e-6


def test_saves_no_logits_for_backward(seed):
    """The graph keeps per-row statistics only: nothing of [N, V] size is saved, whatever the chunking."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = 40, 300
    x, w, _, y = _inputs(torch.float32, 1, n, 16, vocab, False, g)
    x.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, entropy = chunked_token_logprobs(x, w, y, with_entropy=True, chunk_rows=8)
    # The inputs themselves (x viewed flat, w, the targets) and [N] statistics, nothing else.
    extra = [t for t in saved if t.data_ptr() not in (x.data_ptr(), w.data_ptr(), y.data_ptr())]
    assert saved and all(t.numel() <= n for t in extra), [tuple(t.shape) for t in saved]
    (logp.sum() + entropy.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_grad_and_empty_input():
    w = torch.randn(11, 4)
    with torch.no_grad():
        logp, _ = chunked_token_logprobs(torch.randn(3, 4), w, torch.tensor([0, 5, 10]))
    assert logp.shape == (3,) and not logp.requires_grad
    x = torch.zeros(0, 4, requires_grad=True)
    logp, entropy = chunked_token_logprobs(x, w, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert x.grad.shape == (0, 4)


def test_argument_checks():
    x, w = torch.randn(2, 3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logprobs(x, w, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        chunked_token_logprobs(x, torch.randn(9, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="in \\[0, 9\\)"):
        chunked_token_logprobs(x, w, torch.full((2, 3), 9))
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(x, w, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_token_logprobs(x, w, torch.zeros(2, 3, dtype=torch.long), chunk_rows=0)


def test_default_chunk_rows():
    assert default_chunk_rows(128256) == 512  # 512 x 128,256 fp32 = 251 MiB <= 256 MiB
    assert default_chunk_rows(512) % 128 == 0
    assert default_chunk_rows(10**9) == 1
    assert issubclass(ChunkedLogProbFunction, torch.autograd.Function)
