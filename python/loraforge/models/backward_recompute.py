"""Whether the code running now is a checkpoint's recompute, whose outputs feed nothing but the
backward pass that follows it (train/offloaded_checkpointing.py sets it around the rerun of a layer).

In such a rerun a layer's last computation is wasted work when its value is never read: for the Llama
family the MLP's output only enters the residual sum (the layer's output), and autograd's backward of
a sum needs no values. The fused MLP then computes only what its backward saves (the gate and up
products), skipping the activation and the down projection: on the 8B model about a quarter of the
layer's recompute. The flag is thread-local: autograd runs a backward on its own thread per device.
"""

from __future__ import annotations

import contextlib
import threading

_STATE = threading.local()


def outputs_feed_only_backward() -> bool:
    """True inside `recomputing_for_backward()` on this thread."""
    return getattr(_STATE, "active", False)


def attention_output_feeds_only_backward() -> bool:
    """True inside `recomputing_for_backward(attention_output_unused=True)` on this thread: the rerun of
    a layer's attention half (train/layer_split.py), whose output only enters the residual sum h1, which
    nothing reads. The output projection may then skip its matmul."""
    return getattr(_STATE, "attention_unused", False)


@contextlib.contextmanager
def recomputing_for_backward(attention_output_unused: bool = False):
    """Marks a rerun whose outputs are used only to backpropagate through it (values never read)."""
    previous = outputs_feed_only_backward(), attention_output_feeds_only_backward()
    _STATE.active, _STATE.attention_unused = True, attention_output_unused
    try:
        yield
    finally:
        _STATE.active, _STATE.attention_unused = previous
