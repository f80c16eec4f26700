"""Which ggml type each tensor gets in each quantization mix, as llama.cpp's quantize tool decides.

A "mix" such as Q4_K_M is not one type: llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp)
gives the output projection Q6_K, some attn_v and ffn_down layers more bits than the rest, and
falls back to a 32-block type when a row length is not a multiple of 256. This module restates
those rules for the dense (non-MoE) architectures loraforge exports, without an importance matrix,
so that our file carries exactly the types llama.cpp's quantize would choose from our F32 file.

The rules, for a tensor llama.cpp quantizes at all (2-D, name ending in "weight", not a norm):

    output.weight (or token_embd.weight when the model has no output.weight):
        Q8_0 when its rows are not a multiple of the mix's block size, else Q6_K unless the mix is Q8_0
    attn_v:    Q2_K mix: Q4_K if heads / kv_heads >= 4 else Q3_K;  Q3_K_M: Q5_K for the first two
               layers, Q4_K after;  Q3_K_L: Q5_K;  Q4_K_M, Q5_K_M: Q6_K on "more bits" layers;
               Q4_K_S: Q5_K for the first four layers;  70B-class models: Q3_K / Q4_K become Q5_K
    ffn_down:  Q2_K: Q3_K;  Q3_K_M: Q5_K in the first 1/16 of layers, else Q4_K;  Q3_K_L: Q5_K;
               Q4_K_M, Q5_K_M: Q6_K on "more bits" layers;  Q4_K_S: Q5_K in the first 1/8
    attn_output:  Q2_K: Q3_K;  Q3_K_M: Q4_K;  Q3_K_L: Q5_K
    everything else: the mix's base type.

"More bits" layers are the first and last eighth of the layers plus every third in between.
A row length (columns) the chosen type cannot pack falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 if even the 32-block type does not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MIXES", "QuantizationMix", "plan_tensor_types", "resolve_mixes"]


@dataclass(frozen=True)
class QuantizationMix:
    name: str  # as written in file names, e.g. "Q4_K_M"
    file_type: int  # llama.cpp's llama_ftype (general.file_type)
    base_type: str  # the ggml type of most tensors

    @property
    def quantized(self) -> bool:
        return self.base_type not in ("F32", "F16", "BF16")


MIXES: dict[str, QuantizationMix] = {
    m.name.lower(): m
    for m in (
        QuantizationMix("F32", 0, "F32"),
        QuantizationMix("F16", 1, "F16"),
        QuantizationMix("BF16", 32, "BF16"),
        QuantizationMix("Q8_0", 7, "Q8_0"),
        QuantizationMix("Q4_0", 2, "Q4_0"),
        QuantizationMix("Q2_K", 10, "Q2_K"),
        QuantizationMix("Q3_K_S", 11, "Q3_K"),
        QuantizationMix("Q3_K_M", 12, "Q3_K"),
        QuantizationMix("Q3_K_L", 13, "Q3_K"),
        QuantizationMix("Q4_K_S", 14, "Q4_K"),
        QuantizationMix("Q4_K_M", 15, "Q4_K"),
        QuantizationMix("Q5_K_S", 16, "Q5_K"),
        QuantizationMix("Q5_K_M", 17, "Q5_K"),
        QuantizationMix("Q6_K", 18, "Q6_K"),
    )
}
# Unsloth's names for the common choices.
_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m", "q4_k": "q4_k_m",
            "q5_k": "q5_k_m", "q3_k": "q3_k_m"}  # fmt: skip

# Values per block of each ggml type (ggml_blck_size).
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32,
              "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}  # fmt: skip
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def resolve_mixes(quantization_method) -> list[QuantizationMix]:
    """The mixes for a name or a list of names (any case, Unsloth aliases accepted), duplicates dropped."""
    names = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not names:
        raise ValueError("quantization_method must name at least one quantization")
    result = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"quantization methods must be strings, got {name!r}")
        key = _ALIASES.get(name.strip().lower(), name.strip().lower())
        if key not in MIXES:
            raise ValueError(
                f"unknown quantization_method {name!r}; choose from {', '.join(MIXES)} (or {', '.join(_ALIASES)})"
            )
        if MIXES[key] not in result:
            result.append(MIXES[key])
    return result


def _more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's use_more_bits (integer division as in C).
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    """What the rules need to know about the model as a whole."""

    gguf_arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def is_70b_class(self) -> bool:
        # llama.cpp's model type 70B: 80-layer llama with grouped-query attention, or 80-layer qwen2.
        if self.n_layers != 80:
            return False
        return self.gguf_arch == "qwen2" or (self.gguf_arch == "llama" and self.n_heads != self.n_kv_heads)

    @property
    def gqa(self) -> int:
        return self.n_heads // self.n_kv_heads


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    # tensor_allows_quantization for the tensors our architectures have.
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in (
        "attn_v.weight",
        "attn_k.weight",
        "attn_q.weight",
        "attn_output.weight",
        "ffn_up",
        "ffn_gate",
        "ffn_down",
    ):
        if key in name:
            return key.split(".")[0]
    return "other"


class _Counters:
    def __init__(self):
        self.attn_v = self.ffn_down = 0


def _mix_type(mix: QuantizationMix, name: str, ncols: int, model: ModelShape, n_attn_v: int, tied: bool,
              counters: _Counters) -> str:  # fmt: skip
    kind = _category(name)
    new = mix.base_type
    m = mix.name
    if kind == "output" or (tied and kind == "token_embd"):
        if ncols % BLOCK_SIZE[new]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if kind == "attn_v":
        i = counters.attn_v
        if m == "Q2_K":
            new = "Q4_K" if model.gqa >= 4 else "Q3_K"
        elif m == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif m == "Q3_K_L":
            new = "Q5_K"
        elif m in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_attn_v):
            new = "Q6_K"
        elif m == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if model.is_70b_class and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        counters.attn_v += 1
    elif kind == "ffn_down":
        i, n = counters.ffn_down, model.n_layers
        if m == "Q2_K":
            new = "Q3_K"
        elif m == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif m == "Q3_K_L":
            new = "Q5_K"
        elif m in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            new = "Q6_K"
        elif m == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        counters.ffn_down += 1
    elif kind == "attn_output":
        new = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(m, new)
    return new


def _fallback(type_name: str, ncols: int) -> str:
    if ncols % BLOCK_SIZE[type_name] == 0:
        return type_name
    smaller = _FALLBACK.get(type_name, type_name)
    return smaller if ncols % BLOCK_SIZE[smaller] == 0 else "F16"


def _llama_cpp_order(names: list[str]) -> list[str]:
    """The order llama.cpp's quantize visits tensors in (its counters depend on it): by layer
    number (non-layer tensors first), then by name."""

    def key(name: str):
        match = re.match(r"blk\.(\d+)\.", name)
        return (int(match.group(1)) if match else -1, name)

    return sorted(names, key=key)


def plan_tensor_types(mix: QuantizationMix, tensors: dict[str, tuple[int, ...]], model: ModelShape) -> dict[str, str]:
    """The ggml type of every tensor (GGUF name -> numpy-order shape) in a file of this mix.

    Tensors llama.cpp never quantizes (1-D, norms) are F32, as its converters write them."""
    tied = "output.weight" not in tensors
    n_attn_v = sum(_category(name) == "attn_v" for name, shape in tensors.items() if _quantizable(name, shape))
    counters = _Counters()
    types = {}
    for name in _llama_cpp_order(list(tensors)):
        shape = tensors[name]
        if not _quantizable(name, shape):
            types[name] = "F32"
            continue
        ncols = shape[-1]
        if not mix.quantized:
            types[name] = mix.base_type
            continue
        types[name] = _fallback(_mix_type(mix, name, ncols, model, n_attn_v, tied, counters), ncols)
    return types
