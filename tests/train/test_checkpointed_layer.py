"""The lean checkpoint behind use_gradient_checkpointing="unsloth" (offloaded_checkpointing's
_CheckpointedLayer): the same gradients as no checkpointing, with dropout, autocast, several layers,
keyword tensors, and the cases where torch's checkpoint must run instead."""

from __future__ import annotations

import functools

import pytest
import torch

from loraforge.train import offloaded_checkpointing as oc

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(torch.nn.Module):
    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x, scale=None):
        h = self.drop(torch.nn.functional.silu(self.up(x)))
        out = x + self.down(h)
        return out * scale if scale is not None else out


def _run(blocks, x, checkpoint_fn, scale=None):
    for block in blocks:
        block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    h = x
    for block in blocks:
        call = functools.partial(block.__call__, scale=scale) if scale is not None else block
        h = checkpoint_fn(call, h) if checkpoint_fn else call(h)
    loss = (h.float() ** 2).mean()
    loss.backward()
    return loss.detach(), x.grad, [p.grad.clone() for block in blocks for p in block.parameters()]


def _count_lean_calls(monkeypatch) -> list:
    calls = []
    original = oc._CheckpointedLayer.apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(oc._CheckpointedLayer, "apply", apply)
    return calls


def _assert_same(got, expected):
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    for a, b in zip(got[2], expected[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_equal_no_checkpointing(seed, monkeypatch):
    torch.manual_seed(seed)
    blocks = [Block(24) for _ in range(4)]
    x = torch.randn(3, 7, 24)
    expected = _run(blocks, x, None)
    calls = _count_lean_calls(monkeypatch)
    _assert_same(_run(blocks, x, oc.offloaded_checkpoint), expected)
    assert len(calls) == 4  # every layer took the lean path


def test_dropout_is_replayed_in_the_recompute(seed, monkeypatch):
    torch.manual_seed(seed)
    blocks = [Block(16, dropout=0.5) for _ in range(3)]
    x = torch.randn(5, 16)
    torch.manual_seed(seed + 1)
    expected = _run(blocks, x, None)
    calls = _count_lean_calls(monkeypatch)
    torch.manual_seed(seed + 1)
    got = _run(blocks, x, lambda fn, h: oc.offloaded_checkpoint(functools.partial(fn.__call__), h))
    _assert_same(got, expected)
    assert len(calls) == 3
    assert oc._uses_dropout(blocks[0]) and not oc._uses_dropout(Block(4))


def test_cpu_autocast_is_restored_for_the_recompute(seed):
    torch.manual_seed(seed)
    blocks = [Block(32) for _ in range(2)]
    x = torch.randn(9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _run(blocks, x, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(blocks, x, oc.offloaded_checkpoint)
    _assert_same(got, expected)


def test_keyword_tensor_that_requires_grad_takes_torch_checkpoint(seed, monkeypatch):
    torch.manual_seed(seed)
    blocks = [Block(8) for _ in range(2)]
    x = torch.randn(4, 8)
    scale = torch.tensor(1.5, requires_grad=True)
    expected = _run(blocks, x, None, scale=scale)
    grad_scale = scale.grad.clone()
    scale.grad = None
    calls = _count_lean_calls(monkeypatch)
    got = _run(blocks, x, oc.offloaded_checkpoint, scale=scale)
    _assert_same(got, expected)
    torch.testing.assert_close(scale.grad, grad_scale)  # the keyword's gradient arrived: torch's checkpoint ran
    assert calls == []
    frozen = torch.tensor(1.5)
    _run(blocks, x, oc.offloaded_checkpoint, scale=frozen)  # a frozen keyword tensor is fine for the lean path
    assert len(calls) == 2


def test_no_grad_runs_the_layer_as_is(seed, monkeypatch):
    torch.manual_seed(seed)
    block = Block(8)
    calls = _count_lean_calls(monkeypatch)
    with torch.no_grad():
        out = oc.offloaded_checkpoint(block, torch.randn(2, 8))
    assert not out.requires_grad and calls == []


def test_autograd_grad_with_inputs_raises_a_clear_error(seed):
    torch.manual_seed(seed)
    block = Block(8)
    x = torch.randn(2, 8, requires_grad=True)
    out = oc.offloaded_checkpoint(block, x)
    with pytest.raises(RuntimeError, match="backward"):
        torch.autograd.grad(out.sum(), [x])


def test_a_layer_returning_something_else_is_refused():
    with pytest.raises(TypeError, match="tensor"):
        oc.offloaded_checkpoint(lambda x: {"hidden": x}, torch.randn(2, 2, requires_grad=True))


def test_completed_offload_copies_release_their_gpu_tensor():
    """_reap drops the GPU reference of every item whose host copy finished (not only of those that
    finished between two queries), and keeps those still in flight and the newest (backward's first)."""
    hooks = oc._OffloadHooks()
    items = [_Item(True), _Item(False), _Item(True), _Item(True)]
    hooks.in_flight = list(items)
    hooks._reap()
    assert [item.gpu is None for item in items] == [True, False, True, False]
    assert hooks.in_flight == [items[1], items[3]]


class _Done:
    def __init__(self, value):
        self.value, self.waited, self.host_waited = value, False, False

    def query(self):
        return self.value

    def synchronize(self):
        self.waited = self.host_waited = self.value = True


class _ComputeStream:
    """Stands in for the compute stream: records the events it was made to wait for."""

    def __init__(self, device):
        self.device = device

    def wait_event(self, event):
        event.waited = True


class _Item:
    def __init__(self, finished):
        self.gpu, self.done, self.device = object(), _Done(finished), torch.device("cuda", 0)


@pytest.mark.parametrize("host_wait", (False, True))
def test_copies_in_flight_are_limited_oldest_first(monkeypatch, host_wait):
    """Once more than MAX_IN_FLIGHT saved tensors are on their way, the oldest ones' GPU tensors are dropped
    after the compute stream (by default) or the host (HOST_WAIT) waits for their copies."""
    monkeypatch.setattr(oc, "MAX_IN_FLIGHT", 2)
    monkeypatch.setattr(oc, "HOST_WAIT", host_wait)
    streams = []
    monkeypatch.setattr(oc, "current_stream", lambda device: streams.append(device) or _ComputeStream(device))
    hooks = oc._OffloadHooks()
    items = [_Item(False) for _ in range(5)]
    hooks.in_flight = list(items)
    hooks._limit_in_flight()
    assert hooks.in_flight == items[3:]
    assert [item.done.waited for item in items] == [True, True, True, False, False]
    assert [item.gpu is None for item in items] == [True, True, True, False, False]
    # The host blocks only with HOST_WAIT; otherwise each wait is queued on the tensor's device's stream.
    assert [item.done.host_waited for item in items] == [host_wait] * 3 + [False] * 2
    assert streams == ([] if host_wait else [torch.device("cuda", 0)] * 3)


def test_an_input_changed_in_place_after_the_layer_is_caught(seed):
    torch.manual_seed(seed)
    block = Block(8)
    x = torch.randn(2, 8)
    out = oc.offloaded_checkpoint(block, x)
    x.add_(1.0)  # the recompute would now see another input
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_layer_of_reads_both_transformers_partials():
    """transformers up to 5.2x checkpoints partial(layer's super().__call__, **kw); 5.24 and later
    partial(Class.forward, layer, **kw). Both must name the layer (dropout detection, cache release)."""
    import functools

    layer = torch.nn.Linear(2, 2)
    assert oc._layer_of(functools.partial(layer.forward, extra=1)) is layer
    assert oc._layer_of(functools.partial(torch.nn.Linear.forward, layer, extra=1)) is layer
    assert oc._layer_of(functools.partial(torch.nn.functional.relu, torch.zeros(1))) is None
    assert oc._layer_of(lambda x: x) is None
