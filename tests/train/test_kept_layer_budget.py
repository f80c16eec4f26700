"""Extra layers out of the checkpoint, paid for by the embedding table's freed GPU memory (kept_layer_budget).

On CPU the allocator's counter and the table's bytes are stand-ins; tests/models/test_host_embedding.py runs
the real ones on CUDA."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch

from loraforge.train import kept_layer_budget as budget
from loraforge.train import offloaded_checkpointing as oc
from tests.train.test_offloaded_checkpointing import Block


@pytest.fixture
def fresh(monkeypatch):
    """Empty registries, so that no other test's layers count."""
    for name in ("_EXTRA", "_MEASURED", "_BYTES_PER_TOKEN"):
        monkeypatch.setattr(budget, name, weakref.WeakKeyDictionary())


class Stack(torch.nn.Module):
    def __init__(self, layers: int, width: int = 8):
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(width) for _ in range(layers))


def test_register_marks_the_layers_before_the_fixed_ones(fresh):
    model = Stack(12)
    layers = list(model.layers)
    budget.register(model, layers, fixed=2)
    assert budget._MEASURED.get(layers[-1])() is model and len(budget._MEASURED) == 1
    assert {budget._EXTRA[layer][0]: i for i, layer in enumerate(layers) if layer in budget._EXTRA} == {
        k: 10 - k for k in range(1, budget.MAX_EXTRA_LAYERS + 1)}  # fmt: skip
    assert all(budget._EXTRA[layer][1]() is model for layer in layers[2:10])
    other = Stack(3)
    budget.register(other, list(other.layers), fixed=0)  # nothing kept: nothing measured, no extra either
    assert not any(layer in budget._EXTRA or layer in budget._MEASURED for layer in other.layers)
    short = Stack(2)
    budget.register(short, list(short.layers), fixed=3)  # more fixed than layers: no candidate
    assert not any(layer in budget._EXTRA for layer in short.layers)


class _Counter:
    """allocated_bytes stand-in: the first call of each pair reads 1,000 bytes, the second 1,000 + held."""

    def __init__(self, held: int):
        self.held, self.calls = held, 0

    def __call__(self, device):
        self.calls += 1
        return 1000 + (self.held if self.calls % 2 == 0 else 0)


def _step(model, x):
    """A forward through offloaded_checkpoint and a backward; (the layers run whole, the parameters' grads)."""
    whole = []
    run_kept = budget.run_kept

    def recording(layer, tokens, function, args, kwargs):
        whole.append(list(model.layers).index(layer))
        return run_kept(layer, tokens, function, args, kwargs)

    budget.run_kept = recording
    try:
        model.zero_grad(set_to_none=True)
        h = x
        for layer in model.layers:
            h = oc.offloaded_checkpoint(functools.partial(layer.__call__), h)
        (h**2).mean().backward()
    finally:
        budget.run_kept = run_kept
    return whole, [p.grad.clone() for p in model.parameters()]


def _plain_grads(model, x):
    model.zero_grad(set_to_none=True)
    h = x
    for layer in model.layers:
        h = layer(h)
    (h**2).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_extra_layers_run_whole_while_their_activations_fit_the_table(fresh, monkeypatch, seed):
    torch.manual_seed(seed)
    model = Stack(6)
    layers = list(model.layers)
    monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet(layers[-1:]))
    budget.register(model, layers, fixed=1)
    tokens, per_token = 2 * 7, 300
    held = tokens * per_token  # what the measured layer holds, beyond its output, plus its input
    monkeypatch.setattr(budget, "allocated_bytes", _Counter(held))
    table = {"bytes": 0}
    monkeypatch.setattr(budget, "table_bytes", lambda m: table["bytes"] if m is model else 0)

    x = torch.randn(2, 7, 8)
    # Before any measurement only the fixed layer runs whole, whatever the table frees.
    table["bytes"] = 10**9
    whole, grads = _step(model, x)
    assert whole == [5]
    assert budget.bytes_per_token(model) == per_token
    expected = _plain_grads(model, x)
    for table_bytes, kept in ((0, [5]), (2.5 * held, [3, 4, 5]), (held, [4, 5]), (10**9, [0, 1, 2, 3, 4, 5])):
        table["bytes"] = table_bytes
        whole, grads = _step(model, x)
        assert whole == kept, table_bytes
        assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(grads, expected, strict=True))
    # Twice the tokens: each layer holds twice as much, and the same table pays for half as many.
    table["bytes"] = 2.5 * held
    x2 = torch.randn(4, 7, 8)
    whole, grads = _step(model, x2)
    assert whole == [4, 5]
    assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(grads, _plain_grads(model, x2), strict=True))
    # Beyond KEEP_LAST_MAX_TOKENS not even the fixed layer runs whole.
    monkeypatch.setattr(oc, "KEEP_LAST_MAX_TOKENS", 13)
    assert _step(model, x)[0] == []


def test_a_call_of_no_known_layer_is_no_candidate(fresh):
    """offloaded_checkpoint also runs functions that are no decoder layer (_layer_of gives None)."""
    model = Stack(3)
    budget.register(model, list(model.layers), fixed=1)
    assert not budget.keeps_extra(None, 10)


def test_the_largest_measurement_is_kept(fresh, monkeypatch):
    model = Stack(3)
    layers = list(model.layers)
    monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet(layers[-1:]))
    budget.register(model, layers, fixed=1)
    x = torch.randn(1, 10, 8)
    for held, expected in ((4000, 400), (1000, 400), (6001, 601)):  # (rounded up: never under the bytes held)
        monkeypatch.setattr(budget, "allocated_bytes", _Counter(held))
        _step(model, x)
        assert budget.bytes_per_token(model) == expected


def test_nothing_is_measured_off_cuda_or_without_grad(fresh, monkeypatch):
    """On CPU there is no allocator counter, so no extra layer is ever kept; under no_grad nothing is saved."""
    model = Stack(3)
    layers = list(model.layers)
    monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet(layers[-1:]))
    budget.register(model, layers, fixed=1)
    _step(model, torch.randn(1, 10, 8))
    assert budget.bytes_per_token(model) is None
    assert budget.allocated_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(budget, "allocated_bytes", _Counter(5000))
    with torch.no_grad():
        budget.run_kept(layers[-1], 10, layers[-1], (torch.randn(1, 10, 8),), {})
    assert budget.bytes_per_token(model) is None


def test_a_table_on_the_gpu_frees_nothing():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.get_input_embeddings = lambda: model.embed
    assert budget.table_bytes(model) == 0
    assert budget.table_bytes(torch.nn.Linear(2, 2)) == 0  # no get_input_embeddings at all
