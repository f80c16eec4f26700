"""copy_pacing: the side stream's load from its copies' timing events, and kept products given up kind by
kind while the copies set the forward's pace. Stand-in events on the CPU (a time and whether it is
complete); the GPU test is tests/models/test_fast_language_model.py's
test_cuda_copy_pacing_gives_up_kept_products_with_the_same_gradients."""

from __future__ import annotations

import random
import weakref

import pytest

from loraforge.train import copy_pacing


class _Event:
    def __init__(self, ms: float, complete: bool = True):
        self.ms, self.complete = ms, complete

    def query(self) -> bool:
        return self.complete

    def elapsed_time(self, end: _Event) -> float:
        return end.ms - self.ms


class _Layer:  # (weak-referenceable, hashable: what _KEPT_PRODUCTS holds)
    pass


def _copies(durations, gaps, start=0.0):
    """(start, end) ms of copies one after another on one stream, each after its gap."""
    out, t = [], start
    for duration, gap in zip(durations, gaps):
        t += gap
        out.append((t, t + duration))
        t += duration
    return out


def test_side_stream_load_is_copy_time_against_the_span():
    rng = random.Random()
    durations = [rng.uniform(0.5, 3.0) for _ in range(rng.randint(2, 40))]
    back_to_back = _copies(durations, [0.0] * len(durations), start=rng.uniform(0, 100))
    busy, span = copy_pacing.side_stream_load(back_to_back)
    assert busy == pytest.approx(sum(durations)) and span == pytest.approx(sum(durations))
    gaps = [rng.uniform(0.1, 2.0) for _ in durations]
    waited = _copies(durations, gaps)
    busy, span = copy_pacing.side_stream_load(waited)
    assert busy == pytest.approx(sum(durations)) and span == pytest.approx(sum(durations) + sum(gaps[1:]))


def _kept(layers, kinds_per_layer):
    kept = weakref.WeakKeyDictionary()
    for layer, kinds in zip(layers, kinds_per_layer):
        kept[layer] = frozenset(kinds)
    return kept


def test_one_kind_is_given_up_on_every_layer_least_saving_per_byte_first():
    layers = [_Layer() for _ in range(5)]
    kept = _kept(layers, [{"qkv", "attention", "gate_up"}, {"qkv", "attention"}, {"qkv"}, {"attention"}, {"qkv"}])
    assert copy_pacing.give_up_one_kind(kept) == "attention"
    assert dict(kept) == {layers[0]: {"qkv", "gate_up"}, layers[1]: {"qkv"}, layers[2]: {"qkv"}, layers[4]: {"qkv"}}
    assert copy_pacing.give_up_one_kind(kept) == "gate_up"
    assert dict(kept) == {layers[0]: {"qkv"}, layers[1]: {"qkv"}, layers[2]: {"qkv"}, layers[4]: {"qkv"}}
    assert copy_pacing.give_up_one_kind(kept) == "qkv" and len(kept) == 0
    assert copy_pacing.give_up_one_kind(kept) is None


def _forward(pacing, kept, durations, gaps, complete=True):
    """One forward as the offload hooks drive it: begin (read the last one, decide), copies (timed when the
    pacing measures this forward), end. Returns whether it was timed."""
    pacing.forward_begins(kept)
    timed = pacing.timing
    if timed:
        for start, end in _copies(durations, gaps, start=random.uniform(0, 1e4)):
            pacing.record(_Event(start), _Event(end, complete), 32 << 20, "cuda:0")
            pacing.record(_Event(-1e9), _Event(1e9), 1, "cuda:1")  # another GPU's side stream: left out
    pacing.forward_ends()
    return timed


def test_copy_bound_forwards_give_up_a_kind_each_until_the_copies_keep_up():
    layers = [_Layer() for _ in range(4)]
    kept = _kept(layers, [{"qkv", "attention"}] * 3 + [set()])
    pacing = copy_pacing.CopyPacing()
    bound, calm = ([2.0] * 8, [0.0] * 8), ([2.0] * 8, [1.0] * 8)  # busy/span 1.0, then 16/23
    assert not _forward(pacing, kept, *bound)  # the first forward is not measured
    assert _forward(pacing, kept, *bound) and pacing.given_up == [] and pacing.last is None
    assert _forward(pacing, kept, *bound)  # began by reading the one before: copy-bound
    assert pacing.given_up == ["attention"] and set().union(*kept.values()) == {"qkv"}
    assert pacing.last["ratio"] == pytest.approx(1.0) and pacing.last["busy_ms"] == pytest.approx(16.0)
    assert pacing.last["gb_per_s"] == pytest.approx(8 * (32 << 20) / 16.0 / 1e6)
    # It reads the copy-bound one and gives qkv up too: nothing is left, so it is not measured, nor any after.
    assert not _forward(pacing, kept, *calm)
    assert pacing.given_up == ["attention", "qkv"] and dict(kept) == {layers[3]: frozenset()}
    assert pacing.done and not _forward(pacing, kept, *bound) and pacing.measured == 2
    assert "given up: attention, qkv" in pacing.summary()


