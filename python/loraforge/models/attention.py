"""The patched self-attention forward: fused Q/K/V, our RoPE op, the fused output projection.

transformers' attention modules (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2) all run

    q, k, v = q_proj(X), k_proj(X), v_proj(X)        as [batch, heads, seq, head_dim]
    (Qwen3: q_norm / k_norm over head_dim, before the transpose)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)     cos, sin = the decoder's position_embeddings
    k, v = cache.update(k, v, ...)                  only when a KV cache is passed
    out, weights = attention_interface(self, q, k, v, mask, dropout=, scaling=, [sliding_window=],
                                       [softcap=], **kwargs)   # eager / sdpa / flash / flex ...
    return o_proj(out), weights

`make_attention_forward` builds the same forward, installed per module instance by patch.py, with
two replacements:

- Q, K and V come from `LoRAQKVFunction`: one autograd node for the three LoRA projections, which
  saves X once and sums dX in one place. It needs a fused-path view (`patch.lora_projection`) of all
  three projections with a frozen base; otherwise (dropout, DoRA, a LoRA bias, several adapters,
  merged weights, a trainable base) the module's own forward runs, projections and all.
- q and k are rotated by `loraforge::rope` (in place, `loraforge::rope_`, when autograd is off), which
  takes transformers' cos/sin as they are, so every rope scaling, per-row position ids (padded and
  packed batches) and partial rotary work. A cos/sin our op does not read (not [batch or 1, seq,
  even rotary_dim <= head_dim], or non-float) goes to the module's own `apply_rotary_pos_emb`.

Everything else is the module's own: the attention backend is looked up the way the module does
(`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, <its eager_attention_forward>)`)
so eager, SDPA, flash and flex keep working; the mask, `position_ids` (flash-attention's packed
sequences) and every other keyword go through untouched; `o_proj` is called as a module (patch.py
gives it the fused `LoRALinearFunction`). What differs between families is a small rule
(architectures.AttentionRules): q/k norms, where `sliding_window` comes from, logit soft-capping.

KV cache. Whenever a cache is passed (generation's prefill and decode steps, any call with
use_cache=True outside gradient checkpointing) the module's stock forward runs. The cache API differs
between the transformers versions we support (5.17: `past_key_values.update(k, v, layer_idx)`; 5.24:
`cache.update(k, v, layer_idx, kwargs=...)`), and generation is dominated by the per-token decode
step, where a fused Q/K/V saves nothing; the stock forward keeps generation token for token what
transformers produces. Training never passes a cache: our fused-loss forward sets use_cache=False,
and transformers drops the cache under gradient checkpointing. Calls without a cache (training,
evaluation with use_cache=False) take the fused path in train and eval mode alike.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loraforge.models import kept_attention
from loraforge.models.architectures import AttentionRules
from loraforge.models.backward_recompute import attention_output_feeds_only_backward, keeps_products
from loraforge.models.lora_autograd import LoRALinearFunction, LoRAQKVFunction
from loraforge.ops import rope as rope_ops

_CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5.24's name, and 5.17's (and its alias)

# Experimental, off by default (0): at or above this many tokens per sequence, SDPA attention without a
# mask runs once per key/value head (each with its group of query heads) instead of once for all heads.
# Heads are independent, so the result is the same; the aim is the attention backward's working memory
# at long context. At 589,824 tokens of the 8B shape the allocation that ran out of memory was 32 KB a
# token, the size of two fp32 [tokens, 32 heads, 128] buffers, which per-group calls would hold at 1/8.
# Not yet measured: set LORAFORGE_ATTENTION_SPLIT_TOKENS to try it.
ATTENTION_SPLIT_TOKENS = int(os.environ.get("LORAFORGE_ATTENTION_SPLIT_TOKENS", "0") or 0)


def submodule(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """module.<name> for a submodule, read from the module dict (nn.Module.__getattr__ costs ~1 us a
    read, and the fused forwards read their projections at every call)."""
    found = module._modules.get(name)
    return found if found is not None else getattr(module, name)


def module_functions(module: torch.nn.Module) -> tuple[Callable, Callable] | None:
    """(eager_attention_forward, apply_rotary_pos_emb) of the transformers file that defines `module`'s
    class, or None when that file lacks them or the forward's signature is not the one we reproduce."""
    source = sys.modules.get(type(module).__module__)
    eager = getattr(source, "eager_attention_forward", None)
    rotary = getattr(source, "apply_rotary_pos_emb", None)
    if not (callable(eager) and callable(rotary)):
        return None
    parameters = list(inspect.signature(type(module).forward).parameters)
    if parameters[1:4] != ["hidden_states", "position_embeddings", "attention_mask"]:
        return None
    return eager, rotary


