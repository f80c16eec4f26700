"""The offloaded checkpoint's recompute skips the MLP work whose output nothing reads
(models/backward_recompute.py): gradients stay those of no checkpointing, and the skip happens
where the architecture sums the MLP output straight into the residual (not Gemma 2)."""

import pytest
import torch

from loraforge.models import FastLanguageModel, lora_autograd
from loraforge.models.backward_recompute import outputs_feed_only_backward, recomputing_for_backward
from loraforge.train import layer_split, offloaded_checkpointing
from tests.models._same_gradients import assert_same_gradients


@pytest.fixture(autouse=True)
def _every_layer_checkpointed(monkeypatch):
    """These tests count what each layer's recompute does: no layer is kept out of the checkpoint
    (offloaded_checkpointing.KEEP_LAST_LAYERS, tested in test_fast_language_model.py)."""
    monkeypatch.setattr(offloaded_checkpointing, "KEEP_LAST_LAYERS", 0)


def _grads_and_activation_calls(path, mode, seed, monkeypatch):
    calls = []

    def counting(real):
        def counted(*args, **kwargs):
            calls.append(outputs_feed_only_backward())
            return real(*args, **kwargs)

        return counted

    # the activation, into a new tensor or (NF4 down projection, stacked_lora's concatenation) a wide buffer
    monkeypatch.setattr(lora_autograd.swiglu_ops, "gated_activation", counting(lora_autograd.swiglu_ops.gated_activation))
    monkeypatch.setattr(torch.ops.loraforge, "gated_activation_into", counting(torch.ops.loraforge.gated_activation_into))
    monkeypatch.setattr(layer_split, "_VERIFIED", {})  # the layer class's split rule is checked afresh
    monkeypatch.setattr(offloaded_checkpointing, "KEEP_LAST_LAYERS", 0)  # (the undo below drops the fixture's)
    model, tokenizer = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, init_lora_weights=False,
                                             use_gradient_checkpointing=mode)  # fmt: skip
    model.train()
    batch = tokenizer(["Snow is white and cold.", "Grass is green."], return_tensors="pt", padding=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    monkeypatch.undo()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, calls, model.config.num_hidden_layers


@pytest.mark.parametrize("arch, skips", [("llama", True), ("qwen3", True), ("gemma2", False)])
@pytest.mark.parametrize("chunked", (False, True))
def test_recompute_skips_unread_mlp_work_and_keeps_gradients(saved_models, arch, skips, chunked, seed, monkeypatch):
    if chunked:  # token chunks of 3 rows: the chunked MLP path
        monkeypatch.setattr(lora_autograd, "MLP_CHUNK_BYTES", 1)
        monkeypatch.setattr(lora_autograd, "mlp_chunk_rows", lambda n, i, dtype: 3 if n > 3 else 0)
    plain, plain_calls, layers = _grads_and_activation_calls(saved_models[arch], False, seed, monkeypatch)
    if chunked:
        monkeypatch.setattr(lora_autograd, "mlp_chunk_rows", lambda n, i, dtype: 3 if n > 3 else 0)
    ours, calls, _ = _grads_and_activation_calls(saved_models[arch], "unsloth", seed, monkeypatch)
    for name in plain:
        assert_same_gradients(ours[name], plain[name])
    # The forward runs the activation as often as without checkpointing, plus one MLP forward for the
    # check of the layer class's split rule at its first call (train/layer_split.py); the recompute adds
    # the same again only where its output is read (Gemma 2), and then it runs marked as a recompute.
    assert len(plain_calls) >= layers and not any(plain_calls)
    check = len(plain_calls) // layers
    if skips:
        assert calls == plain_calls + [False] * check
    else:
        assert len(calls) == 2 * len(plain_calls) + check and sum(calls) == len(plain_calls)


def test_flag_is_scoped_and_nests():
    assert not outputs_feed_only_backward()
    with recomputing_for_backward():
        assert outputs_feed_only_backward()
        with recomputing_for_backward():
            assert outputs_feed_only_backward()
        assert outputs_feed_only_backward()
    assert not outputs_feed_only_backward()
    with pytest.raises(KeyError), recomputing_for_backward():
        raise KeyError
    assert not outputs_feed_only_backward()


def test_mlp_function_output_unused_saves_the_same_and_returns_zeros(seed):
    """Called directly: the same gradients whether the output was computed or skipped."""
    from loraforge.models.lora_autograd import LoRAMLPFunction, LoRAProjection

    h, i = 16, 40
    gate, up, down = (torch.nn.Linear(a, b, bias=False) for a, b in ((h, i), (h, i), (i, h)))
    adapters = [torch.randn(4, a, requires_grad=True) for a in (h, h, i)]
    adapters_b = [torch.randn(b, 4, requires_grad=True) for b in (i, i, h)]
    projs = [LoRAProjection(m, a, b, 0.5) for m, a, b in zip((gate, up, down), adapters, adapters_b)]
    x = torch.randn(2, 5, h)
    dout = torch.randn(2, 5, h)
    grads = []
    for unused in (False, True):
        xi = x.clone().requires_grad_()
        params = [t for pair in zip(adapters, adapters_b) for t in pair]
        out = LoRAMLPFunction.apply(xi, *params, *projs, "silu", unused)
        assert out.shape == (2, 5, h)
        if unused:
            assert not out.any() and out.stride() == (0, 0, 0)
        out.backward(dout)
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for computed, skipped in zip(*grads):
        assert torch.equal(computed, skipped)


def test_a_layers_adapter_copies_are_dropped_after_its_backward(saved_models, seed):
    """bf16 compute with fp32 adapters: the forward caches compute-dtype copies of the adapters, the
    checkpoint's recompute and backward reuse them, and each layer's go once its backward is done (they
    stayed to the end of backward before, ~125 MB of an 8B model at the step's memory peak)."""
    from loraforge.models import stacked_lora

    model, tokenizer = FastLanguageModel.from_pretrained(saved_models["llama"], dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed % 1000, use_gradient_checkpointing="unsloth")
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    adapters = [p for _, p in named]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)

    def cached():
        return sum(cache.get(p) is not None for p in adapters
                   for cache in (lora_autograd.ADAPTER_CASTS, stacked_lora._STACKED_ADAPTERS))  # fmt: skip

    batch = tokenizer(["Snow is white and cold."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert cached() > 0  # the forward made (and kept) compute-dtype copies
    loss.backward()
    assert cached() == 0
    assert all(p.grad is not None for p in adapters)
    assert all(p.grad.abs().sum() > 0 for n, p in named if "lora_B" in n)  # (lora_A's is 0 while B is 0)


def test_identity_cache_pop():
    from loraforge.models.identity_cache import IdentityCache

    cache, a, b = IdentityCache(), torch.zeros(1), torch.zeros(1)
    cache[a], cache[b] = "a", "b"
    cache.pop(a)
    cache.pop(a)  # absent: nothing to do
    cache.pop(torch.zeros(1))  # never cached
    assert cache.get(a) is None and cache.get(b) == "b" and len(cache) == 1