def test_copies_that_keep_up_leave_the_products_and_stop_the_measuring():
    layers = [_Layer() for _ in range(3)]
    kept = _kept(layers, [{"qkv"}] * 3)
    pacing = copy_pacing.CopyPacing()
    calm = ([2.0] * 6, [0.8] * 6)
    timed = [_forward(pacing, kept, *calm) for _ in range(6)]
    assert timed == [False, True, True, False, False, False]  # two calm readings (at forwards 3 and 4) end it
    assert pacing.given_up == [] and len(kept) == 3 and pacing.last["ratio"] < copy_pacing.COPY_BOUND_RATIO
    assert "given up: none" in pacing.summary()


def test_a_forward_whose_copies_are_not_yet_done_is_skipped_never_waited_for():
    layers = [_Layer() for _ in range(2)]
    kept = _kept(layers, [{"qkv"}] * 2)
    pacing = copy_pacing.CopyPacing()
    bound = ([2.0] * 4, [0.0] * 4)
    _forward(pacing, kept, *bound)
    _forward(pacing, kept, *bound, complete=False)
    _forward(pacing, kept, *bound)  # the last one's events incomplete: no reading, no decision
    assert pacing.measured == 0 and pacing.given_up == [] and len(kept) == 2
    _forward(pacing, kept, *bound)
    assert pacing.measured == 1 and pacing.given_up == ["qkv"]


def test_measuring_ends_after_max_measured_and_when_turned_off(monkeypatch):
    layers = [_Layer() for _ in range(2)]
    kept = _kept(layers, [{"qkv", "attention", "gate_up"}] * 2)
    monkeypatch.setattr(copy_pacing, "MAX_MEASURED", 4)
    pacing = copy_pacing.CopyPacing()
    # alternating readings (calm, bound, calm, bound): never two calm in a row, so only the cap ends it
    for i in range(30):
        _forward(pacing, kept, [2.0] * 4, [0.0 if i % 2 else 1.0] * 4)
        if pacing.done:
            break
    assert pacing.measured == 4 and pacing.given_up == ["attention", "gate_up"] and set(kept[layers[0]]) == {"qkv"}
    monkeypatch.setattr(copy_pacing, "ENABLED", False)
    off = copy_pacing.CopyPacing()
    assert not any(_forward(off, kept, [2.0] * 4, [0.0] * 4) for _ in range(5))
    assert "not measured (LORAFORGE_OFFLOAD_PACING=0)" in off.summary()


def test_after_the_first_measurements_one_forward_in_recheck_every_is_measured_again(monkeypatch):
    """Once settled with products kept, every RECHECK_EVERY-th forward is timed: a calm reading changes nothing,
    a copy-bound one (PCIe shared with a neighbour that got busy) gives one more kind up."""
    monkeypatch.setattr(copy_pacing, "RECHECK_EVERY", 5)
    layers = [_Layer() for _ in range(3)]
    kept = _kept(layers, [{"qkv", "attention"}] * 3)
    pacing = copy_pacing.CopyPacing()
    calm, bound = ([2.0] * 6, [0.8] * 6), ([2.0] * 6, [0.0] * 6)
    timed = [_forward(pacing, kept, *calm) for _ in range(4)]  # settled at forward 4 by two calm readings
    assert timed == [False, True, True, False] and pacing.settled_at == 4
    timed = [_forward(pacing, kept, *calm) for _ in range(11)]  # forwards 5..15
    assert [i for i, t in zip(range(5, 16), timed) if t] == [9, 14]  # 4 + 5, 4 + 10
    # forwards 9 and 14 (calm) were read at 10 and 15: nothing given up
    assert pacing.given_up == [] and pacing.measured == 4
    for i in range(16, 20):
        assert _forward(pacing, kept, *bound) == (i == 19)  # 4 + 15
    _forward(pacing, kept, *calm)  # forward 20 reads 19, copy-bound: attention goes
    assert pacing.given_up == ["attention"] and set().union(*kept.values()) == {"qkv"} and not pacing.exhausted


def test_reset_starts_a_fresh_measurement():
    copy_pacing.PACING.given_up.append("qkv")
    copy_pacing.reset()
    assert copy_pacing.PACING.given_up == [] and copy_pacing.PACING.forwards == 0
