"""GRPO through TRL with loraforge models: TRL's GRPOTrainer, scoring tokens with chunked log-probs.

TRL's GRPOTrainer does everything GRPO needs: rollouts with `model.generate`, rewards, group-relative
advantages, the reference policy, and the loss (grpo / bnpo / dr_grpo / dapo / ..., the clipped
importance ratio, the KL term). All of its log-probabilities (the policy's with gradient inside
`_compute_loss`, the old policy's for num_iterations > 1, the reference's for beta > 0) come from one
method, `_get_per_token_logps_and_entropies`. That method is the whole surface we override:

* run the model's backbone (its decoder stack, LoRA layers and loraforge's fused forwards included),
* take the hidden states at the positions that predict completion tokens, padding dropped,
* push them through the lm_head with `chunked_token_logprobs` (train/chunked_logprobs.py): per-token
  log-probs and entropies at the sampling temperature (Gemma 2's final softcap included), never a
  [B, T, V] tensor of logits, in forward or backward.

So the loss, the clipping, the importance weights and the KL are TRL's own code, run on the same
numbers; tests/train/test_grpo.py checks the loss and the LoRA gradients against TRL's own path for
every loss type. The reference policy (beta > 0) comes from the same weights: for a PEFT model TRL
sets ref_model = None and scores the reference through this same method, either with the adapters
switched off (`model.disable_adapter()`, when the trainer wrapped the model from a peft_config) or,
for a model wrapped before (FastLanguageModel.get_peft_model, the notebook flow), with a frozen copy of
the starting adapter named "ref" that TRL 1.15 adds: r x (in + out) numbers per layer, no copy of the
base weights. For a fresh adapter (B = 0) the two are the same model. Full fine-tuning with beta > 0
still needs TRL's separate reference model, as it does in TRL.

What falls back to TRL's own method, unchanged: multimodal inputs (pixel values, image grids, ...),
MoE models asked for their router loss, a LoRA-wrapped or quantized lm_head, models whose config
scales logits in ways other than `logit_scale` / `final_logit_softcapping`, and models wrapped for
distributed training (DDP, FSDP, DeepSpeed: their forward does the gradient bookkeeping).

Rollouts: TRL generates with `unwrapped_model.generate(...)` under `torch.no_grad()`; loraforge's patched
forwards take the stock path whenever no labels are given, and adapters stay attached, never merged. On
CUDA that call is bound by the host (hundreds of small launches per token), so `fast_generation` (on by
default on CUDA) routes it, for the duration of TRL's `_generate_single_turn`, to
`loraforge.fast_generate` (generation/): the same settings (TRL's GenerationConfig), a static KV cache,
and the decode step replayed as a CUDA graph. The route is an instance attribute on the unwrapped model,
removed afterwards; TRL's code around the call (padding, EOS masking, tool calls) runs unchanged, and
whatever fast_generate does not implement (repetition_penalty, multimodal inputs, ...) goes on to the
model's own generate. vLLM, continuous batching, DeepSpeed and FSDP rollouts are left to TRL.

One repair: transformers' Trainer and TRL's rollout re-enable gradient checkpointing with plain torch
checkpointing, dropping use_gradient_checkpointing="unsloth"'s offloaded kind; the policy's scoring
puts it back (`restore_offloaded_checkpointing`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import trl

from loraforge.train.chunked_logprobs import chunked_token_logprobs
from loraforge.train.offloaded_checkpointing import restore_offloaded_checkpointing, uses_offloaded_checkpointing

# Config attributes that change the logits in ways chunked_token_logprobs does not model; a model with
# any of them set keeps TRL's own scoring.
_UNSUPPORTED_LOGIT_SCALES = ("output_multiplier", "lm_head_multiplier", "logits_scaling")
# Keyword arguments of TRL's method that only multimodal models pass.
_MULTIMODAL_KWARGS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids",
                      "image_position_ids")  # fmt: skip


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside `model` (itself, or the one a PEFT model wraps)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def plain_lm_head(causal_lm: torch.nn.Module) -> torch.nn.Module | None:
    """The output projection as a dense Linear whose weight we can multiply by, else None."""
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        return None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return None  # e.g. a bitsandbytes Params4bit (uint8) head
    return head


def head_transform(config) -> dict | None:
    """logit_scale and softcap from the model's (text) config, or None when it scales logits otherwise."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) is not None for name in _UNSUPPORTED_LOGIT_SCALES):
        return None
    scale = getattr(text_config, "logit_scale", None)
    return {"logit_scale": 1.0 if scale is None else float(scale),
            "softcap": getattr(text_config, "final_logit_softcapping", None) or None}  # fmt: skip


