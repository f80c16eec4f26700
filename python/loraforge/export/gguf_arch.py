"""How each transformers architecture maps onto llama.cpp's: tensor names, weight rewrites, metadata.

One `GGUFArchitecture` per supported model_type says everything the converter needs:

* the llama.cpp architecture name the file declares (Mistral runs as "llama");
* the name every tensor gets (transformers' `model.layers.N.self_attn.q_proj.weight` is llama.cpp's
  `blk.N.attn_q.weight`, and so on);
* whether Q and K rows are permuted. transformers applies RoPE to the two halves of each head
  (rotate_half), llama.cpp's "normal" RoPE (the llama architecture) to adjacent pairs. For the
  llama family the HF checkpoint itself was once permuted from Meta's pair layout to the halves
  layout, so the converter permutes back: within each head, row j of the first half and row j of
  the second half become rows 2j and 2j+1. Qwen and Gemma run with llama.cpp's NEOX RoPE, which is
  the halves layout, so their rows stay as they are;
* Gemma's RMSNorm multiplies by (1 + w) while llama.cpp multiplies by w: the converter stores
  w + 1. Gemma's embedding scale (sqrt(hidden)) is applied by llama.cpp itself.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

__all__ = [
    "ARCHITECTURES",
    "GGUFArchitecture",
    "architecture_for",
    "llama3_rope_factors",
    "needs_rope_freqs",
    "rope_parameters",
    "write_architecture_metadata",
]

# Per-layer module names shared by every family here; each architecture adds or overrides a few.
_COMMON_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_PATTERN = re.compile(r"^(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFArchitecture:
    gguf_name: str  # llama.cpp's general.architecture
    permute_qk: bool  # llama.cpp's normal (pairwise) RoPE: see the module docstring
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma's 1 + w)
    always_tied: bool = False  # llama.cpp reads the output projection from token_embd
    extra_layer_names: dict[str, str] = field(default_factory=dict)

    def gguf_tensor_name(self, hf_name: str) -> str:
        """llama.cpp's name for a transformers tensor name; KeyError for a tensor it has no place for."""
        match = _LAYER_PATTERN.match(hf_name)
        if match:
            layer, module, kind = match.groups()
            names = {**_COMMON_LAYER_NAMES, **self.extra_layer_names}
            if module in names:
                return f"blk.{layer}.{names[module]}.{kind}"
        else:
            match = _GLOBAL_PATTERN.match(hf_name)
            if match and match.group(1) in _GLOBAL_NAMES:
                return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
        raise KeyError(f"{hf_name!r} has no counterpart in llama.cpp's {self.gguf_name} architecture")

    def is_norm(self, gguf_name: str) -> bool:
        return gguf_name.endswith("_norm.weight")


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("llama", permute_qk=True),
    "mistral": GGUFArchitecture("llama", permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2", permute_qk=False),
    "qwen3": GGUFArchitecture(
        "qwen3",
        permute_qk=False,
        extra_layer_names={"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    ),
    "gemma": GGUFArchitecture("gemma", permute_qk=False, norm_offset=1.0, always_tied=True),
    "gemma2": GGUFArchitecture(
        "gemma2",
        permute_qk=False,
        norm_offset=1.0,
        always_tied=True,
        # Gemma 2 normalises both sides of each block; its "post_attention_layernorm" is the norm on
        # the attention output, not the pre-MLP norm it is in the other families.
        extra_layer_names={
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        },
    ),
}


def architecture_for(config) -> GGUFArchitecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF export supports model_type {', '.join(ARCHITECTURES)}; this model is {model_type!r}"
        )
    return ARCHITECTURES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_for_pairwise_rope(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q or K projection rows (weight [heads*dim, in] or bias [heads*dim]) from the
    rotate-half layout to adjacent pairs, head by head: (half, j) -> (j, half)."""
    if rows.shape[0] % (2 * n_heads):
        raise ValueError(f"cannot permute {rows.shape[0]} rows into {n_heads} heads of rotary pairs")
    per_head = rows.shape[0] // n_heads
    rest = rows.shape[1:]
    return rows.reshape(n_heads, 2, per_head // 2, *rest).transpose(1, 2).reshape(rows.shape)


def rope_parameters(config) -> dict:
    """Rope settings in one dict (transformers 5's rope_parameters, or 4.x's rope_theta + rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # per-layer-type settings (Gemma 3 style): the global ones apply
        params = dict(params["full_attention"])
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def llama3_rope_factors(config) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling, as the per-frequency divisors llama.cpp reads
    from the rope_freqs tensor: 1 for high frequencies, `factor` for low ones, and a smooth blend
    between the two wavelength thresholds (Meta's apply_scaling)."""
    params = rope_parameters(config)
    dim = head_dim(config)
    factor = params.get("factor", 8.0)
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    original_context = params.get("original_max_position_embeddings", 8192)
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    inverse_frequencies = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factors = []
    for frequency in inverse_frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < high_freq_wavelength:
            factors.append(1.0)
        elif wavelength > low_freq_wavelength:
            factors.append(factor)
        else:
            smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def needs_rope_freqs(config, arch: GGUFArchitecture) -> bool:
    """True for Llama 3.1-style rope scaling, which llama.cpp reads from a rope_freqs tensor."""
    return arch.gguf_name == "llama" and str(rope_parameters(config).get("rope_type", "")).lower() == "llama3"


def _write_rope(writer: gguf.GGUFWriter, config, arch: GGUFArchitecture) -> None:
    """Rope metadata (Llama 3 scaling is a tensor instead: see needs_rope_freqs)."""
    params = rope_parameters(config)
    writer.add_rope_freq_base(float(params["rope_theta"]))
    rope_type = str(params.get("rope_type", "default")).lower()
    factor = params.get("factor")
    if rope_type in ("default", "none"):
        return
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
        return
    if rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):  # fmt: skip
            if params.get(key) is not None:
                add(float(params[key]))
        attention_factor = params.get("attention_factor", params.get("attn_factor"))
        if attention_factor is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(attention_factor))
        return
    if rope_type == "llama3":
        if arch.gguf_name != "llama":
            raise NotImplementedError(f"llama3 rope scaling on a {arch.gguf_name} model is not supported")
        return
    if rope_type == "dynamic":
        # Dynamic NTK scaling only changes positions beyond the trained context; llama.cpp has no
        # such mode, so the file runs as unscaled within the trained context.
        warnings.warn("rope_type='dynamic' has no llama.cpp equivalent; the GGUF uses unscaled RoPE", stacklevel=3)
        return
    raise NotImplementedError(f"rope scaling {rope_type!r} is not supported by the GGUF export")


def _warn_about_attention_differences(config, arch: GGUFArchitecture) -> None:
    window = getattr(config, "sliding_window", None)
    context = config.max_position_embeddings
    uses_window = getattr(config, "use_sliding_window", True)
    if arch.gguf_name in ("llama", "qwen2", "qwen3") and window and uses_window and window < context:
        warnings.warn(
            f"{config.model_type} is configured with a {window}-token sliding window; llama.cpp runs this "
            f"architecture with full attention, so outputs differ for sequences longer than {window} tokens",
            stacklevel=3,
        )
    if arch.gguf_name == "gemma2":
        scalar = getattr(config, "query_pre_attn_scalar", None)
        # llama.cpp scales queries by head_dim ** -0.5 (hidden / heads for the 46-layer 27B model).
        expected = (
            config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim(config)
        )
        if scalar is not None and scalar != expected:
            warnings.warn(
                f"query_pre_attn_scalar={scalar} but llama.cpp's gemma2 scales queries by {expected} ** -0.5; "
                "attention in the GGUF will differ",
                stacklevel=3,
            )
        for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
            if getattr(config, key, None) is None:
                warnings.warn(f"{key} is off in this model, but llama.cpp's gemma2 always soft-caps "
                              f"(at its default {default}); logits in the GGUF will differ", stacklevel=3)  # fmt: skip
        layer_types = getattr(config, "layer_types", None)
        alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
        if layer_types is not None and list(layer_types) != alternating:
            warnings.warn("llama.cpp's gemma2 alternates sliding and full attention starting with sliding; "
                          "this model's layer_types differ", stacklevel=3)  # fmt: skip


def write_architecture_metadata(writer: gguf.GGUFWriter, config, arch: GGUFArchitecture, vocab_size: int) -> None:
    """The hyperparameters llama.cpp reads for `arch`."""
    _warn_about_attention_differences(config, arch)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    dim = head_dim(config)
    # Given explicitly: Qwen 3 and Gemma heads are not hidden / heads wide.
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    _write_rope(writer, config, arch)
    if arch.gguf_name == "gemma2":
        if getattr(config, "attn_logit_softcapping", None) is not None:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None) is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))
