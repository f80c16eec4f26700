"""LoftQ initialisation (models/loftq.py) on loraforge's 4-bit loads.

The references are independent of the code under test: the original weights are read straight from
the checkpoint's safetensors, the NF4 base is dequantized by bitsandbytes itself, and the best
rank-r correction is known in closed form (Eckart-Young: the error left is the root of the sum of the
squared singular values beyond r of W - deq(Q), computed here in float64). The error is quadratic in a
deviation from that optimum, so the float32 SVD lands within ~1e-12 of it, while the LoftQ of a slightly
different base (e.g. NF4 without double quantization) already lands ~5e-5 away: hence rtol=1e-6."""

from pathlib import Path

import pytest
import torch

from loraforge.models import FastLanguageModel
from loraforge.models import patch as lf_patch
from loraforge.models.loftq import loftq_initialize

pytest.importorskip("peft")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _loftq_model(path, r=4, lora_alpha=8, **kwargs):
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=lora_alpha, **kwargs), tokenizer


def _original_weights(path):
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key).double() for key in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _lora_layers(peft_model):
    return [(name, m) for name, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A")]


def _errors(peft_model, originals):
    """Per targeted projection: (||W - deq(Q)||, ||W - deq(Q) - s B A||, the rank-r optimum, B)."""
    rows = {}
    for name, module in _lora_layers(peft_model):
        base = module.get_base_layer()
        W = originals[f"{name}.weight"]
        Q = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
        A, B = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
        residual = W - Q
        r = A.shape[0]
        optimum = torch.linalg.svdvals(residual)[r:].square().sum().sqrt()
        rows[name] = (residual.norm(), (residual - module.scaling["default"] * B @ A).norm(), optimum, B)
    return rows


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_loftq_adapters_are_the_best_rank_r_correction_of_the_nf4_base(saved_models, arch):
    path = saved_models[arch]
    model, _ = _loftq_model(path, r=4, lora_alpha=8, init_lora_weights="loftq")  # scaling 2: must be divided out
    plain, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    rows = _errors(model, _original_weights(path))
    assert len(rows) == plain.config.num_hidden_layers * len(TARGETS)  # every targeted projection
    for name, (quantized, effective, optimum, B) in rows.items():
        assert B.abs().max() > 0, name  # not PEFT's default init (B = 0)
        assert effective < 0.97 * quantized, name  # the point of LoftQ
        torch.testing.assert_close(effective, optimum, rtol=1e-6, atol=0.0, msg=name)
    # loftq_iter=1 leaves the base as a plain 4-bit load makes it: the adapter alone stays valid for it.
    bases = {n: m for n, m in plain.named_modules() if type(m).__name__ == "Linear4bit"}
    for name, module in _lora_layers(model):
        assert torch.equal(module.get_base_layer().weight.data, bases[name].weight.data), name


def test_more_iterations_requantize_the_base_and_lower_the_error(saved_models):
    path = saved_models["llama"]
    originals = _original_weights(path)
    one, _ = _loftq_model(path, loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    with pytest.warns(UserWarning, match="re-quantized the NF4 base"):
        three, _ = _loftq_model(path, loftq_config={"loftq_bits": 4, "loftq_iter": 3})
    rows_one, rows_three = _errors(one, originals), _errors(three, originals)
    for name, (quantized, effective, optimum, _) in rows_three.items():
        # The adapters are again the optimum for the base the model now holds (bnb dequantizes it).
        torch.testing.assert_close(effective, optimum, rtol=1e-6, atol=0.0, msg=name)
        assert effective < rows_one[name][0], name
    total = {k: sum(row[1] ** 2 for row in rows.values()).sqrt() for k, rows in (("1", rows_one), ("3", rows_three))}
    assert total["3"] < 0.98 * total["1"]
    changed = [n for n, m in _lora_layers(three)
               if not torch.equal(m.get_base_layer().weight.data, dict(_lora_layers(one))[n].get_base_layer().weight.data)]  # fmt: skip
    assert len(changed) == len(rows_three)


def test_loftq_model_is_closer_to_the_16bit_model(saved_models):
    path = saved_models["qwen3"]
    full, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=False)
    qlora, _ = _loftq_model(path, init_lora_weights=True)
    loftq, _ = _loftq_model(path, init_lora_weights="loftq")
    batch = tokenizer(["The small river runs past the old mill"], return_tensors="pt")
    with torch.no_grad():
        logits = [m.eval()(**batch).logits for m in (full, qlora, loftq)]
    assert (logits[2] - logits[0]).norm() < 0.9 * (logits[1] - logits[0]).norm()


def test_loftq_config_forms_agree_and_are_recorded(saved_models):
    from peft import LoftQConfig

    path = saved_models["mistral"]
    forms = [{"init_lora_weights": "loftq"}, {"loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)},
             {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}]  # fmt: skip
    models = [_loftq_model(path, **form)[0] for form in forms]
    for model in models[1:]:
        for (name, a), (_, b) in zip(_lora_layers(models[0]), _lora_layers(model)):
            assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight), name
            assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), name
    assert models[0].get_base_model()._loraforge_loftq == {"loftq_bits": 4, "loftq_iter": 1}
    # Saved adapters load back as standard PEFT: the config does not ask PEFT to re-run an init.
    assert models[0].peft_config["default"].init_lora_weights is True


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_loftq_model_trains_and_matches_plain_peft(saved_models, arch):
    ours, tokenizer = _loftq_model(saved_models[arch], loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    plain, _ = _loftq_model(saved_models[arch], loftq_config={"loftq_bits": 4, "loftq_iter": 2})
    for (name, a), (_, b) in zip(_lora_layers(ours), _lora_layers(plain)):  # LoftQ is deterministic
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), name
    lf_patch.unpatch_model(plain)
    assert lf_patch.is_patched(ours) and not lf_patch.is_patched(plain)
    batch = tokenizer(["Apples fall from the tall tree.", "The wind is cold"], return_tensors="pt", padding=True)
    loss_ours, grads_ours = _loss_and_grads(ours, batch)
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss_ours, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_plain.keys() and len(grads_ours) > 0
    for name in grads_ours:
        atol = max(1e-6, 2e-5 * grads_plain[name].abs().max().item())
        torch.testing.assert_close(grads_ours[name], grads_plain[name], rtol=1e-4, atol=atol, msg=name)
        assert grads_ours[name].abs().max() > 0, name  # both A and B learn (B != 0 from the start)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = ours(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_loftq_refuses_what_it_cannot_do(saved_models, tmp_path):
    path = saved_models["llama"]
    sixteen, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=False)
    with pytest.raises(ValueError, match="load_in_4bit=True"):
        FastLanguageModel.get_peft_model(sixteen, init_lora_weights="loftq")
    assert not hasattr(sixteen, "peft_config")  # refused before any adapter was attached
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 8, "loftq_iter": 1})
    with pytest.raises(ValueError, match="loftq_iter"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4, "loftq_iter": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4, "bits": 4})
    with pytest.raises(ValueError, match="init_lora_weights=False"):
        FastLanguageModel.get_peft_model(model, init_lora_weights=False, loftq_config={"loftq_bits": 4})
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        loftq_initialize(peft_model, model_path="nobody-here/no-such-model")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        loftq_initialize(peft_model, model_path=tmp_path)


