"""Patched-model details. patch.lora_projection keeps its answer per module while the LoRA layer's state
is unchanged; every change that alters the answer (adapters disabled, another adapter active, merged, a
base that trains, dropout, scaling, a replaced adapter weight) must give a fresh, correct answer. The
patched *ForCausalLM keeps its forward's signature, which generate reads."""

from __future__ import annotations

import pytest
import torch

from loraforge import FastLanguageModel
from loraforge.models.patch import _lora_projection, lora_projection
from loraforge.testing import save_tiny_model


@pytest.fixture(scope="module")
def lora_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder, "llama")
    model, _ = FastLanguageModel.from_pretrained(str(folder), load_in_4bit=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    layer = next(m for n, m in model.named_modules() if n.endswith("v_proj") and hasattr(m, "lora_A"))
    return model, layer


def _same_answer(layer):
    """lora_projection's (cached) answer describes what the uncached rule says now."""
    cached, fresh = lora_projection(layer), _lora_projection(layer)
    if fresh is None:
        return cached is None
    return (cached is not None and cached.base is fresh.base and cached.A is fresh.A and cached.B is fresh.B
            and cached.scaling == fresh.scaling)  # fmt: skip


def test_reused_while_nothing_changes(lora_layer):
    _, layer = lora_layer
    first = lora_projection(layer)
    assert first is not None and first.A is not None
    assert lora_projection(layer) is first


def test_every_state_change_is_seen(lora_layer):
    model, layer = lora_layer
    assert _same_answer(layer)
    with model.disable_adapter():
        assert lora_projection(layer).A is None and _same_answer(layer)
    assert lora_projection(layer).A is not None and _same_answer(layer)

    layer.scaling["default"] = 0.75
    assert lora_projection(layer).scaling == 0.75 and _same_answer(layer)

    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    assert lora_projection(layer) is None and _same_answer(layer)
    layer.lora_dropout["default"] = torch.nn.Identity()
    assert lora_projection(layer) is not None

    old = layer.lora_A["default"]
    layer.lora_A["default"] = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    assert lora_projection(layer).A is layer.lora_A["default"].weight and _same_answer(layer)

    base_bias = layer.get_base_layer().bias
    if base_bias is None:  # a trainable base weight takes PEFT's path
        weight = layer.get_base_layer().weight
        if weight.is_floating_point():
            weight.requires_grad_(True)
            assert lora_projection(layer) is None
            weight.requires_grad_(False)
    assert _same_answer(layer)

    layer.merged_adapters.append("default")
    assert lora_projection(layer) is None
    layer.merged_adapters.clear()
    assert _same_answer(layer)


def test_patched_causal_lm_keeps_the_forward_signature(lora_layer):
    """generate reads the forward's signature to decide what to pass (mask from pad tokens, position
    ids, logits_to_keep): the patched forward must show the original one."""
    import inspect

    model, _ = lora_layer
    causal_lm = model.get_base_model()
    assert "forward" in causal_lm.__dict__  # patched
    names = inspect.signature(causal_lm.forward).parameters
    assert {"input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep"} <= set(names)


def test_generate_without_a_mask_matches_the_unpatched_model(lora_layer):
    """Left-padded prompts and no attention_mask: generate infers the mask from the pad token, for
    the patched model as for the stock one."""
    model, _ = lora_layer
    causal_lm = model.get_base_model()
    pad = causal_lm.config.pad_token_id if causal_lm.config.pad_token_id is not None else 0
    ids = torch.randint(5, causal_lm.config.vocab_size, (2, 7))
    ids[0, :3] = pad
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad, eos_token_id=None)
    model.eval()
    with torch.no_grad():
        patched = model.generate(input_ids=ids, **settings)
        forward = causal_lm.__dict__.pop("forward")
        try:
            stock = model.generate(input_ids=ids, **settings)
        finally:
            causal_lm.forward = forward
    model.train()
    assert torch.equal(patched, stock)


def _same_plain_answer(layer):
    cached, fresh = lora_projection(layer), _lora_projection(layer)
    if fresh is None:
        return cached is None
    return cached is not None and cached.base is fresh.base and cached.A is None and cached.has_bias == fresh.has_bias


def test_a_projection_without_lora_is_cached_and_follows_its_layer():
    """A projection PEFT did not target (a plain Linear) is cached too: a base that starts training, a
    replaced weight or a new bias must each give a fresh answer."""
    layer = torch.nn.Linear(8, 4, bias=False).requires_grad_(False)
    first = lora_projection(layer)
    assert first is not None and first.A is None and not first.has_bias
    assert lora_projection(layer) is first

    layer.weight.requires_grad_(True)
    assert lora_projection(layer) is None and _same_plain_answer(layer)
    layer.weight.requires_grad_(False)
    assert lora_projection(layer) is not None

    layer.weight = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
    assert lora_projection(layer) is not first and _same_plain_answer(layer)

    layer.bias = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    assert lora_projection(layer).has_bias and _same_plain_answer(layer)
    layer.bias = None
    assert not lora_projection(layer).has_bias and _same_plain_answer(layer)


def test_a_weight_quantized_in_place_is_seen():
    """bitsandbytes quantizes a Params4bit in place (same object) when it first moves: an answer made
    before (PEFT's path: not yet NF4) must not outlive it."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    weight = layer.weight
    assert lora_projection(layer) is None
    layer.to("cpu")  # quantizes
    assert layer.weight is weight
    proj = lora_projection(layer)
    assert proj is not None and proj.nf4 and _same_plain_answer(layer)


def test_facts_of_the_base_follow_a_replaced_bias(lora_layer):
    """LoRAProjection reads has_bias once: a bias added to the base must give a new projection."""
    _, layer = lora_layer
    base = layer.get_base_layer()
    if base.bias is not None:
        pytest.skip("the tiny model's projection has a bias already")
    assert not lora_projection(layer).has_bias
    base.bias = torch.nn.Parameter(torch.zeros(base.out_features), requires_grad=False)
    try:
        assert lora_projection(layer).has_bias and _same_answer(layer)
    finally:
        base.bias = None
    assert not lora_projection(layer).has_bias and _same_answer(layer)
