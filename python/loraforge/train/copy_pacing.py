"""Whether the offloaded checkpoint's copies to host keep up with the forward, and the kept products
given up where they do not.

By default each checkpointed layer of the forward copies to pinned host memory its input and h1 (67 MB a
layer of an 8B model at 2 x 2,048 tokens) and, to spare backward their recompute, its Q/K/V product (50 MB)
and attention output (34 MB): ~150 MB a layer against ~3.4 ms of compute on an H100. On a host whose PCIe
and memory take them at 55 GB/s the copies hide behind the compute; on a host that takes them at half that
(H100 machines lent as the same kind differ; the 2026-12-08 rows in benchmarks/results/train_step.csv
show forwards of 134-218 ms against ~120 ms) the side stream that copies is busy the whole forward, the
compute stream waits for it at the limit of copies in flight, and the step is bound by PCIe: the products
then cost more than their recompute saves.

What the side stream did is measured, with no synchronisation: in a measured forward every copy to host
is bracketed by two timing events on the side stream (after it waited for the tensor's producer, and after
the copy), and at the next forward's start, once they are complete, the copies' summed time (busy) is
compared with the span from the first copy's start to the last's end. A side stream that waited for the
compute stream between copies (the copies kept up) has busy well under its span (~0.7 at 55 GB/s);
one that never waited (the copies set the pace) has busy ~= span. At COPY_BOUND_RATIO or above, one
kind of kept product is given up on every layer, the one that saves the least compute per byte first
(DROP_ORDER), and the next forward is measured again. After two forwards under the ratio in a row, or
six measured, one forward in RECHECK_EVERY is measured, by the same rule; with nothing left to give up,
measuring stops. Nothing is ever added back.

LORAFORGE_OFFLOAD_PACING=0 turns it off (the products stay as configured); `summary()` says what was
measured and given up (the benchmark's rows carry it).
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("LORAFORGE_OFFLOAD_PACING", "1") != "0"
COPY_BOUND_RATIO = 0.95
# Least compute saved per byte copied first: the attention output saves ~0.16 ms for 34 MB (4.7 us a MB), gate/up
# ~1.4 ms for 235 MB (6.0), Q/K/V ~0.35 ms for 50 MB (7.0) (8B layer at 2 x 2,048 tokens, H100).
DROP_ORDER = ("attention", "gate_up", "qkv")
SKIP_FORWARDS = 1  # the first forward pins new host blocks and warms the allocator: not representative
MAX_MEASURED = 6
CALM_FORWARDS = 2
# After the first measurements, one forward in this many is measured again: PCIe and host memory are shared with
# the host's other GPUs, whose traffic comes and goes (the defaults took 369-423 ms in three processes on one
# H100 host on 2026-12-08, while Unsloth's two runs there differed by 1.4%).
RECHECK_EVERY = 25


def side_stream_load(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy ms, span ms) of copies given as (start, end) ms, in issue order on one stream."""
    busy = sum(end - start for start, end in intervals)
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return busy, span


def give_up_one_kind(kept_products, order=DROP_ORDER) -> str | None:
    """Remove from every layer of `kept_products` (layer -> frozenset of kinds) the first kind of `order`
    that some layer keeps; layers left with none leave the mapping. Returns the kind, or None if none was kept."""
    kept = set().union(*kept_products.values()) if len(kept_products) else set()
    kind = next((k for k in order if k in kept), None)
    if kind is None:
        return None
    for layer, kinds in list(kept_products.items()):
        if kind in kinds:
            if len(kinds) == 1:
                del kept_products[layer]
            else:
                kept_products[layer] = kinds - {kind}
    return kind


