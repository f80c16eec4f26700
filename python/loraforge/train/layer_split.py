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


def _pre_norm_mlp_branch(layer: torch.nn.Module, h1: torch.Tensor) -> torch.Tensor:
    return layer.mlp(layer.post_attention_layernorm(h1))


def _sandwich_mlp_branch(layer: torch.nn.Module, h1: torch.Tensor) -> torch.Tensor:
    return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h1)))


# rule name -> (the module whose input is h1, the other modules the MLP half calls, the MLP half's
# residual branch as a function of the layer and h1: the layer's output is h1 + branch)
MLP_HALVES: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "pre_norm": ("post_attention_layernorm", ("mlp",), _pre_norm_mlp_branch),
    "sandwich": ("pre_feedforward_layernorm", ("mlp", "post_feedforward_layernorm"), _sandwich_mlp_branch),
}

# rule name -> the module whose output ends the attention half's residual branch (h1 = x + branch), and
# how its output reads as the branch. The reruns stop there and never form a residual sum (see
# mlp_branch and attention_branch): a sum that only backward follows needs no values, yet forming it
# reads and writes a layer-sized tensor (~45 us of an H100 per sum at 8B, 2 x 2,048 tokens: 64 sums a
# step, profile of 2026-12-07).
ATTENTION_BRANCH_ENDS: dict[str, tuple[str, Callable]] = {
    "pre_norm": ("self_attn", lambda output: output[0] if isinstance(output, tuple) else output),
    "sandwich": ("post_attention_layernorm", lambda output: output),
}

# LORAFORGE_LAYER_SPLIT=0 keeps the whole-layer recompute (for comparisons), read when a layer runs.
ENABLED = os.environ.get("LORAFORGE_LAYER_SPLIT", "1") != "0"
# LORAFORGE_RESIDUAL_FREE_RERUN=0 forms the residual sums in the reruns again (for comparisons): phase 1
# backpropagates h1 + branch, phase 2 stops at h1.
RESIDUAL_FREE = os.environ.get("LORAFORGE_RESIDUAL_FREE_RERUN", "1") != "0"

_SPLIT_RULE = "_loraforge_layer_split"  # on a decoder layer instance: (rule name, attention output to residual)
_HOOK_HANDLE = "_loraforge_split_hook"  # on its split-point module
_BRANCH_HOOK_HANDLE = "_loraforge_branch_end_hook"  # on its attention branch's last module


class _ReachedSplit(Exception):
    """Raised at the split point in phase 2 (or at the attention branch's end): carries h1, the input
    of the MLP half (or the branch's output)."""

    def __init__(self, h1: torch.Tensor):
        super().__init__("split point reached")
        self.h1 = h1


# .mode: None, "capture", "stop" (at the split point) or "stop_branch" (at the attention branch's end);
# .captured: the split point's input; .branch: the branch's output, captured only when .want_branch
_STATE = threading.local()


def _split_point_hook(_module, args):
    mode = getattr(_STATE, "mode", None)
    if mode is None:
        return
    if mode == "stop":
        raise _ReachedSplit(args[0])
    if mode == "capture":
        _STATE.captured = args[0]


def _branch_end_hook(module, _args, output):
    mode = getattr(_STATE, "mode", None)
    if mode == "stop_branch":
        raise _ReachedSplit(module.__dict__[_BRANCH_HOOK_HANDLE][1](output))
    if mode == "capture" and getattr(_STATE, "want_branch", False):
        _STATE.branch = module.__dict__[_BRANCH_HOOK_HANDLE][1](output)


def install(layer: torch.nn.Module, rule: str, attention_output_to_residual: bool) -> bool:
    """Mark `layer` to be checkpointed in halves by `rule` (a key of MLP_HALVES); False when the layer
    lacks the modules the rule names."""
    entry_name, needed, _ = MLP_HALVES[rule]
    entry = layer._modules.get(entry_name)
    if entry is None or any(name not in layer._modules for name in needed):
        return False
    if _HOOK_HANDLE not in entry.__dict__:
        entry.__dict__[_HOOK_HANDLE] = entry.register_forward_pre_hook(_split_point_hook)
    end_name, read = ATTENTION_BRANCH_ENDS[rule]
    end = layer._modules.get(end_name)
    if end is not None and _BRANCH_HOOK_HANDLE not in end.__dict__:
        end.__dict__[_BRANCH_HOOK_HANDLE] = (end.register_forward_hook(_branch_end_hook), read)
    layer.__dict__[_SPLIT_RULE] = (rule, attention_output_to_residual)
    return True