def rules_fit(module: torch.nn.Module, rules: AttentionRules) -> bool:
    """Whether the module carries what its rule says it does (guards against a transformers release
    that renamed or dropped an attribute: such a module keeps its stock forward)."""
    needed = ["head_dim", "scaling", "attention_dropout", "config", "q_proj", "k_proj", "v_proj", "o_proj"]
    needed += ["q_norm", "k_norm"] if rules.qk_norm else []
    needed += ["sliding_window"] if rules.sliding_window == "module" else []
    needed += ["attn_logit_softcapping"] if rules.softcap else []
    return all(hasattr(module, name) for name in needed)


def _float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in rope_ops.FLOAT_DTYPES


def rope_supports(q: torch.Tensor, k: torch.Tensor, cos, sin) -> bool:
    """Whether loraforge::rope reads this (q, k, cos, sin) (its argument rules, checked without raising)."""
    if not (_float(q) and _float(k) and _float(cos) and _float(sin)) or k.dtype != q.dtype or sin.dtype != cos.dtype:
        return False
    if cos.dim() != 3 or sin.shape != cos.shape or not (cos.device == sin.device == q.device == k.device):
        return False
    batch, _, seq, head_dim = q.shape
    rotary_dim = cos.shape[2]
    return cos.shape[0] in (1, batch) and cos.shape[1] == seq and rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim


def _split_by_kv_head(module, query: torch.Tensor, key: torch.Tensor, attention_mask) -> bool:
    """Whether this call runs once per key/value head (ATTENTION_SPLIT_TOKENS; SDPA, no mask, several
    key/value heads, query heads a multiple of them)."""
    if not ATTENTION_SPLIT_TOKENS or query.shape[2] < ATTENTION_SPLIT_TOKENS or attention_mask is not None:
        return False
    heads, kv_heads = query.shape[1], key.shape[1]
    return module.config._attn_implementation == "sdpa" and kv_heads > 1 and heads % kv_heads == 0


def _has_cache(kwargs: dict) -> bool:
    for name in _CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return True
    return False


def make_attention_forward(rules: AttentionRules, eager: Callable, rotary: Callable, lora_projection: Callable):
    """The forward described in the module docstring, for one architecture's rule.

    eager, rotary: the module's own eager_attention_forward and apply_rotary_pos_emb (module_functions);
    lora_projection: patch.lora_projection (a module -> LoRAProjection or None)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        q_p = k_p = v_p = None
        if not (args or position_embeddings is None or _has_cache(kwargs)):
            q_p, k_p = lora_projection(submodule(self, "q_proj")), lora_projection(submodule(self, "k_proj"))
            v_p = lora_projection(submodule(self, "v_proj"))
        if q_p is None or k_p is None or v_p is None:
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        for name in _CACHE_ARGUMENTS:  # None here; the stock forward names it, so it never reaches the backend
            kwargs.pop(name, None)

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = LoRAQKVFunction.apply(hidden_states, q_p.A, q_p.B, k_p.A, k_p.B, v_p.A, v_p.B,
                                                  q_p, k_p, v_p)  # fmt: skip
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if rules.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        if rope_supports(query, key, cos, sin):
            # No autograd: rotate the fresh q and k in place (they are ours, nothing else holds them).
            # (Not when the layer keeps its Q/K/V product for the rerun: backward_recompute.keeping_products.)
            inplace = not torch.is_grad_enabled() and not keeps_products("qkv")
            query, key = rope_ops.apply_rotary_pos_emb(query, key, cos, sin, inplace=inplace)
        else:
            query, key = rotary(query, key, cos, sin)

        extra = {}
        if rules.sliding_window == "config":
            extra["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif rules.sliding_window == "module":
            extra["sliding_window"] = self.sliding_window
        if rules.softcap:
            extra["softcap"] = self.attn_logit_softcapping
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        options = {"dropout": self.attention_dropout if self.training else 0.0, "scaling": self.scaling,
                   **extra, **kwargs}  # fmt: skip
        kept = kept_attention.kept_or_keeping(self, query, key, value, attention_mask, options)
        if kept is not None:  # kept from (or for) the checkpoint's rerun: train/offloaded_checkpointing.py
            attn_output, attn_weights = kept, None
        elif _split_by_kv_head(self, query, key, attention_mask):
            groups = query.shape[1] // key.shape[1]
            parts = [attention_interface(self, q, k, v, attention_mask, **options)[0]
                     for q, k, v in zip(query.split(groups, 1), key.split(1, 1), value.split(1, 1))]  # fmt: skip
            attn_output, attn_weights = torch.cat(parts, dim=2), None  # [batch, seq, heads, head_dim]
        else:
            attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, **options)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if attention_output_feeds_only_backward():  # the rerun of an attention half: see layer_split.py
            o_p = lora_projection(submodule(self, "o_proj"))
            if o_p is not None and o_p.out_features is not None:
                return LoRALinearFunction.apply(attn_output, o_p.A, o_p.B, o_p, True), attn_weights
        return self.o_proj(attn_output), attn_weights

    return forward
