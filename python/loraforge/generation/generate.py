"""fast_generate: what `model.generate` returns, decoded with a static KV cache and, on CUDA, a CUDA graph.

    sequences = loraforge.fast_generate(model, input_ids, attention_mask, max_new_tokens=256,
                                        do_sample=True, temperature=0.8, top_p=0.95)

Same arguments and result as `model.generate` (sequences [B, prompt + new] with the prompt, left-padded
prompts honoured, finished rows padded, the run cut where every row has ended), for a plain or PEFT
(LoRA, adapters attached, never merged) causal LM of an architecture loraforge patches. The adapters and
loraforge's fused forwards run as they are; nothing is merged or rewritten. What the loop does not
implement (see settings.py; also flash/flex attention, encoder-decoder models, extra model inputs such as
pixel values, sliding windows shorter than the run) goes to `model.generate` with a warning: a call may be
slower than it could be, never different.

On CUDA the decode step is captured in a CUDA graph and replayed (decode.py); elsewhere, or with
use_cuda_graph=False, the same loop runs eagerly. With reuse_graph=True (the default) the cache and the
captured step stay with the model for the next call of the same batch size, cache length and settings,
while the model's weights and adapters stay as they were; `release(model)` frees them. GRPO training
passes reuse_graph=False: every optimizer step changes the adapters, so a kept graph would only hold
memory through the training step.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from loraforge.generation import decode
from loraforge.generation.settings import merged_generation_config, resolve

_ATTENTION_MASKS = {"sdpa": "bool", "eager": "additive"}  # attention implementations and the mask each takes


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _unsupported_model(causal_lm: torch.nn.Module) -> str | None:
    from loraforge.models.architectures import RULES

    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in RULES:
        return f"model_type={model_type!r} (the loop supports {', '.join(RULES)})"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _ATTENTION_MASKS:
        return f"attn_implementation={attention!r} (the loop builds masks for {', '.join(_ATTENTION_MASKS)})"
    return None


def _not_capturable(causal_lm: torch.nn.Module) -> str | None:
    """Why a decode step of this model on CUDA cannot be captured, or None: every weight must sit on one CUDA
    device (no CPU offload, no pipeline over GPUs), and the rotary embedding must not re-derive its
    frequencies from the positions on the host (dynamic NTK, LongRoPE)."""
    if torch.cuda.is_current_stream_capturing():
        return "called inside a CUDA graph capture"
    devices = {t.device for t in causal_lm.parameters()} | {t.device for t in causal_lm.buffers()}
    if len(devices) != 1:
        return f"the model spans {sorted(str(d) for d in devices)}"
    text = causal_lm.config.get_text_config(decoder=True)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"rope_type={rope_type!r} updates its frequencies from the positions on the host"
    return None


@contextlib.contextmanager
def _without_gradient_checkpointing(causal_lm: torch.nn.Module):
    """transformers 5.17 drops the KV cache in a checkpointed layer in training mode even under no_grad; TRL
    turns checkpointing off around its rollouts, and so do we (restored after)."""
    switched = [m for m in causal_lm.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def _attention_mask(input_ids: torch.Tensor, attention_mask, config) -> torch.Tensor:
    """The prompt mask model.generate uses: the given one, else inferred from padding as transformers does
    (pad tokens masked when the pad token is in the prompts and is not an EOS token)."""
    if attention_mask is not None:
        return attention_mask.to(input_ids.device).long()
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids, dtype=torch.long)


def fast_generate(model: torch.nn.Module, input_ids: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, generation_config=None, *,
                  use_cuda_graph: bool | None = None, reuse_graph: bool = True, check_every: int = 16,
                  **kwargs) -> torch.Tensor:  # fmt: skip
    """`model.generate(input_ids, attention_mask=..., generation_config=..., **kwargs)`'s sequences, decoded
    by loraforge's static-cache loop (see the module docstring).

    use_cuda_graph: None (capture on CUDA when the model allows it), False (eager steps).
    reuse_graph: keep the cache and captured step for the next call with the same shapes and settings.
    check_every: decode steps between the host's reads of "has every row ended?" (each read waits for the
    GPU; up to check_every - 1 steps past the last EOS are computed and dropped)."""
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)

    def fallback(reason: str) -> torch.Tensor:
        warnings.warn(f"fast_generate: {reason}; using model.generate", stacklevel=3)
        call = dict(kwargs)
        if attention_mask is not None:
            call["attention_mask"] = attention_mask
        if generation_config is not None:
            call["generation_config"] = generation_config
        return type(model).generate(model, input_ids=input_ids, **call)  # the class's, past any routing

    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    causal_lm = _causal_lm(model)
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and not input_ids.is_floating_point()):
        return fallback("input_ids must be a [batch, length] tensor of token ids")
    reason = _unsupported_model(causal_lm)
    if reason is not None:
        return fallback(reason)
    config, unused = merged_generation_config(getattr(causal_lm, "generation_config", None), generation_config, kwargs)
    if unused:
        return fallback(f"arguments {sorted(unused)} are not generation settings the loop takes")
    settings, reason = resolve(config, input_ids.shape[1])
    if reason is not None:
        return fallback(reason)

    embeddings = causal_lm.get_input_embeddings().weight
    input_ids = input_ids.to(embeddings.device)
    mask = _attention_mask(input_ids, attention_mask, config)
    batch, prompt = input_ids.shape
    length = decode.cache_length(prompt, settings.max_new_tokens, causal_lm.config)
    mask_dtype = None if _ATTENTION_MASKS[causal_lm.config._attn_implementation] == "bool" else embeddings.dtype
    steps = settings.max_new_tokens - 1
    capture = use_cuda_graph is not False and embeddings.is_cuda and steps >= decode.MIN_STEPS_FOR_GRAPH
    if capture and (reason := _not_capturable(causal_lm)) is not None:
        warnings.warn(f"fast_generate: no CUDA graph ({reason}); decoding eagerly", stacklevel=2)
        capture = False
    on_device = torch.cuda.device(embeddings.device) if embeddings.is_cuda else contextlib.nullcontext()
    with torch.no_grad(), on_device, _without_gradient_checkpointing(causal_lm):
        session, reason = decode.session_for(causal_lm, batch, length, settings, mask_dtype, reuse=reuse_graph)
        if session is None:
            return fallback(reason)
        session.start(input_ids, mask)
        produced = 1
        while produced < settings.max_new_tokens and not session.all_finished():
            steps = min(check_every, settings.max_new_tokens - produced)
            session.advance(steps, capture=capture)
            produced += steps
        new_tokens = session.result(produced)
    return torch.cat([input_ids, new_tokens], dim=1)


def release(model: torch.nn.Module) -> None:
    """Free the static cache and captured decode step that fast_generate keeps with `model`."""
    decode.release(_causal_lm(model))
