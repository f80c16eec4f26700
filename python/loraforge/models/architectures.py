"""One small rule table per architecture: which module classes get which fast forward.

`mlp` names the gated-MLP class and its activation; `attention` the self-attention class and what
its forward does beyond Llama's (attention.py); `attention_projections` the Linear names that get
the fused LoRA projection. An architecture not listed here still trains, through plain PEFT, with a
warning (see patch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AttentionRules:
    """What one family's attention forward does beyond Llama's (see attention.py)."""

    class_name: str
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k (`q_norm`, `k_norm`), before RoPE
    # Where the backend's `sliding_window` keyword comes from: not passed (""), `config.sliding_window`
    # on every layer (Mistral), or the module's own `sliding_window` (None on full-attention layers).
    sliding_window: Literal["", "config", "module"] = ""
    softcap: bool = False  # Gemma 2: the backend's `softcap` keyword is `attn_logit_softcapping`


@dataclass(frozen=True)
class ArchitectureRules:
    mlp_class: str
    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU as Gemma uses it)
    attention: AttentionRules | None = None  # None: attention keeps its stock forward
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    norm_class: str = ""  # RMSNorm class (q/k norms of Qwen3 included)
    gemma_norm: bool = False  # Gemma's (1 + weight) form, in fp32
    # The MLP's output goes straight into the residual sum (the layer's output), so a checkpoint's
    # recompute may skip it (models/backward_recompute.py). Gemma 2 normalises it first: its norm's
    # backward reads that output.
    mlp_output_to_residual: bool = True
    # How the offloaded checkpoint splits a decoder layer into its attention and MLP halves
    # (train/layer_split.py: "pre_norm" or "sandwich"), and whether the attention's output goes straight
    # into the residual sum (Gemma 2 normalises it first), so that the attention half's rerun may skip
    # the output projection.
    layer_split: str = "pre_norm"
    attention_output_to_residual: bool = True


RULES: dict[str, ArchitectureRules] = {
    "llama": ArchitectureRules(
        mlp_class="LlamaMLP", activation="silu", norm_class="LlamaRMSNorm",
        attention=AttentionRules("LlamaAttention"),
    ),
    "mistral": ArchitectureRules(
        mlp_class="MistralMLP", activation="silu", norm_class="MistralRMSNorm",
        attention=AttentionRules("MistralAttention", sliding_window="config"),
    ),
    "qwen2": ArchitectureRules(
        mlp_class="Qwen2MLP", activation="silu", norm_class="Qwen2RMSNorm",
        attention=AttentionRules("Qwen2Attention", sliding_window="module"),
    ),
    "qwen3": ArchitectureRules(
        mlp_class="Qwen3MLP", activation="silu", norm_class="Qwen3RMSNorm",
        attention=AttentionRules("Qwen3Attention", qk_norm=True, sliding_window="module"),
    ),
    "gemma": ArchitectureRules(
        mlp_class="GemmaMLP", activation="gelu_tanh", norm_class="GemmaRMSNorm", gemma_norm=True,
        attention=AttentionRules("GemmaAttention"),
    ),
    "gemma2": ArchitectureRules(
        mlp_class="Gemma2MLP", activation="gelu_tanh", norm_class="Gemma2RMSNorm", gemma_norm=True,
        mlp_output_to_residual=False, layer_split="sandwich", attention_output_to_residual=False,
        attention=AttentionRules("Gemma2Attention", sliding_window="module", softcap=True),
    ),
}  # fmt: skip

SUPPORTED = tuple(RULES)


def activation_of(config, default: str) -> str:
    """The MLP activation the config asks for, in our names (None if we have no fused form)."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "gelu": "gelu"}.get(name, None) if name else default  # fmt: skip


def decoder_layers(model) -> list:
    """The decoder layers of `model` in order: the modules transformers checkpoints one by one
    (GradientCheckpointingLayer; not the model, which holds a _gradient_checkpointing_func too). Empty
    with a transformers before 4.52, which has no such class."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
