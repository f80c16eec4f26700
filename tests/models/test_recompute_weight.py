"""KEEP_RECOMPUTE_WEIGHT: the MLP backward that follows a checkpoint's recompute reuses the [W_g; W_u] the
recompute dequantized (two dequantizations fewer a layer), with the same gradients."""

import pytest
import torch

from loraforge.models import lora_autograd, stacked_lora
from loraforge.train import layer_split
from tests.models.test_layer_split import _train_step


@pytest.mark.parametrize("concat", [False, True], ids=["two-matmuls", "concat"])
@pytest.mark.parametrize("split", [True, False], ids=["halves", "whole-layer"])
def test_backward_reuses_the_recomputed_weight_with_the_same_gradients(saved_models, seed, monkeypatch, concat,
                                                                        split):  # fmt: skip
    monkeypatch.setattr(layer_split, "ENABLED", split)
    monkeypatch.setattr(stacked_lora, "CONCAT_MIN_RATIO", 3 if concat else float("inf"))
    dequantized = []
    into, dense = stacked_lora.dequantize_into, stacked_lora.dense_weight
    monkeypatch.setattr(stacked_lora, "dequantize_into", lambda layer, out: dequantized.append(1) or into(layer, out))
    monkeypatch.setattr(stacked_lora, "dense_weight", lambda layer, dtype: dequantized.append(1) or dense(layer, dtype))
    counts, grads = {}, {}
    for keep in (False, True):
        monkeypatch.setattr(lora_autograd, "KEEP_RECOMPUTE_WEIGHT", keep)
        monkeypatch.setattr(layer_split, "_VERIFIED", {})  # each run checks its rule once, alike
        dequantized.clear()
        grads[keep], model = _train_step(saved_models["llama"], "unsloth", seed)
        counts[keep] = len(dequantized)
    layers = model.config.num_hidden_layers
    # dequantizations of stacked groups' bases: without keeping, gate and up are dequantized again in each
    # layer's backward; kept, they are not.
    assert counts[False] - counts[True] == 2 * layers
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)
