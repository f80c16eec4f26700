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

import torch

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


# Stacked products kept from the forward (train/offloaded_checkpointing.py, LORAFORGE_OFFLOAD_GATE_UP_EVERY
# and LORAFORGE_OFFLOAD_QKV_EVERY): the checkpointed forward of a chosen layer hands the stacked product of
# its fused MLP's gate and up ("gate_up": [G | U]) and of its Q/K/V ("qkv", before any norm or RoPE),
# each with H = X A^T, to a dict; the layer's rerun takes them back instead of recomputing those matmuls.
# Kind "attention" (LORAFORGE_OFFLOAD_ATTENTION_EVERY) keeps the attention's output and log-sum-exp
# instead (models/kept_attention.py).
# Thread-local, like the flags above.


@contextlib.contextmanager
def keeping_products(sink: dict, kinds):
    """The fused functions run inside put (product, H) of their first call of each kind in `kinds` into
    `sink`, keyed by kind."""
    previous = getattr(_STATE, "keep", None)
    _STATE.keep = (sink, frozenset(kinds))
    try:
        yield sink
    finally:
        _STATE.keep = previous


def product_sink(kind: str) -> dict | None:
    """The dict a fused forward should put its `kind` product into (None: not kept, or kept already)."""
    keep = getattr(_STATE, "keep", None)
    if keep is None or kind not in keep[1] or kind in keep[0]:
        return None
    return keep[0]


def keeps_products(kind: str) -> bool:
    """Whether the forward running now keeps its `kind` product (which must then not be changed in place)."""
    keep = getattr(_STATE, "keep", None)
    return keep is not None and kind in keep[1]


@contextlib.contextmanager
def reusing_products(kept: dict):
    """The reruns inside take kept[kind] = (product, H) (each once) instead of recomputing them."""
    previous = getattr(_STATE, "reuse", None)
    _STATE.reuse = dict(kept)
    try:
        yield
    finally:
        _STATE.reuse = previous


def take_kept(kind: str):
    """What was kept of `kind` for this rerun ((product, H), or for "attention" (O, its state)), else
    None; once."""
    reuse = getattr(_STATE, "reuse", None)
    return reuse.pop(kind, None) if reuse else None


def take_product(kind: str, rows: int, columns: int, dtype: torch.dtype):
    """(product, H) kept for this rerun when the product's shape and dtype are the rerun's, else None; once."""
    kept = take_kept(kind)
    if kept is None or kept[0].shape != (rows, columns) or kept[0].dtype != dtype:
        return None
    return kept
