"""Checkpointing a decoder layer as two halves: the offloaded checkpoint's recompute in two phases.

A pre-norm decoder layer (Llama, Mistral, Qwen2/3, Gemma) computes

    h1  = x + attn(norm1(x))            the attention half
    out = h1 + mlp(norm2(h1))           the MLP half (Gemma 2: h1 + post_ff(mlp(pre_ff(h1))))

and depends on x only through h1. The offloaded checkpoint (offloaded_checkpointing.py) saves x and
reruns the whole layer before its backward, so during the MLP's backward, where the 8B step peaks,
the attention's saved activations are alive too: norm1(x), q, k, v and the attention output, 112 MiB
a layer of an 8B model at 2 x 2,048 tokens, though the attention's backward runs only later. Here the
layer's forward also hands h1 (captured at the MLP half's first norm, the split point) to the
offload, and backward runs in two phases:

    1. restore h1; rerun the MLP half from it (a rule per architecture, `MLP_HALVES`); backpropagate
       the layer's output gradient to dL/dh1 (the MLP path and the residual);
    2. restore x; rerun the layer's own forward until it reaches the split point (its input is h1,
       and the rerun stops there with an exception); backpropagate dL/dh1 to dL/dx.

The attention's activations are made only in phase 2, after the MLP's backward is done. In phase 2
nothing reads the values of h1 (only its graph is backpropagated), and where the attention's output
goes straight into the residual sum (all but Gemma 2, which normalises it first) the output
projection's matmul is skipped (models/backward_recompute.py): it was recomputed only to form h1,
which now comes back from host memory. Cost: h1's round trip over PCIe (as much again as x's, on the
side stream) and one more layer-sized copy on the GPU in each phase.

The MLP-half rule is checked once per layer class: at the first split forward, the rule's output
from the captured h1 must equal the layer's real output; if it does not (a transformers release that
changed the layer), that class keeps the whole-layer recompute, with a warning.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable

import torch


def _pre_norm_mlp_half(layer: torch.nn.Module, h1: torch.Tensor) -> torch.Tensor:
    return h1 + layer.mlp(layer.post_attention_layernorm(h1))


def _sandwich_mlp_half(layer: torch.nn.Module, h1: torch.Tensor) -> torch.Tensor:
    return h1 + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h1)))


# rule name -> (the module whose input is h1, the other modules the MLP half calls, the MLP half as a
# function of the layer and h1)
MLP_HALVES: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "pre_norm": ("post_attention_layernorm", ("mlp",), _pre_norm_mlp_half),
    "sandwich": ("pre_feedforward_layernorm", ("mlp", "post_feedforward_layernorm"), _sandwich_mlp_half),
}

# LORAFORGE_LAYER_SPLIT=0 keeps the whole-layer recompute (for comparisons), read when a layer runs.
ENABLED = os.environ.get("LORAFORGE_LAYER_SPLIT", "1") != "0"

_SPLIT_RULE = "_loraforge_layer_split"  # on a decoder layer instance: (rule name, attention output to residual)
_HOOK_HANDLE = "_loraforge_split_hook"  # on its split-point module


class _ReachedSplit(Exception):
    """Raised at the split point in phase 2: carries h1, the input of the MLP half."""

    def __init__(self, h1: torch.Tensor):
        super().__init__("split point reached")
        self.h1 = h1


_STATE = threading.local()  # .mode: None, "capture" or "stop"; .captured: the split point's input


def _split_point_hook(_module, args):
    mode = getattr(_STATE, "mode", None)
    if mode is None:
        return
    if mode == "stop":
        raise _ReachedSplit(args[0])
    _STATE.captured = args[0]


def install(layer: torch.nn.Module, rule: str, attention_output_to_residual: bool) -> bool:
    """Mark `layer` to be checkpointed in halves by `rule` (a key of MLP_HALVES); False when the layer
    lacks the modules the rule names."""
    entry_name, needed, _ = MLP_HALVES[rule]
    entry = layer._modules.get(entry_name)
    if entry is None or any(name not in layer._modules for name in needed):
        return False
    if _HOOK_HANDLE not in entry.__dict__:
        entry.__dict__[_HOOK_HANDLE] = entry.register_forward_pre_hook(_split_point_hook)
    layer.__dict__[_SPLIT_RULE] = (rule, attention_output_to_residual)
    return True


def uninstall(module: torch.nn.Module) -> None:
    module.__dict__.pop(_SPLIT_RULE, None)
    handle = module.__dict__.pop(_HOOK_HANDLE, None)
    if handle is not None:
        handle.remove()


_VERIFIED: dict[type, bool] = {}  # layer class -> whether its MLP-half rule reproduced its output


def rule_of(layer: torch.nn.Module | None) -> tuple[str, bool] | None:
    """(rule, attention output to residual) when `layer` is checkpointed in halves, else None."""
    if layer is None or not ENABLED:
        return None
    rule = layer.__dict__.get(_SPLIT_RULE)
    if rule is None or _VERIFIED.get(type(layer)) is False:
        return None
    return rule


@contextlib.contextmanager
def _mode(mode: str):
    previous = getattr(_STATE, "mode", None)
    _STATE.mode, _STATE.captured = mode, None
    try:
        yield
    finally:
        _STATE.mode = previous
        _STATE.captured = None


def forward_capturing_h1(run: Callable, args, layer: torch.nn.Module, rule: str):
    """(output, h1) of run(*args), the layer's forward; h1 None when the split cannot be used for this
    call (the split point was not reached, the output is not one tensor, or the rule failed its check)."""
    with _mode("capture"):
        output = run(*args)
        h1 = _STATE.captured
    if h1 is None or not isinstance(output, torch.Tensor) or not isinstance(h1, torch.Tensor):
        return output, None
    if type(layer) not in _VERIFIED:
        _VERIFIED[type(layer)] = _check_rule(layer, rule, h1, output)
        if not _VERIFIED[type(layer)]:
            return output, None
    return output, h1


def _check_rule(layer, rule: str, h1: torch.Tensor, output: torch.Tensor) -> bool:
    with torch.no_grad():
        expected = mlp_half(layer, rule, h1)
    scale = output.detach().abs().max().float().clamp_min(1e-30)
    same = expected.shape == output.shape and bool(((expected - output).abs().max().float() <= 1e-3 * scale).item())
    if not same:
        warnings.warn(f"{type(layer).__name__}'s forward does not match loraforge's {rule!r} rule for its MLP half; "
                      "its checkpoint recomputes the whole layer", stacklevel=4)  # fmt: skip
    return same


def mlp_half(layer: torch.nn.Module, rule: str, h1: torch.Tensor) -> torch.Tensor:
    """Phase 1's rerun: the layer's output from h1."""
    return MLP_HALVES[rule][2](layer, h1)


def attention_half(run: Callable, args) -> torch.Tensor:
    """Phase 2's rerun: the layer's own forward up to the split point; returns h1 (with its graph)."""
    with _mode("stop"):
        try:
            run(*args)
        except _ReachedSplit as reached:
            return reached.h1
    raise RuntimeError("a layer checkpointed in halves did not reach its split point when recomputed")
