"""patch.lora_projection keeps its answer per module while the LoRA layer's state is unchanged; every
change that alters the answer (adapters disabled, another adapter active, merged, a base that trains,
dropout, scaling, a replaced adapter weight) must give a fresh, correct answer."""

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
