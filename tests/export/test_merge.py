"""save_pretrained_merged against PEFT's own merge_and_unload, on 16-bit and 4-bit bases."""

import json
import warnings

import pytest
import torch
from loraforge import testing
from loraforge.export import save_pretrained_merged
from loraforge.models import FastLanguageModel

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

SIZES = {"hidden_size": 256, "intermediate_size": 512}
IDS = torch.tensor([[0, 17, 42, 99, 123, 200, 311, 400, 7, 64]])


def _lora_model(folder, load_in_4bit=False, dtype=torch.float32, peft_4bit_layers=False, seed=11):
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=load_in_4bit, dtype=dtype)
    if peft_4bit_layers:
        # Lets PEFT wrap the NF4 layers in its bitsandbytes LoRA class, whose merge re-quantizes.
        model.is_loaded_in_4bit = True
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False, random_state=seed)
    FastLanguageModel.unpatch(model)  # PEFT's own forward is the reference
    return model, tokenizer


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: testing.save_tiny_model(root / arch, arch=arch, seed=2, **SIZES) for arch in testing.ARCHITECTURES}


@pytest.mark.parametrize("arch", testing.ARCHITECTURES)
def test_merged_16bit_fp32_equals_peft_merge(bases, tmp_path, arch):
    model, tokenizer = _lora_model(bases[arch])
    save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    ours = _load(tmp_path / "merged")
    assert ours.dtype == torch.float32
    reference = model.merge_and_unload()
    torch.testing.assert_close(_logits(ours), _logits(reference), rtol=0, atol=2e-5)
    ours_state = ours.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ("llama", "gemma2"))
