"""Quantization mixes against llama.cpp's own quantize tool: same tensors, same types, same bytes.

We export F32 plus every mix in one call, have llama.cpp's llama_model_quantize turn our F32 file
into each mix, and compare every tensor of the two files. Shapes are chosen to reach the rules:
8 layers (use_more_bits picks layers 0, 3, 6, 7; Q4_K_S and Q3_K_M treat the first layers apart),
17 layers (Q3_K_M's first sixteenth), grouped-query ratios 2 and 4 (Q2_K's attn_v rule), rows of
256 (K-quants) and of 288 / 576 (not multiples of 256: Q5_0 / Q5_1 / Q8_0 / Q4_0 fallbacks), tied
and untied output projections.
"""

import numpy as np
import pytest
from loraforge import testing
from loraforge.export import save_pretrained_gguf
from loraforge.export.gguf_mixes import MIXES, ModelShape, plan_tensor_types, resolve_mixes

from tests.export import _llama_cpp

pytest.importorskip("gguf")
_llama_cpp.llama_cpp()

CASES = {
    # untied output, 8 layers, K-quant-friendly rows
    "llama-8-layers": ("llama", {"hidden_size": 256, "intermediate_size": 512, "num_layers": 8}),
    # tied output, rows of 288 and 576, heads / kv_heads = 4
    "qwen2-odd-rows": (
        "qwen2",
        {"hidden_size": 288, "intermediate_size": 576, "num_layers": 3, "num_heads": 8, "num_kv_heads": 2},
    ),
    # tied, 17 layers, one kv head, small matrices
    "gemma2-17-layers": (
        "gemma2",
        {"hidden_size": 256, "intermediate_size": 256, "num_layers": 17, "num_heads": 8, "num_kv_heads": 1,
         "vocab_size": 300},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_mix_matches_llama_quantize(tmp_path, case):
    arch, sizes = CASES[case]
    sizes = dict(sizes)
    vocab = sizes.pop("vocab_size", 512)
    model, tokenizer = testing.tiny_model_and_tokenizer(arch, seed=5, vocab_size=vocab, **sizes)
    mixes = [name for name in MIXES if name != "f32"]
    paths = save_pretrained_gguf(model, tmp_path, tokenizer, ["f32", *mixes], write_modelfile=False)
    source = paths[0]
    for name, ours_path in zip(mixes, paths[1:]):
        reference_path = tmp_path / f"llama-quantize.{name}.gguf"
        _llama_cpp.quantize(source, reference_path, MIXES[name].file_type)
        ours, reference = _llama_cpp.tensors(ours_path), _llama_cpp.tensors(reference_path)
        assert sorted(ours) == sorted(reference), name
        for tensor in reference:
            assert ours[tensor][:2] == reference[tensor][:2], (name, tensor, ours[tensor][:2], reference[tensor][:2])
            assert ours[tensor][2] == reference[tensor][2], (name, tensor, "bytes differ")
        assert _llama_cpp.metadata(ours_path)["general.file_type"] == MIXES[name].file_type


def test_fallback_quantizers_are_ggml_exact():
    """Q5_0 / Q5_1 (fallbacks for rows K-quants cannot pack) come from the gguf package's numpy
    quantizers; they must produce ggml's bytes."""
    from loraforge.export.gguf_convert import encode_tensor

    from tests.gguf._ggml_oracle import GGML, find_libggml_base

    ggml = GGML(find_libggml_base())
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((9, 96)) * np.exp(2 * rng.standard_normal((9, 96)))).astype(np.float32)
    x[0] = 0
    x[1, :32] = 1.5
    x[2] = np.abs(x[2])
    for name, type_id in (("Q5_0", 6), ("Q5_1", 7)):
        assert np.array_equal(encode_tensor(x, name), ggml.quantize(x, type_id)), name


def _layer_tensors(n_layers, hidden=4096, kv=1024, ff=14336, tied=False):
    shapes = {"token_embd.weight": (32000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (32000, hidden)
    for i in range(n_layers):
        shapes.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ff, hidden), f"blk.{i}.ffn_up.weight": (ff, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ff), f"blk.{i}.attn_norm.weight": (hidden,)})  # fmt: skip
    return shapes


def test_rules_for_shapes_too_big_to_run():
    """Rules only large models reach (checked against llama-quant.cpp by reading, not running)."""
    seventy_b = ModelShape("llama", n_layers=80, n_heads=64, n_kv_heads=8)
    types = plan_tensor_types(MIXES["q4_k_s"], _layer_tensors(80), seventy_b)
    assert types["blk.0.attn_v.weight"] == "Q5_K" and types["blk.50.attn_v.weight"] == "Q5_K"  # 70B: Q4_K -> Q5_K
    assert types["blk.50.attn_q.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # Q4_K_M's "more bits" layers out of 32: the first and last 4, and every third from layer 6.
    types = plan_tensor_types(MIXES["q4_k_m"], _layer_tensors(32), ModelShape("llama", 32, 32, 8))
    more_bits = [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more_bits
    # Q3_K_M: ffn_down Q5_K in the first 32/16 = 2 layers, attn_output Q4_K.
    types = plan_tensor_types(MIXES["q3_k_m"], _layer_tensors(32, tied=True), ModelShape("llama", 32, 32, 8))
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert types["blk.5.attn_output.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"


def test_mix_names():
    assert [m.name for m in resolve_mixes(["Q4_K_M", "quantized", "q8_0", "not_quantized"])] == [
        "Q4_K_M",
        "Q8_0",
        "F16",
    ]
    with pytest.raises(ValueError, match="unknown quantization_method 'q4_k_x'"):
        resolve_mixes("q4_k_x")
    with pytest.raises(ValueError, match="at least one"):
        resolve_mixes([])
