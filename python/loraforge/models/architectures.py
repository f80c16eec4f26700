"""One small rule table per architecture: which module classes get which fast forward.

`mlp` names the gated-MLP class and its activation; `attention_projections` the Linear names that
get the fused LoRA projection; `max_positions_key` where the config keeps its trained context. An
architecture not listed here still trains, through plain PEFT, with a warning (see patch.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureRules:
    mlp_class: str
    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU as Gemma uses it)
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    norm_class: str = ""  # RMSNorm class (q/k norms of Qwen3 included)
    gemma_norm: bool = False  # Gemma's (1 + weight) form, in fp32


RULES: dict[str, ArchitectureRules] = {
    "llama": ArchitectureRules(mlp_class="LlamaMLP", activation="silu", norm_class="LlamaRMSNorm"),
    "mistral": ArchitectureRules(mlp_class="MistralMLP", activation="silu", norm_class="MistralRMSNorm"),
    "qwen2": ArchitectureRules(mlp_class="Qwen2MLP", activation="silu", norm_class="Qwen2RMSNorm"),
    "qwen3": ArchitectureRules(mlp_class="Qwen3MLP", activation="silu", norm_class="Qwen3RMSNorm"),
    "gemma": ArchitectureRules(mlp_class="GemmaMLP", activation="gelu_tanh", norm_class="GemmaRMSNorm", gemma_norm=True),
    "gemma2": ArchitectureRules(mlp_class="Gemma2MLP", activation="gelu_tanh", norm_class="Gemma2RMSNorm", gemma_norm=True),
}

SUPPORTED = tuple(RULES)


def activation_of(config, default: str) -> str:
    """The MLP activation the config asks for, in our names (None if we have no fused form)."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "gelu": "gelu"}.get(name, None) if name else default  # fmt: skip
