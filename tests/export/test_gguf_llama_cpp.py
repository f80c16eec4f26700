"""GGUF export read back by llama.cpp itself: logits against transformers, tokenizer ids, LoRA models.

Every architecture is exported at hidden size 256 (so the K-quant mixes really use K-quants) and
evaluated by llama.cpp on the same token sequence transformers evaluates. llama.cpp keeps its KV
cache in F32 here, so an F32 file differs from transformers only by float32 reordering (and, for
Gemma, by ggml's table-based GELU, ~1e-4).
"""

import warnings

import numpy as np
import pytest
import torch
from loraforge import testing
from loraforge.export import save_pretrained_gguf

from tests.export import _llama_cpp

pytest.importorskip("gguf")
_llama_cpp.llama_cpp()

TEXT = "The cat sat on the warm mat. Rain falls softly on the roof today, and the children play outside."
SIZES = {"hidden_size": 256, "intermediate_size": 512}
# Max |llama.cpp - transformers| over all logits (logits of these models have a spread of ~0.3).
MAX_ABS = {"F32": 1e-3, "F16": 4e-3, "BF16": 3e-2}
# RMS error relative to the logits' spread; measured ~0.02 (Q8_0) and <= 0.19 (Q4_K_M) on these models.
MAX_RELATIVE_RMS = {"Q8_0": 0.04, "Q4_K_M": 0.3}


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _relative_rms(ours, ref):
    spread = ref - ref.mean(-1, keepdims=True)
    return float(np.sqrt(((ours - ref) ** 2).mean() / (spread**2).mean()))


def assert_same_argmax(ours, ref, tolerance):
    """Same top token at every position, except where the reference's top two are closer than
    the numerical tolerance itself (a genuine tie)."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert agree[decided].all(), f"argmax differs at positions {np.flatnonzero(decided & ~agree).tolist()}"


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_logits_match_transformers(tmp_path, arch):
    model, tokenizer = testing.tiny_model_and_tokenizer(arch, seed=1, **SIZES)
    methods = ["f32", "f16", "bf16", "q8_0", "q4_k_m"]
    if arch == "mistral":  # llama.cpp runs Mistral as llama, without its sliding window
        with pytest.warns(UserWarning, match="sliding window"):
            paths = save_pretrained_gguf(model, tmp_path, tokenizer, methods, write_modelfile=False)
    else:
        paths = save_pretrained_gguf(model, tmp_path, tokenizer, methods, write_modelfile=False)
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) < (getattr(model.config, "sliding_window", None) or len(ids) + 1)
    ref = _reference_logits(model, ids)
    errors = {}
    for path in paths:
        kind = path.rsplit(".", 2)[-2]
        ours = _llama_cpp.logits(path, ids)
        assert ours.shape == ref.shape
        errors[kind] = _relative_rms(ours, ref)
        if kind in MAX_ABS:
            assert np.abs(ours - ref).max() < MAX_ABS[kind], (kind, np.abs(ours - ref).max())
            assert_same_argmax(ours, ref, MAX_ABS[kind])
        else:
            assert errors[kind] < MAX_RELATIVE_RMS[kind], (kind, errors[kind])
    # More bits, less error: a sanity check that each file holds what its name says.
    assert errors["F32"] < errors["F16"] < errors["Q8_0"] < errors["Q4_K_M"]


def test_gemma2_sliding_window_beyond_the_window(tmp_path):
    model, tokenizer = testing.tiny_model_and_tokenizer("gemma2", seed=2, **SIZES)
    ids = tokenizer(TEXT * 3)["input_ids"]
    assert len(ids) > 1.5 * model.config.sliding_window
    (path,) = save_pretrained_gguf(model, tmp_path, tokenizer, "f32", write_modelfile=False)
    ours, ref = _llama_cpp.logits(path, ids), _reference_logits(model, ids)
    assert np.abs(ours - ref).max() < MAX_ABS["F32"]


ROPE_SCALINGS = {
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
}  # fmt: skip


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling(tmp_path, scaling):
    arch, rope = ROPE_SCALINGS[scaling]
    model, tokenizer = testing.tiny_model_and_tokenizer(arch, seed=3, rope_parameters=rope, **SIZES)
    (path,) = save_pretrained_gguf(model, tmp_path, tokenizer, "f32", write_modelfile=False)
    ids = tokenizer(TEXT * 2)["input_ids"]
    ours, ref = _llama_cpp.logits(path, ids), _reference_logits(model, ids)
    assert np.abs(ours - ref).max() < MAX_ABS["F32"]
    assert ("rope_freqs.weight" in _llama_cpp.tensors(path)) == (scaling == "llama3")


@pytest.mark.parametrize("load_in_4bit", (False, True), ids=("16bit-base", "4bit-base"))
def test_lora_model_matches_merged_transformers_model(tmp_path, load_in_4bit):
    from loraforge.models import FastLanguageModel

    folder = testing.save_tiny_model(tmp_path / "base", arch="llama", seed=4, **SIZES)
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=load_in_4bit, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False)
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            without_lora = _reference_logits(base, ids)
        ref = _reference_logits(model, ids)  # the adapter's forward == the merged model's
    assert np.abs(ref - without_lora).max() > 0.05  # the adapter really changes the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, ["f32", "q8_0"])
    ours = _llama_cpp.logits(paths[0], ids)
    assert np.abs(ours - ref).max() < MAX_ABS["F32"]
    assert_same_argmax(ours, ref, MAX_ABS["F32"])
    assert _relative_rms(_llama_cpp.logits(paths[1], ids), ref) < MAX_RELATIVE_RMS["Q8_0"]