def test_prequantized_checkpoint_needs_the_16bit_weights(saved_models, tmp_path):
    """A checkpoint saved already in 4 bits (by transformers + bitsandbytes) has no 16-bit weights:
    get_peft_model says so; loftq_initialize with model_path pointing at the 16-bit folder works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = saved_models["llama"]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32,
                                                 device_map={"": "cpu"})  # fmt: skip
    model.save_pretrained(tmp_path / "nf4")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "nf4")
    prequantized, _ = FastLanguageModel.from_pretrained(tmp_path / "nf4", dtype=torch.float32)
    with pytest.raises(ValueError, match="already quantized to 4 bits"):
        FastLanguageModel.get_peft_model(prequantized, init_lora_weights="loftq")
    peft_model = FastLanguageModel.get_peft_model(prequantized, r=4, lora_alpha=4)
    with pytest.raises(ValueError, match="model_path"):
        loftq_initialize(peft_model)
    with pytest.raises(ValueError, match="unquantized checkpoint"):  # the 4-bit folder given as the 16-bit one
        loftq_initialize(peft_model, model_path=tmp_path / "nf4")
    assert loftq_initialize(peft_model, model_path=path) == 2 * len(TARGETS)
    for name, (quantized, effective, optimum, _) in _errors(peft_model, _original_weights(path)).items():
        assert effective < 0.97 * quantized, name
        torch.testing.assert_close(effective, optimum, rtol=1e-6, atol=0.0, msg=name)


@pytest.mark.gpu
def test_loftq_matches_peft_replace_lora_weights_loftq(saved_models):
    """PEFT's replace_lora_weights_loftq (CUDA only) on the same NF4 base gives B A = SVD_r(W - deq(Q))
    without the LoRA scaling; ours gives s B A equal to that product."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    path = saved_models["llama"]
    ours, _ = _loftq_model(path, r=4, lora_alpha=8, init_lora_weights="loftq")
    theirs, _ = _loftq_model(path, r=4, lora_alpha=8, init_lora_weights=True)
    replace_lora_weights_loftq(theirs, model_path=str(path))
    for (name, a), (_, b) in zip(_lora_layers(ours), _lora_layers(theirs)):
        product = a.scaling["default"] * a.lora_B["default"].weight @ a.lora_A["default"].weight
        expected = b.lora_B["default"].weight.float() @ b.lora_A["default"].weight.float()
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name)
