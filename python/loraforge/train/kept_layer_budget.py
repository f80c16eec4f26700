"""More decoder layers out of the checkpoint when the input embedding table lives in host memory.

Why: a layer that runs without a checkpoint saves its recompute and its inputs' round trip over PCIe, but
holds its saved activations from its forward to its backward, across the loss, where the step's memory
peaks. The last KEEP_LAST_LAYERS layers (offloaded_checkpointing) always run so. With the table in host
memory (`offload_embedding=True`; 0.98 GiB for Llama-3 8B) the GPU has room for more: on the 8B step (H100,
2026-12-07, 5b14231) the table offloaded with 3 kept layers ran 330.1 ms at 6.80 GiB, against the
defaults' 344.5 ms at 6.85 GiB. But a kept layer's activations grow with the batch's tokens (~0.43 GiB a
layer at 2 x 2,048 tokens of the 8B model), while the table frees a fixed amount: a fixed count of extra
layers would raise the peak on longer batches.

So the extra layers are chosen per call: the k-th extra layer (counted back from the fixed ones) runs whole
when k layers' activations at this call's tokens fit in the table's bytes. What a layer keeps per token is
measured, not estimated: around the forward of the last layer (always kept), the allocator's count of
allocated bytes before and after, less the output, plus the input (held on the GPU rather than offloaded).
That is exact for any architecture and code path, costs two counter reads a step, and needs no
synchronisation. Until the first measurement (the first step) no extra layer runs whole; the largest value
seen is kept, so that a step that happened to free something cannot lower it.
"""

from __future__ import annotations

import weakref

import torch

# How many layers before the fixed ones may be kept: more would not fit the 8B table at even 2k tokens.
MAX_EXTRA_LAYERS = 8

_EXTRA = weakref.WeakKeyDictionary()  # layer -> (k >= 1, weakref to its model)
_MEASURED = weakref.WeakKeyDictionary()  # the layer whose kept forward is measured -> weakref to its model
_BYTES_PER_TOKEN = weakref.WeakKeyDictionary()  # model -> the most bytes one kept layer held per token


def register(model: torch.nn.Module, layers, fixed: int) -> None:
    """Mark the candidates for extra kept layers of `model`: the MAX_EXTRA_LAYERS decoder layers before its
    last `fixed` ones (which run whole always), and the last layer, whose kept forward is measured."""
    if fixed <= 0 or not layers:  # no layer is kept, so none is measured: no extra one either
        return
    model_ref = weakref.ref(model)
    _MEASURED[layers[-1]] = model_ref
    candidates = layers[max(0, len(layers) - fixed - MAX_EXTRA_LAYERS) : max(0, len(layers) - fixed)]
    for k, layer in enumerate(reversed(candidates), start=1):
        _EXTRA[layer] = (k, model_ref)


def table_bytes(model: torch.nn.Module) -> int:
    """The GPU bytes `model` does not spend on its input embedding table (0 where the table is on the GPU)."""
    from loraforge.models.host_embedding import offloaded_table_bytes  # (models imports this package)

    return offloaded_table_bytes(model)


def keeps_extra(layer, tokens: int) -> bool:
    """Whether `layer`, an extra candidate, runs whole for a call of `tokens` tokens."""
    entry = _EXTRA.get(layer) if layer is not None else None  # (None: a checkpointed call of no known layer)
    if entry is None:
        return False
    k, model_ref = entry
    model = model_ref()
    per_token = _BYTES_PER_TOKEN.get(model) if model is not None else None
    if not per_token:
        return False
    return k * per_token * tokens <= table_bytes(model)


def allocated_bytes(device: torch.device) -> int | None:
    """The device allocator's count of allocated bytes (a host-side counter: no synchronisation); None off
    CUDA, where nothing is measured."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def run_kept(layer, tokens: int, function, args, kwargs):
    """function(*args, **kwargs): a kept layer's forward, measured where it is the measured layer."""
    model_ref = _MEASURED.get(layer)
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if model_ref is None or hidden is None or not torch.is_grad_enabled():
        return function(*args, **kwargs)
    before = allocated_bytes(hidden.device)
    output = function(*args, **kwargs)
    if before is None:
        return output
    out = output[0] if isinstance(output, (tuple, list)) else output
    out_bytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
    held = allocated_bytes(hidden.device) - before - out_bytes + hidden.numel() * hidden.element_size()
    model = model_ref()
    if model is not None and held > 0 and tokens > 0:
        _BYTES_PER_TOKEN[model] = max(_BYTES_PER_TOKEN.get(model, 0), -(-held // tokens))
    return output


def bytes_per_token(model: torch.nn.Module) -> int | None:
    """What one kept layer of `model` held per token, as measured so far (None before the first step)."""
    return _BYTES_PER_TOKEN.get(model)
