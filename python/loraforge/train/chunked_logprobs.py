"""Per-token log-probabilities (and entropies) through the lm_head, chunk by chunk, never [N, V] logits.

GRPO needs log p(token_t | prefix) for every completion token, under the policy, the old policy and
the reference. The plain way projects all B x T positions to the vocabulary and takes a log-softmax:
for Llama 3 (V = 128,256), 8 completions of 1,024 tokens that is 8,192 x 128,256 fp32 logits = 3.9 GiB,
plus as much again for the log-softmax and its gradient. Here the rows go through the head in chunks
and only per-row statistics are kept.

Definition, for hidden states X [N, H], head W [V, H] (+ bias b [V]), targets y [N]:

    a   = X W^T + b                                     in the compute dtype (autocast's, else X's)
    u   = c * tanh(s * a / c)        (softcap c > 0)    or  u = s * a          (s: logit scale)
    z   = u / T                                         (T: the sampling temperature), fp32 from here
    lse = logsumexp_v z_v
    logp   = z_y - lse                                  (the output)
    H      = lse - sum_v p_v z_v,   p = exp(z - lse)    (entropy, when asked for)

Backward, for upstream gradients g (of logp) and e (of H), per row:

    dlogp/dz_v = 1[v = y] - p_v
    dH/dz_v    = -p_v (log p_v + H)
    dz         = g (1[v = y] - p) - e p (log p + H)
    da         = dz / T * (1 - tanh^2(s a / c)) * s      (without a softcap: dz / T * s)
    dX = da W,   dW = da^T X,   db = sum_rows da

Memory: the forward keeps X (it is an input anyway), W, y and two fp32 numbers per row (lse, H); the
backward recomputes each chunk's logits. Peak extra memory is a few [chunk_rows, V] buffers (the
logits in the compute dtype and their fp32 transform), the [N, H] dX and, only when the head trains
(full fine-tuning), an fp32 dW. With LoRA the head is frozen and no dW is formed. A head stored in
another dtype than the compute dtype (fp32 weights under bf16 autocast) is cast once per call. Cost:
the head's matmul runs twice in backward (recompute + dX) and once in forward; for GRPO, where the
forward that scores the reference and the old policy runs without gradient, only the policy pays the
recompute.

TRL 1.15 scores tokens the same way with a Triton kernel (its fused lm_head); this one is plain torch,
runs wherever torch does, and tests/train/test_grpo.py checks the two agree inside GRPOTrainer.

Chunk size: rows are taken so that one fp32 chunk of logits is at most CHUNK_BYTES (256 MiB: 512 rows
of a 128,256 vocabulary), a multiple of 128 rows when that many fit.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 256 << 20


def default_chunk_rows(vocab: int) -> int:
    rows = max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    return rows - rows % 128 if rows >= 128 else rows


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit and fp32 logits; fp64 stays fp64 (tests compare against fp64 references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on (mixed-precision training runs the head in it), else hidden's."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


class _HeadTransform:
    """logits (compute dtype) -> z (fp32, fp64 for fp64 logits): logit scale, softcap, temperature;
    and its derivative."""

    def __init__(self, temperature: float, softcap: float | None, logit_scale: float):
        self.temperature, self.softcap, self.logit_scale = float(temperature), softcap or None, float(logit_scale)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, tanh values or None). Takes the chunk's logits over: fp32 (fp64) logits become z in place,
        16-bit ones are upcast into a new buffer."""
        z = logits.to(_stats_dtype(logits.dtype))
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        tanh = None
        if self.softcap is not None:
            tanh = z.div_(self.softcap).tanh_()
            z = tanh * self.softcap  # keep tanh for the derivative: one more buffer, only with a softcap
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z, tanh

    def backward_(self, dz: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
        """dz/dlogits applied in place: d(logits) = dz / T * (1 - tanh^2) * s."""
        scale = self.logit_scale / self.temperature
        if tanh is not None:
            dz.mul_(tanh.square_().neg_().add_(1.0))
        if scale != 1.0:
            dz.mul_(scale)
        return dz


def _in_dtype(weight, bias, dtype):
    """The head in the compute dtype, cast once per call (a no-op when it is in it already), not per chunk."""
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _chunk_logits(x_chunk, weight, bias):
    logits = x_chunk @ weight.t()
    return logits.add_(bias) if bias is not None else logits


class ChunkedLogProbFunction(torch.autograd.Function):
    """(logp [N], entropy [N] or empty; fp32, fp64 for fp64 inputs) of targets under softmax(transform(X W^T + b)).

    See the module docstring for the maths. Inputs are flat: hidden [N, H], targets [N] int64."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform: _HeadTransform, chunk_rows: int, with_entropy: bool):
        ctx.set_materialize_grads(False)  # entropy is often a metric only: no zero gradient to push back
        dtype = _compute_dtype(hidden)
        n_rows, stats = hidden.shape[0], _stats_dtype(dtype)
        logp = hidden.new_empty((n_rows,), dtype=stats)
        lse = hidden.new_empty((n_rows,), dtype=stats)
        entropy = hidden.new_empty((n_rows if with_entropy else 0,), dtype=stats)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _in_dtype(weight, bias, dtype)
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, min(start + chunk_rows, n_rows))
                z, _ = transform(_chunk_logits(hidden[rows].to(dtype), w, b))
                chunk_lse = torch.logsumexp(z, dim=1)
                lse[rows] = chunk_lse
                logp[rows] = z.gather(1, targets[rows, None]).squeeze(1) - chunk_lse
                if with_entropy:
                    # H = lse - sum p z, with p = exp(z - lse); the row dot avoids a second [rows, V] buffer.
                    p = (z - chunk_lse[:, None]).exp_()
                    entropy[rows] = chunk_lse - torch.linalg.vecdot(p, z)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.transform, ctx.chunk_rows, ctx.dtype = transform, chunk_rows, dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        if grad_entropy is not None and entropy.numel() == 0:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        dtype, transform, n_rows = ctx.dtype, ctx.transform, hidden.shape[0]
        grad_x = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_x else None
        # dW and db sum over every row: accumulate them in fp32 and round once at the end.
        acc = _stats_dtype(dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = _in_dtype(weight, bias, dtype)
            for start in range(0, n_rows, ctx.chunk_rows):
                rows = slice(start, min(start + ctx.chunk_rows, n_rows))
                x_chunk = hidden[rows].to(dtype)
                z, tanh = transform(_chunk_logits(x_chunk, w, b))
                log_p = z.sub_(lse[rows, None])  # z is ours: reuse it for log p
                p = log_p.exp()
                if grad_entropy is not None:
                    # -e p (log p + H), written over log p
                    dz = log_p.add_(entropy[rows, None]).mul_(p).mul_(-grad_entropy[rows, None].to(p.dtype))
                    if grad_logp is not None:
                        dz.sub_(p.mul_(grad_logp[rows, None].to(p.dtype)))
                else:
                    dz = p.mul_(-grad_logp[rows, None].to(p.dtype))
                if grad_logp is not None:
                    dz.scatter_add_(1, targets[rows, None], grad_logp[rows, None].to(dz.dtype))
                del p, log_p
                d_logits = transform.backward_(dz, tanh).to(dtype)
                del dz, tanh
                if want_x:
                    torch.mm(d_logits, w, out=grad_x[rows])
                if want_w:
                    grad_w.addmm_(d_logits.t().to(acc), x_chunk.to(acc))
                if want_b:
                    grad_b += d_logits.sum(0, dtype=acc)
        return (grad_x.to(hidden.dtype) if want_x else None, grad_w.to(weight.dtype) if want_w else None,
                grad_b.to(bias.dtype) if want_b else None, None, None, None, None)  # fmt: skip


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                           softcap: float | None = None, logit_scale: float = 1.0, with_entropy: bool = False,
                           chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """log softmax(transform(hidden @ weight.T + bias))[targets] without the [..., V] logits.

    hidden [..., H], weight [V, H], targets [...] (int); returns (logp [...] fp32, entropy [...] fp32 or
    None). transform: logit_scale, then softcap (Gemma 2's final_logit_softcapping), then / temperature,
    in that order, as the model's forward and the sampler apply them. Differentiable in hidden, weight
    and bias (whatever requires grad); see the module docstring for memory and chunk_rows.
    """
    if hidden.dim() < 1 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have hidden's shape without its last dimension: hidden "
                         f"{list(hidden.shape)}, targets {list(targets.shape)}")  # fmt: skip
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}], got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {list(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap must be > 0 (or None / 0 for none), got {softcap}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows}")
    flat_targets = targets.reshape(-1).long()
    # One read back from the device for both bounds.
    if flat_targets.numel() and not bool(((flat_targets >= 0) & (flat_targets < weight.shape[0])).all()):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) (mask ignored positions out before calling)")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    logp, entropy = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets,
        _HeadTransform(temperature, softcap, logit_scale), rows, with_entropy,
    )  # fmt: skip
    shape = targets.shape
    return logp.view(shape), (entropy.view(shape) if with_entropy else None)


def reference_token_logprobs(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None, logit_scale=1.0):
    """The plain definition, whole [..., V] logits at once (for tests): (logp, entropy)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    logits = logits * logit_scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy
