"""use_gradient_checkpointing="unsloth" at the level of the checkpoint function: layer inputs large
enough to be offloaded go to pinned host memory and come back (prefetched one layer ahead) with the
same gradients as no checkpointing."""

from __future__ import annotations

import types

import pytest
import torch

from loraforge import _native
from loraforge.train import offloaded_checkpointing as oc


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _grads(blocks, x, checkpoint_fn):
    for block in blocks:
        block.zero_grad(set_to_none=True)
    h = x
    for block in blocks:
        h = checkpoint_fn(block, h) if checkpoint_fn else block(h)
    (h.float() ** 2).mean().backward()
    return [p.grad.clone() for block in blocks for p in block.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch_on_compute", (False, True))
def test_offloaded_layers_prefetch_and_match_plain_gradients(seed, monkeypatch, prefetch_on_compute):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(oc, "PREFETCH_ON_COMPUTE", prefetch_on_compute)
    torch.manual_seed(seed)
    width, tokens, layers = 96, 4099, 6  # 4099 x 96 fp32 = 1.5 MiB per layer input: offloaded
    blocks = [Block(width).cuda() for _ in range(layers)]
    x = torch.randn(tokens, width, device="cuda", requires_grad=True)
    expected = _grads(blocks, x, None)

    restored, prefetched = [], []
    original_restore, original_prefetch = oc._Offloaded.restore, oc._Offloaded.prefetch

    def restore(self, side):
        restored.append(self.fetched is not None)  # True: its copy was already started by a prefetch
        return original_restore(self, side)

    def prefetch(self, side):
        prefetched.append(1)
        return original_prefetch(self, side)

    oc._Offloaded.restore, oc._Offloaded.prefetch = restore, prefetch
    try:
        got = _grads(blocks, x, oc.offloaded_checkpoint)
    finally:
        oc._Offloaded.restore, oc._Offloaded.prefetch = original_restore, original_prefetch
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(restored) == layers  # every layer input went to the host and came back
    assert restored[0] is False and all(restored[1:])  # all but the last layer's input were prefetched
    assert len(prefetched) >= layers - 1


@pytest.mark.gpu
def test_offloaded_layer_inputs_leave_the_gpu(seed):
    """After the forward, the GPU holds the output and at most the inputs whose host copies are still in
    flight, not every layer's input (a bug kept them all until backward: 1 GiB at 8B, 2 x 2,048)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(seed)
    width, tokens, layers = 256, 4099, 12  # 4 MiB per fp32 layer input
    blocks = [Block(width).cuda() for _ in range(layers)]
    x = torch.randn(tokens, width, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    h = x
    for block in blocks:
        h = oc.offloaded_checkpoint(block, h)
        torch.cuda.synchronize()  # each copy to the host has finished before the next layer packs
    held = torch.cuda.memory_allocated() - before
    per_input = tokens * width * 4
    assert held <= 3 * per_input, f"{held / per_input:.1f} layer inputs' worth still on the GPU"
    (h.float() ** 2).mean().backward()
    assert x.grad is not None and all(p.grad is not None for b in blocks for p in b.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("host_wait", (False, True))
def test_cuda_a_dropped_tensor_is_not_overwritten_before_its_copy_to_host(monkeypatch, host_wait):
    """Past the in-flight limit a saved tensor's GPU reference is dropped while its copy to host may still
    run; the block the allocator hands out again must not be written before that copy has read it (by
    default the compute stream waits for the copy; HOST_WAIT: the host). 256 MB take ~5 ms over PCIe
    and the fill ~0.1 ms, so without a wait the host copy would hold the fill's values."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(oc, "HOST_WAIT", host_wait)
    hooks = oc._OffloadHooks()
    n = 64 << 20
    x = torch.full((n,), 1.0, device="cuda")
    torch.cuda.synchronize()
    address = x.data_ptr()
    item = hooks.pack(x)  # its copy to host starts on the side stream
    del x
    hooks._limit_in_flight(0)
    assert item.gpu is None  # the last reference dropped: the block is the allocator's again
    reused = torch.empty(n, device="cuda")
    assert reused.data_ptr() == address  # (else this test checks nothing)
    reused.fill_(2.0)
    torch.cuda.synchronize()
    assert bool((item.host == 1.0).all())


def test_current_stream_objects_follow_the_current_stream(monkeypatch):
    """_native.current_stream keeps one Stream object per (device, raw stream handle): the same object while
    that stream is current, another as soon as another stream is made current (torch.cuda.stream(...)),
    or for another device. The CUDA calls are stood in for, so this runs without a GPU."""
    current = {"handle": 11}
    monkeypatch.setattr(_native, "stream_handle", lambda device: current["handle"])
    monkeypatch.setattr(_native, "_STREAM_OBJECTS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: (index, current["handle"], object()))
    first = _native.current_stream(torch.device("cuda", 0))
    assert first[:2] == (0, 11) and _native.current_stream(torch.device("cuda", 0)) is first
    current["handle"] = 12  # another stream made current
    second = _native.current_stream(torch.device("cuda", 0))
    assert second[:2] == (0, 12)
    current["handle"] = 11
    assert _native.current_stream(torch.device("cuda", 0)) is first
    assert _native.current_stream(torch.device("cuda", 1))[:2] == (1, 11)  # the same handle on another device


class _FakeEvent:
    def __init__(self):
        self.waited = False

    def synchronize(self):
        self.waited = True


class _FakeStream:
    def wait_event(self, event):  # (the compute stream waits: default; the host: HOST_WAIT)
        event.waited = True


@pytest.fixture
def no_cuda_streams(monkeypatch):
    """The drains below queue their waits on a stand-in compute stream (there is no CUDA here)."""
    monkeypatch.setattr(oc, "current_stream", lambda device: _FakeStream())


def _fake_items(count: int) -> list:
    import types

    return [types.SimpleNamespace(gpu=torch.empty(1), done=_FakeEvent(), device=torch.device("cuda", 0))
            for _ in range(count)]  # fmt: skip


def test_drain_waits_for_every_copy_in_flight_but_the_newest(no_cuda_streams):
    hooks = oc._OffloadHooks()
    items = _fake_items(4)
    items[1].gpu = None  # already reaped: nothing to wait for
    hooks.in_flight = list(items)
    hooks.drain()
    assert hooks.in_flight == [items[-1]] and items[-1].gpu is not None and not items[-1].done.waited
    assert all(item.gpu is None for item in items[:-1])
    assert items[0].done.waited and items[2].done.waited and not items[1].done.waited


@pytest.mark.parametrize("drain", (True, False))
def test_a_layer_kept_out_of_the_checkpoint_drains_the_copies_first(monkeypatch, no_cuda_streams, drain):
    """The first layer that runs without a checkpoint (KEEP_LAST_LAYERS) waits for the copies in flight,
    so that their GPU tensors do not add to the memory of its activations and the loss; a checkpointed
    layer does not."""
    import functools
    import weakref

    hooks = oc._OffloadHooks()
    monkeypatch.setattr(oc, "_HOOKS", hooks)
    monkeypatch.setattr(oc, "DRAIN_BEFORE_KEPT", drain)
    kept, checkpointed = Block(8), Block(8)
    monkeypatch.setattr(oc, "_KEPT_LAYERS", weakref.WeakSet([kept]))
    x = torch.randn(3, 5, 8, requires_grad=True)
    items = _fake_items(3)
    hooks.in_flight = list(items)
    oc.offloaded_checkpoint(functools.partial(checkpointed.__call__), x)
    assert not any(item.done.waited for item in items) and len(hooks.in_flight) == 3
    out = oc.offloaded_checkpoint(functools.partial(kept.__call__), x)
    assert torch.equal(out, kept(x))
    assert [item.done.waited for item in items] == [drain, drain, False]
    assert len(hooks.in_flight) == (1 if drain else 3)


class _DoneEvent(_FakeEvent):
    def query(self):  # the copy is seen complete
        return True


@pytest.mark.parametrize("reap_done", (True, False))
def test_released_copies_do_not_depend_on_how_far_the_gpu_has_got(monkeypatch, no_cuda_streams, reap_done):
    """REAP_DONE (the default) releases the GPU tensor of every copy seen complete but the newest; off, none
    is released by what the GPU has done: the same MAX_IN_FLIGHT stay in every step, and backward's first
    restore releases all but the newest, with the compute stream waiting for their copies."""
    monkeypatch.setattr(oc, "REAP_DONE", reap_done)
    hooks = oc._OffloadHooks()
    items = _fake_items(3)
    for item in items:
        item.done = _DoneEvent()
    hooks.in_flight = list(items)
    hooks._reap()
    if reap_done:
        assert hooks.in_flight == [items[-1]] and items[0].gpu is None and items[1].gpu is None
    else:
        assert hooks.in_flight == items and all(item.gpu is not None for item in items)
        restored = torch.ones(2)
        packed = types.SimpleNamespace()
        monkeypatch.setattr(oc, "_Offloaded", types.SimpleNamespace)  # (unpack restores only its own items)
        packed.restore = lambda side: restored
        packed.device = torch.device("cuda", 0)
        hooks.streams[packed.device] = None
        assert hooks.unpack(packed) is restored
        assert hooks.in_flight == [items[-1]] and items[0].gpu is None and items[1].gpu is None
        assert items[0].done.waited and items[1].done.waited and not items[2].done.waited


@pytest.mark.gpu
def test_cuda_a_prefetch_dropped_unrestored_does_not_write_into_a_reused_block(monkeypatch):
    """PREFETCH_ON_COMPUTE: the prefetched tensor's block is the compute stream's; dropped before its
    restore, the block can be handed out again at once, and the copy still in flight must not land in
    the new tensor (the dropped item makes the compute stream wait for it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(oc, "PREFETCH_ON_COMPUTE", True)
    numel = 64 << 20  # 256 MB of fp32: ~5 ms over PCIe, far longer than queueing the fill below
    side = torch.cuda.Stream()
    source = torch.full((numel,), 1.0, device="cuda")
    item = oc._Offloaded(source, side, None)
    torch.cuda.synchronize()
    item.gpu = None
    del source
    item.prefetch(side)
    address = item.fetched.data_ptr()
    del item  # the prefetch is still copying
    reused = torch.empty(numel, device="cuda")
    assert reused.data_ptr() == address  # the same block (the test would prove nothing otherwise)
    reused.fill_(2.0)
    torch.cuda.synchronize()
    assert bool((reused == 2.0).all())


@pytest.mark.parametrize("depth", (1, 2, 5))
def test_a_restore_prefetches_depth_links_down_the_chain(monkeypatch, depth):
    """Each restore starts the copies back of the items it links to (prev and then), and with
    PREFETCH_DEPTH > 1 of those linked from prev, down the chain; an item's copy is started once."""
    import weakref

    monkeypatch.setattr(oc, "PREFETCH_DEPTH", depth)
    started = []
    monkeypatch.setattr(oc._Offloaded, "prefetch", lambda self, side: started.append(self))

    def item(prev):
        new = object.__new__(oc._Offloaded)
        new.prev, new.then, new.fetched, new.fetched_event = (weakref.ref(prev) if prev else None), (), None, None
        return new

    chain = [item(None)]
    for _ in range(5):
        chain.append(item(chain[-1]))  # chain[i].prev is chain[i - 1]: backward restores from the end
    side_product = item(None)
    chain[-2].then = (weakref.ref(side_product),)
    chain[-1]._prefetch_ahead(side=None)
    expected = [chain[-2]]  # level 1: what the restored item links to
    for level in range(2, min(depth, 5) + 1):  # then what its prev links to, and so on down the chain
        expected.append(chain[-1 - level])
        if level == 2:
            expected.append(side_product)  # (chain[-2]'s `then`, after its prev)
    assert started == expected