def uninstall(module: torch.nn.Module) -> None:
    module.__dict__.pop(_SPLIT_RULE, None)
    handle = module.__dict__.pop(_HOOK_HANDLE, None)
    if handle is not None:
        handle.remove()
    branch_hook = module.__dict__.pop(_BRANCH_HOOK_HANDLE, None)
    if branch_hook is not None:
        branch_hook[0].remove()


_VERIFIED: dict[type, bool] = {}  # layer class -> whether its MLP-half rule reproduced its output
# layer class -> whether h1 = x + (its attention branch's output) held at its first split forward
_BRANCH_VERIFIED: dict[type, bool] = {}


def rule_of(layer: torch.nn.Module | None) -> tuple[str, bool] | None:
    """(rule, attention output to residual) when `layer` is checkpointed in halves, else None."""
    if layer is None or not ENABLED:
        return None
    rule = layer.__dict__.get(_SPLIT_RULE)
    if rule is None or _VERIFIED.get(type(layer)) is False:
        return None
    return rule


@contextlib.contextmanager
def _mode(mode: str, want_branch: bool = False):
    previous = getattr(_STATE, "mode", None), getattr(_STATE, "want_branch", False)
    _STATE.mode, _STATE.want_branch, _STATE.captured, _STATE.branch = mode, want_branch, None, None
    try:
        yield
    finally:
        _STATE.mode, _STATE.want_branch = previous
        _STATE.captured = _STATE.branch = None


def forward_capturing_h1(run: Callable, args, layer: torch.nn.Module, rule: str):
    """(output, h1) of run(*args), the layer's forward; h1 None when the split cannot be used for this
    call (the split point was not reached, the output is not one tensor, or the rule failed its check).
    A layer class's first call also checks that h1 is the layer's input plus its attention branch."""
    verify_branch = type(layer) not in _BRANCH_VERIFIED
    with _mode("capture", want_branch=verify_branch):
        output = run(*args)
        h1, branch = _STATE.captured, _STATE.branch
    if h1 is None or not isinstance(output, torch.Tensor) or not isinstance(h1, torch.Tensor):
        return output, None
    if type(layer) not in _VERIFIED:
        _VERIFIED[type(layer)] = _check_rule(layer, rule, h1, output)
        if not _VERIFIED[type(layer)]:
            return output, None
    if verify_branch:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        _BRANCH_VERIFIED[type(layer)] = x is not None and isinstance(branch, torch.Tensor) and _close(x + branch, h1)
    return output, h1


def _close(value: torch.Tensor, expected: torch.Tensor) -> bool:
    if value.shape != expected.shape:
        return False
    scale = expected.detach().abs().max().float().clamp_min(1e-30)
    return bool(((value.detach() - expected.detach()).abs().max().float() <= 1e-3 * scale).item())


def _check_rule(layer, rule: str, h1: torch.Tensor, output: torch.Tensor) -> bool:
    with torch.no_grad():
        same = _close(h1 + mlp_branch(layer, rule, h1), output)
    if not same:
        warnings.warn(f"{type(layer).__name__}'s forward does not match loraforge's {rule!r} rule for its MLP half; "
                      "its checkpoint recomputes the whole layer", stacklevel=4)  # fmt: skip
    return same


def mlp_branch(layer: torch.nn.Module, rule: str, h1: torch.Tensor) -> torch.Tensor:
    """Phase 1's rerun: the MLP half's residual branch from h1 (the layer's output is h1 + this; the
    caller adds the residual's gradient itself, so the sum is never formed)."""
    return MLP_HALVES[rule][2](layer, h1)


def branch_verified(layer: torch.nn.Module) -> bool:
    """Whether phase 2 may stop at the attention branch's end (attention_branch): h1 = x + branch held
    at the layer class's first split forward."""
    return RESIDUAL_FREE and _BRANCH_VERIFIED.get(type(layer), False)


def attention_branch(run: Callable, args) -> torch.Tensor:
    """Phase 2's rerun: the layer's own forward up to the end of its attention branch; returns the
    branch's output (with its graph; h1 = x + it, whose gradient with respect to x the caller adds)."""
    return _rerun_until(run, args, "stop_branch", "its attention branch's end")


def attention_half(run: Callable, args) -> torch.Tensor:
    """Phase 2's rerun: the layer's own forward up to the split point; returns h1 (with its graph)."""
    return _rerun_until(run, args, "stop", "its split point")


def _rerun_until(run: Callable, args, mode: str, where: str) -> torch.Tensor:
    """run(*args) in `mode` until the hook of that mode raises: returns the tensor it carries."""
    with _mode(mode):
        try:
            run(*args)
        except _ReachedSplit as reached:
            return reached.h1
    raise RuntimeError(f"a layer checkpointed in halves did not reach {where} when recomputed")