def test_merged_16bit_bf16_is_within_bf16_rounding(bases, tmp_path, arch):
    model, tokenizer = _lora_model(bases[arch], dtype=torch.bfloat16)
    # The exact merge, in fp32, of the same bf16 base and the same adapter.
    exact = _lora_model(bases[arch], dtype=torch.bfloat16)[0]
    exact.load_state_dict(model.state_dict())
    exact = exact.float().merge_and_unload()
    save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    ours = _load(tmp_path / "merged")
    assert ours.dtype == torch.bfloat16
    peft = model.merge_and_unload()  # PEFT merges in bf16: W_bf16 + bf16(delta)
    ours_state, exact_state = ours.state_dict(), exact.state_dict()
    for name, value in peft.state_dict().items():
        # Each merged weight is the exact one rounded once to bf16; PEFT's, rounded twice, is
        # within one bf16 step of it.
        torch.testing.assert_close(ours_state[name], exact_state[name].bfloat16(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(value.float(), ours_state[name].float(), rtol=2**-7, atol=1e-6, msg=name)
    error_ours = (_logits(ours) - _logits(exact)).abs().max()
    error_peft = (_logits(peft) - _logits(exact)).abs().max()
    assert error_ours <= 2 * error_peft + 1e-3, (error_ours, error_peft)


def test_4bit_base_merges_like_peft(bases, tmp_path):
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    model, tokenizer = _lora_model(bases["llama"], load_in_4bit=True, peft_4bit_layers=True)
    unmerged = _logits(model)
    save_pretrained_merged(model, tmp_path / "16bit", tokenizer, "merged_16bit")
    with pytest.warns(UserWarning, match="re-quantizes"):
        save_pretrained_merged(model, tmp_path / "4bit", tokenizer, "merged_4bit")

    # merged_16bit: dequantized NF4 base + adapter, exactly the function the adapter computed.
    torch.testing.assert_close(_logits(_load(tmp_path / "16bit")), unmerged, rtol=0, atol=2e-5)

    # merged_4bit: the same bytes PEFT's merge_and_unload re-quantizes to.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model.merge_and_unload()
    saved = load_file(tmp_path / "4bit" / "model.safetensors")
    config = json.loads((tmp_path / "4bit" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = _load(tmp_path / "4bit")
    quantized = 0
    for name, module in reference.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        quantized += 1
        assert torch.equal(saved[f"{name}.weight"].view(-1), module.weight.data.view(torch.uint8).view(-1)), name
        state = module.weight.quant_state
        assert torch.equal(saved[f"{name}.weight.absmax"], state.absmax), name
        assert torch.equal(saved[f"{name}.weight.nested_absmax"], state.state2.absmax), name
        # transformers loads it back as a bitsandbytes layer holding those weights.
        ours = loaded.get_submodule(name)
        assert type(ours).__name__ == "Linear4bit"
        expected = F.dequantize_4bit(module.weight.data, state)
        assert torch.equal(F.dequantize_4bit(ours.weight.data, ours.weight.quant_state), expected), name
    assert quantized == 7 * 2  # every projection of both layers
    assert saved["lm_head.weight"].dtype == torch.float32  # the output head stays dense


def test_default_4bit_lora_layers_merge_too(bases, tmp_path):
    """FastLanguageModel's own 4-bit path wraps NF4 layers in PEFT's plain LoRA class (PEFT then
    cannot merge them itself); the merge must still be exact."""
    model, tokenizer = _lora_model(bases["qwen3"], load_in_4bit=True)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    torch.testing.assert_close(_logits(_load(tmp_path / "merged")), _logits(model), rtol=0, atol=2e-5)


def test_from_a_prequantized_checkpoint_drops_quantization_config(bases, tmp_path):
    model, tokenizer = _lora_model(bases["llama"], load_in_4bit=True)
    with pytest.warns(UserWarning):
        save_pretrained_merged(model, tmp_path / "nf4", tokenizer, "merged_4bit")
    again, tokenizer = _lora_model(tmp_path / "nf4", load_in_4bit=True)
    assert getattr(again.get_base_model().config, "quantization_config", None) is not None
    save_pretrained_merged(again, tmp_path / "16bit", tokenizer, "merged_16bit")
    config = json.loads((tmp_path / "16bit" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "16bit" / "generation_config.json").exists()
    assert (tmp_path / "16bit" / "tokenizer.json").exists()
    loaded = _load(tmp_path / "16bit")
    assert type(loaded.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_shards_and_index(bases, tmp_path):
    model, tokenizer = _lora_model(bases["qwen2"])
    save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit", max_shard_size=600_000)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    assert not list((tmp_path / "merged").glob("*.partial"))
    torch.testing.assert_close(_logits(_load(tmp_path / "merged")), _logits(model), rtol=0, atol=2e-5)


def test_lora_method_saves_the_adapter(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = _lora_model(bases["gemma"])
    save_pretrained_merged(model, tmp_path / "adapter", tokenizer, "lora")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(bases["gemma"], attn_implementation="eager")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)


def test_refuses_bad_arguments(bases, tmp_path):
    model, tokenizer = _lora_model(bases["llama"])
    with pytest.raises(ValueError, match="save_method must be one of"):
        save_pretrained_merged(model, tmp_path / "x", tokenizer, "merged_8bit")
    with pytest.raises(ValueError, match="maximum_memory_usage"):
        save_pretrained_merged(model, tmp_path / "x", tokenizer, maximum_memory_usage=1.5)
    with pytest.raises(ValueError, match="needs a PEFT model"):
        save_pretrained_merged(model.get_base_model(), tmp_path / "y", None, "lora")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unsloth_style_methods(bases, tmp_path):
    from loraforge.export import attach_export_methods

    model, tokenizer = _lora_model(bases["qwen3"])
    attach_export_methods(model)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")
    (path,) = model.save_pretrained_gguf(tmp_path / "gguf", tokenizer, quantization_method="q8_0")
    assert (tmp_path / "merged" / "model.safetensors").exists() and path.endswith("gguf.Q8_0.gguf")


def test_4bit_model_merges_into_the_original_16bit_weights(bases, tmp_path):
    """base_checkpoint: the merge starts from the checkpoint's own weights (not the NF4-rounded ones),
    each projection = W_16bit + s B A exactly in fp32; without it, the dequantized NF4 base."""
    from safetensors.torch import load_file

    from loraforge.export.merged_weights import merged_tensors

    model, tokenizer = _lora_model(bases["llama"], load_in_4bit=True)
    save_pretrained_merged(model, tmp_path / "from16", tokenizer, "merged_16bit", base_checkpoint=bases["llama"])
    save_pretrained_merged(model, tmp_path / "fromnf4", tokenizer, "merged_16bit")
    original = {}
    for file in sorted(bases["llama"].glob("*.safetensors")):
        original.update(load_file(file))
    from16, fromnf4 = load_file(tmp_path / "from16" / "model.safetensors"), load_file(tmp_path / "fromnf4" / "model.safetensors")
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        key = name.split("base_model.model.", 1)[1] + ".weight"
        delta = (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()) * module.scaling["default"]
        torch.testing.assert_close(from16[key], original[key].float() + delta, rtol=0, atol=0)
        nf4_base = module.get_base_layer()
        from loraforge.models.base_weight import dense_weight

        torch.testing.assert_close(fromnf4[key], dense_weight(nf4_base, torch.float32) + delta, rtol=0, atol=0)
        assert not torch.equal(from16[key], fromnf4[key])  # NF4 rounding is really gone
        checked += 1
    assert checked == 7 * 2
    # Tensors that were never quantized (embeddings, norms, lm_head) are the same either way.
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(from16[key], fromnf4[key])
    # The GGUF export reads the same source.
    names = {t.name for t in merged_tensors(model, bases["llama"])}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    # Wrong folders are clear errors, and nothing is left half-written.
    with pytest.raises(ValueError, match="base_checkpoint must be a local folder"):
        save_pretrained_merged(model, tmp_path / "bad", tokenizer, "merged_16bit", base_checkpoint=tmp_path / "nope")
    other = testing.save_tiny_model(tmp_path / "other", arch="llama", seed=2, hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match="has shape"):
        save_pretrained_merged(model, tmp_path / "bad2", tokenizer, "merged_16bit", base_checkpoint=other)
    assert not (tmp_path / "bad2" / "model.safetensors").exists()


def test_loftq_adapters_refuse_the_16bit_base(bases, tmp_path):
    """LoftQ adapters compensate the NF4 rounding: merging them into the original weights would count
    that correction twice, so base_checkpoint is refused; the default (NF4 base) merge works."""
    model, tokenizer = FastLanguageModel.from_pretrained(bases["llama"], load_in_4bit=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.raises(ValueError, match="LoftQ-initialised"):
        save_pretrained_merged(model, tmp_path / "no", tokenizer, "merged_16bit", base_checkpoint=bases["llama"])
    save_pretrained_merged(model, tmp_path / "yes", tokenizer, "merged_16bit")
    assert (tmp_path / "yes" / "model.safetensors").exists()