class CopyPacing:
    """The measurement and the decisions (one per process: the offload hooks are)."""

    def __init__(self):
        self.forwards = 0  # forwards begun
        self.window: list[tuple] = []  # (start event, end event, bytes, device) of the forward being measured
        self.pending: list[tuple] | None = None  # the last measured forward's, read at the next forward
        self.measured = 0
        self.calm = 0
        self.settled_at: int | None = None  # the forward at which the first measurements ended
        self.exhausted = not ENABLED  # nothing (more) to give up, or turned off: no timing at all
        self.last: dict | None = None  # the last reading: busy and span ms, their ratio, GB/s
        self.given_up: list[str] = []

    @property
    def done(self) -> bool:
        """Whether the first measurements are over (later ones come every RECHECK_EVERY forwards)."""
        return self.exhausted or self.settled_at is not None

    @property
    def timing(self) -> bool:
        """Whether the forward now running is measured (its copies take timing events)."""
        if self.exhausted:
            return False
        if self.settled_at is None:
            return self.forwards > SKIP_FORWARDS
        since = self.forwards - self.settled_at
        return since > 0 and since % RECHECK_EVERY == 0

    def record(self, start: torch.cuda.Event, end: torch.cuda.Event, nbytes: int, device: torch.device) -> None:
        """One timed copy. Only the first device's copies are kept (one side stream: a model split over GPUs
        has one per GPU, and events of two devices have no elapsed time between them)."""
        if not self.window or self.window[0][3] == device:
            self.window.append((start, end, nbytes, device))

    def forward_ends(self) -> None:
        if self.window:
            self.pending, self.window = self.window, []

    def forward_begins(self, kept_products) -> None:
        """At a forward's first copy: read the last measured forward, if its events are complete, and decide."""
        self.forwards += 1
        self.window = []
        pending, self.pending = self.pending, None
        if self.exhausted:
            return
        if self.settled_at is None and self.forwards > SKIP_FORWARDS + 3 * MAX_MEASURED:
            self.settled_at = self.forwards  # readings kept being skipped (below): measure only now and then
        if not pending or not all(end.query() for _, end, _, _ in pending):
            return  # (copies not yet done: the host is far ahead; this reading is skipped, never waited for)
        origin = pending[0][0]
        intervals = [(origin.elapsed_time(start), origin.elapsed_time(end)) for start, end, _, _ in pending]
        busy, span = side_stream_load(intervals)
        ratio = busy / span if span > 0 else 0.0
        nbytes = sum(n for _, _, n, _ in pending)
        self.last = {"busy_ms": busy, "span_ms": span, "ratio": ratio, "gb_per_s": nbytes / busy / 1e6 if busy else 0.0}
        self.measured += 1
        self.decide(ratio, kept_products)

    def decide(self, ratio: float, kept_products) -> None:
        """Give one kind up on a copy-bound reading; end the first measurements after CALM_FORWARDS calm
        readings in a row or MAX_MEASURED readings; stop timing once nothing is left to give up."""
        bound = ratio >= COPY_BOUND_RATIO
        if bound:
            kind = give_up_one_kind(kept_products)
            if kind is not None:
                self.given_up.append(kind)
        if not any(kept_products.values()):
            self.exhausted = True
            return
        if self.settled_at is None:
            self.calm = 0 if bound else self.calm + 1
            if self.calm >= CALM_FORWARDS or self.measured >= MAX_MEASURED:
                self.settled_at = self.forwards

    def summary(self) -> str:
        """One line for a benchmark row: the last reading and what was given up."""
        if self.last is None:
            return "copies to host: not measured" + ("" if ENABLED else " (LORAFORGE_OFFLOAD_PACING=0)")
        r = self.last
        given = ", ".join(self.given_up) or "none"
        return (f"copies to host in the last measured forward: busy {r['busy_ms']:.1f} of {r['span_ms']:.1f} ms "
                f"({r['ratio']:.2f}), {r['gb_per_s']:.1f} GB/s; kept products given up: {given}")  # fmt: skip


PACING = CopyPacing()


def reset() -> None:
    """A fresh measurement (a model newly set up for offloaded checkpointing)."""
    global PACING
    PACING = CopyPacing()


def summary() -> str:
    return PACING.summary()
