"""Attention computed once a step: the checkpointed forward keeps the attention's output O and its
log-sum-exp L, and the layer's rerun in backward takes them instead of running the attention again.

The backward of softmax attention needs Q, K, V, O and L (the softmax's row normaliser), never the
[seq, seq] probabilities: flash-style kernels recompute those tile by tile from Q, K and L. So a rerun
that has O and L back needs no attention forward at all: this module's autograd function returns the
kept O and, in backward, calls the same fused backward kernel that SDPA's own autograd would have
called. On an 8B layer at 2 x 2,048 tokens the skipped forward is ~0.16 ms of an H100 (cuDNN's flash
kernel, profile of 2026-12-07: 10.0 ms for 64 calls a step, half of them reruns); the price is O's round
trip over PCIe (33.5 MB a layer each way) beside the layer's other offloaded tensors, and L (0.5 MB)
kept on the GPU.

Used by the checkpoint (train/offloaded_checkpointing.py, LORAFORGE_OFFLOAD_ATTENTION_EVERY) through
backward_recompute's kept products, kind "attention": (O as [batch, seq, heads, head_dim], the state the
backward kernel needs). Only where the attention is what transformers' SDPA path computes with no mask:
causal, no dropout, no soft-capping, the module's implementation "sdpa", query and key of one length,
and SDPA choosing a kernel that returns L and has a backward we can call (cuDNN or flash on CUDA, flash
on CPU). Anything else runs the module's attention as before.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from loraforge.models import backward_recompute

_CUDNN, _FLASH = int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)
KIND = "attention"


class KeptState:
    """What the attention's backward kernel needs besides Q, K, V and O."""

    __slots__ = ("backend", "extras", "lse", "scale")

    def __init__(self, backend: int, lse: torch.Tensor, extras: tuple, scale: float | None):
        self.backend, self.lse, self.extras, self.scale = backend, lse, extras, scale


def choose_backend(module, query, key, value, attention_mask, options: dict) -> int | None:
    """The SDPA backend (an SDPBackend value) that keeping this call would use, or None when the call
    is not one this module reproduces (see the module docstring). query, key, value: [batch, heads,
    seq, head_dim] as the attention interface receives them; options: its keyword arguments."""
    if getattr(getattr(module, "config", None), "_attn_implementation", None) != "sdpa" or attention_mask is not None:
        return None
    if float(options.get("dropout", 0.0) or 0.0) != 0.0 or options.get("softcap") is not None:
        return None
    if options.get("output_attentions") or options.get("position_bias") is not None:
        return None
    causal = options.get("is_causal")
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        return None
    window = options.get("sliding_window")
    seq = query.shape[2]
    if (window is not None and seq > window) or seq < 2 or key.shape[2] != seq or value.shape[2] != seq:
        return None
    head_dim = query.shape[3]
    if key.shape[3] != head_dim or value.shape[3] != head_dim or head_dim % 8 or head_dim > 256:
        return None
    heads, kv_heads = query.shape[1], key.shape[1]
    if value.shape[1] != kv_heads or heads % kv_heads or query.is_nested:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    scale = options.get("scaling")
    backend = torch.ops.aten._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scale,
                                               enable_gqa=heads != kv_heads)  # fmt: skip
    if backend == _CUDNN and query.is_cuda:
        return backend
    if backend == _FLASH:
        return backend
    return None


def attention_forward(query, key, value, backend: int, scale: float | None) -> tuple[torch.Tensor, KeptState]:
    """Causal attention through the kernel of `backend`, returning (O as [batch, seq, heads, head_dim]
    contiguous, the state its backward needs). No autograd."""
    aten = torch.ops.aten
    if backend == _CUDNN:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale)  # fmt: skip
        extras = (cum_q, cum_k, max_q, max_k, seed, offset)
    elif query.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, True, False, scale=scale)  # fmt: skip
        extras = (cum_q, cum_k, max_q, max_k, rng, unused)
    else:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
        extras = ()
    # The kernels write O as [batch, seq, heads, head_dim] in memory (a transposed view): no copy here.
    return out.transpose(1, 2).contiguous(), KeptState(backend, lse, extras, scale)


def attention_backward(grad_out, query, key, value, out, state: KeptState):
    """(dQ, dK, dV) of the attention that produced `out` ([batch, heads, seq, head_dim] views)."""
    aten, scale = torch.ops.aten, state.scale
    if state.backend == _CUDNN:
        cum_q, cum_k, max_q, max_k, seed, offset = state.extras
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, query, key, value, out, state.lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True,
            scale=scale)  # fmt: skip
    if query.is_cuda:
        cum_q, cum_k, max_q, max_k, rng, unused = state.extras
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, query, key, value, out, state.lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng, unused,
            scale=scale)  # fmt: skip
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, key, value, out, state.lse, 0.0, True, scale=scale)  # fmt: skip


class KeptAttentionFunction(torch.autograd.Function):
    """O = attention(Q, K, V) given O and L already: forward returns the kept O ([batch, seq, heads,
    head_dim]); backward is the attention kernel's own backward from Q, K, V, O and L."""

    @staticmethod
    def forward(ctx, query, key, value, out, state: KeptState):
        ctx.save_for_backward(query, key, value, out)
        ctx.state = state
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        # The gradient in O's own layout ([batch, seq, heads, head_dim] memory): the cuDNN kernel expects
        # dO strided as O.
        grad = grad_out.contiguous().transpose(1, 2)
        dq, dk, dv = attention_backward(grad, query, key, value, out.transpose(1, 2), ctx.state)[:3]
        return dq, dk, dv, None, None


def kept_or_keeping(module, query, key, value, attention_mask, options: dict) -> torch.Tensor | None:
    """The attention output ([batch, seq, heads, head_dim]) from what this layer's checkpointed forward
    kept (its rerun in backward), or computed and kept now (that forward); None where neither applies
    (no kept product of this kind is asked for or handed back, or the call is not one we reproduce):
    the caller then runs the module's attention."""
    sink = backward_recompute.product_sink(KIND)
    if sink is None:
        kept = backward_recompute.take_kept(KIND)
        if kept is None:
            return None
        # The rerun repeats the call its forward checked (choose_backend): only the shape is checked again.
        out, state = kept
        batch, heads, seq, head_dim = query.shape
        if out.shape != (batch, seq, heads, head_dim) or out.dtype != query.dtype:
            return None
        return KeptAttentionFunction.apply(query, key, value, out, state)
    backend = choose_backend(module, query, key, value, attention_mask, options)
    if backend is None:
        return None
    out, state = attention_forward(query, key, value, backend, options.get("scaling"))
    sink[KIND] = (out, state)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return KeptAttentionFunction.apply(query, key, value, out, state)
    return out
