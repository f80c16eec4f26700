"""load_in_8bit=True: bitsandbytes LLM.int8() layers through transformers, LoRA through PEFT's own
8-bit forward (the fused LoRA functions only take NF4 or 16-bit bases). bitsandbytes 0.50 runs
Linear8bitLt on CPU, so the whole flow is compared here with plain transformers + PEFT loaded the
same way."""

import pytest
import torch

from loraforge.models import FastLanguageModel, base_weight, lora_autograd, stacked_lora
from loraforge.models import patch as lf_patch

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def _plain_8bit_peft(path, device, adapters_from):
    """transformers + bitsandbytes 8-bit + PEFT, no loraforge, with the adapters of `adapters_from`."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.float32, device_map={"": device})  # fmt: skip
    config = adapters_from.peft_config["default"]
    model = get_peft_model(model, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                                             task_type="CAUSAL_LM"))  # fmt: skip
    set_peft_model_state_dict(model, get_peft_model_state_dict(adapters_from))
    return model


def _forbid_fused_lora(monkeypatch):
    """Fail on any use of the fused LoRA path's view of a base weight (an int8 weight cast to float)."""

    def refuse(*args, **kwargs):
        raise AssertionError("an 8-bit base reached the fused LoRA path")

    for module, name in (
        (lora_autograd, "dense_weight"),
        (stacked_lora, "dequantize_into"),
        (base_weight, "dense_weight"),
    ):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_8bit_lora_matches_transformers_and_peft(saved_models, seed, monkeypatch, device):
    path = saved_models["llama"]
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_8bit=True,
                                                         device_map="auto" if device == "cuda" else None)  # fmt: skip
    ours = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=seed % 1000)
    plain = _plain_8bit_peft(path, device, ours)
    assert lf_patch.is_patched(ours) and not lf_patch.is_patched(plain)
    lora_layers = [m for m in ours.modules() if hasattr(m, "lora_A")]
    assert len(lora_layers) == 7 * ours.config.num_hidden_layers
    for layer in lora_layers:
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear8bitLt)
        assert layer.get_base_layer().weight.dtype == torch.int8
        assert lf_patch.lora_projection(layer) is None  # the guard: PEFT's 8-bit forward
    _forbid_fused_lora(monkeypatch)

    batch = tokenizer(["The cat sat on the warm mat.", "Rain falls softly"], return_tensors="pt", padding=True).to(
        device
    )
    losses = {"ours": [], "plain": []}
    for key, peft_model in (("ours", ours), ("plain", plain)):
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            loss = peft_model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            if step == 0:
                grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
                losses[f"{key}_grads"] = grads
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[key].append(loss.item())
    # The same int8 code path on both sides; loraforge's RMSNorm and fused cross-entropy sit around it.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["plain"]), **tolerance)
    assert losses["ours"][-1] < losses["ours"][0]
    grads_ours, grads_plain = losses["ours_grads"], losses["plain_grads"]
    assert grads_ours.keys() == grads_plain.keys() and len(grads_ours) == 2 * len(lora_layers)
    for name in grads_ours:
        scale = grads_plain[name].abs().max().item()
        rtol, atol = (1e-4, max(1e-6, 2e-5 * scale)) if device == "cpu" else (2e-2, 2e-2 * scale)
        torch.testing.assert_close(grads_ours[name], grads_plain[name], rtol=rtol, atol=atol, msg=name)


def _layers():
    """nn.Linear, NF4 and FP4 Linear4bit, and an 8-bit Linear8bitLt before and after its int8 quantization."""
    linear = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)  # a frozen base
    layers = {"linear": linear}
    for quant_type in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type=quant_type, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type)
        layers[quant_type] = layer.to("cpu")  # quantizes
    fresh = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    fresh.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layers["int8_fresh"] = fresh
    quantized = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    quantized.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layers["int8"] = quantized.to("cpu")
    return layers


def test_only_nf4_and_float_bases_take_the_fused_path():
    from peft import LoraConfig, get_peft_model

    layers = _layers()
    assert layers["int8"].weight.dtype == torch.int8  # bitsandbytes quantized it on CPU
    assert layers["int8_fresh"].weight.is_floating_point()  # not yet: still no dense W to use
    expected = {"linear": True, "nf4": True, "fp4": False, "int8_fresh": False, "int8": False}
    assert {name: base_weight.has_dense_weight(layer) for name, layer in layers.items()} == expected
    for name, layer in layers.items():  # as a plain projection, and wrapped by PEFT's LoRA layer
        assert (lf_patch.lora_projection(layer) is not None) == expected[name], name
        holder = torch.nn.Module()
        holder.q_proj = layer
        wrapped = get_peft_model(holder, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        lora_layer = wrapped.base_model.model.q_proj
        assert hasattr(lora_layer, "lora_A")
        assert (lf_patch.lora_projection(lora_layer) is not None) == expected[name], name
    # What the guard protects against: the int8 codes cast to float are not W.
    w = layers["linear"].weight
    assert (layers["int8"].weight.float() - w).abs().max() > 10 * w.abs().max()


def test_8bit_load_arguments(saved_models, tmp_path):
    path = saved_models["llama"]
    with pytest.raises(ValueError, match="pick one"):
        FastLanguageModel.from_pretrained(path, load_in_4bit=True, load_in_8bit=True)
    from transformers import BitsAndBytesConfig

    with pytest.raises(ValueError, match="quantization_config"):
        FastLanguageModel.from_pretrained(
            path, load_in_8bit=True, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )
    explicit, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, load_in_8bit=True, dtype=torch.float32)
    assert explicit.is_loaded_in_8bit and isinstance(explicit.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not any(p.requires_grad for p in explicit.parameters())
    with pytest.raises(ValueError, match="8-bit"):
        FastLanguageModel.get_peft_model(explicit, init_lora_weights="loftq")
    default, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)  # 4-bit unless asked otherwise
    assert type(default.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with pytest.warns(UserWarning, match="instead of 8-bit"):
        full, _ = FastLanguageModel.from_pretrained(path, load_in_8bit=True, full_finetuning=True, dtype=torch.float32)
    assert type(full.model.layers[0].mlp.up_proj) is torch.nn.Linear and all(p.requires_grad for p in full.parameters())
    # An 8-bit checkpoint (saved by transformers) loads as it is, with or without load_in_8bit.
    from transformers import AutoTokenizer

    explicit.save_pretrained(tmp_path / "int8")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "int8")
    for kwargs in ({"load_in_8bit": True}, {}):
        again, _ = FastLanguageModel.from_pretrained(tmp_path / "int8", dtype=torch.float32, **kwargs)
        layer = again.model.layers[0].mlp.up_proj
        assert isinstance(layer, bnb.nn.Linear8bitLt)
        assert torch.equal(layer.weight.data, explicit.model.layers[0].mlp.up_proj.weight.data)
    from transformers import AutoModelForCausalLM

    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(path, quantization_config=four_bit, device_map={"": "cpu"}).save_pretrained(
        tmp_path / "nf4"
    )
    with pytest.raises(ValueError, match="already quantized \\(bitsandbytes 4-bit\\)"):
        FastLanguageModel.from_pretrained(tmp_path / "nf4", load_in_8bit=True)