def completion_logprobs(causal_lm: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int, *, temperature: float, compute_entropy: bool,
                        cast_head_to_fp32: bool = False, chunk_rows: int | None = None):  # fmt: skip
    """(logps [B, K], entropies [B, K] or None) of the last K = logits_to_keep tokens of input_ids.

    Position t's hidden state predicts token t + 1, so the K completion tokens are scored from the K
    positions before them. Padded completion positions (attention_mask 0) are not computed and read 0,
    as in TRL. The model must be a plain causal LM whose head `plain_lm_head` accepts.
    """
    head = plain_lm_head(causal_lm)
    transform = head_transform(causal_lm.config)
    if head is None or transform is None:
        raise ValueError("completion_logprobs needs a dense lm_head and logit_scale/softcap-only logit scaling")
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, -logits_to_keep - 1 : -1]
    targets = input_ids[:, -logits_to_keep:]
    valid = attention_mask[:, -logits_to_keep:].bool()
    hidden, weight, bias = hidden[valid], head.weight, head.bias
    # A head pipelined onto another device (device_map) gets its inputs moved there.
    hidden = hidden.to(weight.device)
    head_precision = contextlib.nullcontext()
    if cast_head_to_fp32:  # GRPOConfig.cast_lm_head_to_fp32: TRL has made the head fp32; the product too
        hidden, head_precision = hidden.float(), torch.autocast(weight.device.type, enabled=False)
    with head_precision:
        logps, entropies = chunked_token_logprobs(
            hidden, weight, targets[valid].to(weight.device), bias, temperature=temperature,
            with_entropy=compute_entropy, chunk_rows=chunk_rows, **transform,
        )  # fmt: skip
    valid = valid.to(weight.device)
    # masked_scatter into zeros keeps a graph (and a zero gradient) even when nothing is valid.
    logps = logps.new_zeros(valid.shape).masked_scatter(valid, logps)
    if entropies is not None:
        entropies = entropies.new_zeros(valid.shape).masked_scatter(valid, entropies)
    return logps, entropies


@contextlib.contextmanager
def generate_through_fast_generate(model: torch.nn.Module):
    """Within the block, `model.generate(...)` is `loraforge.fast_generate(model, ...)` (which falls back to
    the class's own generate for what it does not implement). An instance attribute, removed on exit; the
    cache and captured graph are not kept between rollouts (reuse_graph=False: the adapters change at
    every optimizer step, and training needs the memory)."""
    from loraforge.generation import fast_generate

    if "generate" in model.__dict__:  # already routed (or replaced by someone else): leave it alone
        yield model
        return
    model.__dict__["generate"] = functools.partial(fast_generate, model, reuse_graph=False)
    try:
        yield model
    finally:
        model.__dict__.pop("generate", None)


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer with memory-efficient per-token log-probabilities (see the module docstring).

    Drop-in: same constructor, same GRPOConfig. `logprob_chunk_rows` (keyword, optional) sets the rows
    per lm_head chunk; by default one fp32 chunk of logits is at most 256 MiB. A model prepared with
    use_gradient_checkpointing="unsloth" keeps its offloaded checkpointing through training (see
    `restore_offloaded_checkpointing`). `fast_generation` (keyword): rollouts through
    `loraforge.fast_generate` (None, the default: on when training on CUDA; True: also on CPU, eagerly;
    False: TRL's `model.generate`).
    """

    def __init__(self, *args, logprob_chunk_rows: int | None = None, fast_generation: bool | None = None, **kwargs):
        if fast_generation not in (None, True, False):
            raise ValueError(f"fast_generation must be None, True or False, got {fast_generation!r}")
        self.logprob_chunk_rows = logprob_chunk_rows
        self.fast_generation = fast_generation
        model = kwargs.get("model", args[0] if args else None)
        self._offloaded_checkpointing = isinstance(model, torch.nn.Module) and uses_offloaded_checkpointing(model)
        super().__init__(*args, **kwargs)

    def train(self, *args, **kwargs):
        """TRL's train, after warning when the chat template does not fit the model (wrong family, or
        an end-of-turn token that generation does not stop on: see data/template_check.py)."""
        from loraforge.data.template_check import warn_on_chat_template_problems

        warn_on_chat_template_problems(self.model, self.processing_class)
        return super().train(*args, **kwargs)

    def _fast_rollouts(self, images, multimodal_fields) -> bool:
        """Whether this rollout goes through fast_generate (see the module docstring)."""
        if self.fast_generation is False or images is not None or multimodal_fields:
            return False
        if self.use_vllm or getattr(self, "use_transformers_continuous_batching", False):
            return False
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return False
        return self.fast_generation is True or self.accelerator.device.type == "cuda"

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        """TRL's method, with its `unwrapped_model.generate(...)` answered by fast_generate."""
        if not self._fast_rollouts(images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args,
                                                 **kwargs)  # fmt: skip
        with generate_through_fast_generate(self.accelerator.unwrap_model(self.model_wrapped)):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args,
                                                 **kwargs)  # fmt: skip

    def _chunked_scoring_applies(self, model, compute_aux_loss: bool, extra: dict) -> bool:
        if compute_aux_loss or any(extra.get(name) is not None for name in _MULTIMODAL_KWARGS):
            return False
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped is not model:
            # DDP / FSDP / DeepSpeed wrappers sync gradients in their own forward, which calling the
            # backbone directly would skip: keep TRL's path there.
            return False
        causal_lm = causal_lm_of(unwrapped)
        return (plain_lm_head(causal_lm) is not None and head_transform(causal_lm.config) is not None
                and isinstance(getattr(causal_lm, "base_model_prefix", None), str))  # fmt: skip

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):  # fmt: skip
        """TRL's method, same arguments and results: (logps [B, K], entropies [B, K] or None, None)."""
        if not self._chunked_scoring_applies(model, compute_aux_loss, extra):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra,
            )  # fmt: skip
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        if self._offloaded_checkpointing and torch.is_grad_enabled():
            restore_offloaded_checkpointing(causal_lm)
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        # Sub-batches bound the backbone's activations, as in TRL (batch_size is its knob).
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                logps, entropies = completion_logprobs(
                    causal_lm, input_ids[rows], attention_mask[rows], logits_to_keep, temperature=self.temperature,
                    compute_entropy=compute_entropy, cast_head_to_fp32=bool(self.args.cast_lm_head_to_fp32),
                    chunk_rows=self.logprob_chunk_rows,
                )  # fmt: skip
            all_logps.append(logps)
            all_entropies.append(entropies)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return logps, entropies, None
