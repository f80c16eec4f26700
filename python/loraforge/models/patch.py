"""Install and remove loraforge's fused forwards on a (PEFT-wrapped) model, by rule table.

Patching sets a `forward` attribute on module *instances*; the classes are never touched, no
library source is rewritten, and `unpatch` deletes the attributes to restore the originals. A
module whose LoRA setup the fused path does not cover (dropout > 0, a bias on the adapter, DoRA,
several active adapters, merged weights, a trainable base weight, a base that is neither NF4 nor
16-bit such as bitsandbytes' 8-bit Linear8bitLt) keeps its PEFT forward for that call: correctness
first. Self-attention gets attention.py's forward (fused Q/K/V, our RoPE).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable

import torch

from loraforge.models import attention as _attention
from loraforge.models import stacked_lora
from loraforge.models.architectures import RULES, AttentionRules, activation_of
from loraforge.models.attention import submodule
from loraforge.models.backward_recompute import outputs_feed_only_backward
from loraforge.models.base_weight import has_dense_weight
from loraforge.models.identity_cache import IdentityCache
from loraforge.models.lora_autograd import LoRALinearFunction, LoRAMLPFunction, LoRAProjection
from loraforge.train import layer_split

_PATCHED = "_loraforge_patched"


def _is_marked(module: torch.nn.Module) -> bool:
    # Read the instance dict: PEFT wrappers forward unknown attributes to the model they wrap.
    return module.__dict__.get(_PATCHED, False)


def _trainable_base(base: torch.nn.Module) -> bool:
    """The fused functions give the base weight and bias no gradient: a trainable one needs the stock path."""
    return any(getattr(t, "requires_grad", False) for t in (getattr(base, "weight", None), getattr(base, "bias", None)))


def _base_key(base: torch.nn.Module) -> tuple:
    """What `_lora_projection` reads of a base layer: which weight and bias it holds, whether they train,
    and its NF4 statistics (bitsandbytes quantizes a Params4bit in place when it first moves to the GPU)."""
    parameters = base._parameters
    weight, bias = parameters.get("weight"), parameters.get("bias")
    # Read past bitsandbytes' Params4bit.__torch_function__, which made `requires_grad` cost ~3.5 us.
    with torch._C.DisableTorchFunctionSubclass():
        trains = (weight is not None and weight.requires_grad, bias is not None and bias.requires_grad)
    quant_states = id(_own(weight, "quant_state")), id(_own(base, "quant_state"))
    return id(base), id(weight), id(bias), trains, quant_states


def _own(obj, name: str):
    """obj's own attribute `name`, None when it has none or obj is None (an absent one costs ~2 us
    through nn.Module.__getattr__, e.g. the `p` of an Identity dropout)."""
    return None if obj is None else obj.__dict__.get(name)


_NO_PARAMETERS: dict = {}


def _parameters(module: torch.nn.Module | None) -> dict:
    return _NO_PARAMETERS if module is None else module._parameters


def _state_key(module: torch.nn.Module) -> tuple | None:
    """Everything `_lora_projection`'s answer depends on, read straight from instance dicts (no
    nn.Module.__getattr__): which adapters are active, merged or disabled, each active adapter's
    weights, scaling and dropout, and the base layer's weights and whether they train; for a layer
    without LoRA (a projection that PEFT did not target), its own weights. None for a module of
    another shape (those are examined on every call)."""
    state = module.__dict__
    children = state.get("_modules")
    if children is None:
        return None
    base = children.get("base_layer")
    if base is None:
        no_lora = "lora_A" not in children and "lora_A" not in state
        return _base_key(module) if no_lora and "weight" in module._parameters else None
    if "lora_A" not in children or "_active_adapter" not in state:
        return None
    active = state["_active_adapter"]
    active = tuple(active) if isinstance(active, (list, tuple)) else (active,)
    key = [_base_key(base), state.get("_disable_adapters"), len(state.get("merged_adapters") or ()), active]
    lora_a, lora_b = children["lora_A"]._modules, children["lora_B"]._modules
    dropouts = children["lora_dropout"]._modules
    scaling, use_dora = state.get("scaling") or {}, state.get("use_dora") or {}
    for name in active:
        a, b, dropout = lora_a.get(name), lora_b.get(name), dropouts.get(name)
        a_parameters, b_parameters = _parameters(a), _parameters(b)
        key += (id(a), id(b), id(dropout), id(a_parameters.get("weight")), id(b_parameters.get("weight")),
                id(b_parameters.get("bias")), _own(dropout, "p"), scaling.get(name), use_dora.get(name))  # fmt: skip
    return tuple(key)


# module -> (state key, projection). An IdentityCache rather than torch's WeakIdKeyDictionary, whose
# lookup builds a weak reference per call: that doubled this function's cost (8 -> 17 us) on a path
# taken ~450 times a step.
_PROJECTIONS = IdentityCache()


def lora_projection(module: torch.nn.Module) -> LoRAProjection | None:
    """The fused-path view of a projection, or None when it must take PEFT's own forward.

    Called for every projection in every forward and recompute (~450 times a step of an 8B model whose
    step is bound by the host), so the answer is kept per module and reused while `_state_key`, a
    cheaper read of what it depends on, is unchanged (PEFT's disable_adapter / set_adapter / merge,
    a new adapter weight, a base that starts training all change the key)."""
    key = _state_key(module)
    if key is None:
        return _lora_projection(module)
    cached = _PROJECTIONS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    projection = _lora_projection(module)
    _PROJECTIONS[module] = (key, projection)
    return projection


def _lora_projection(module: torch.nn.Module) -> LoRAProjection | None:
    if not hasattr(module, "lora_A"):  # a plain (possibly 4-bit) Linear: base only
        usable = has_dense_weight(module) and not _trainable_base(module)
        return LoRAProjection(module, None, None, 0.0) if usable else None
    if getattr(module, "merged", False):
        return None
    base = module.get_base_layer()
    if _trainable_base(base) or not has_dense_weight(base):  # e.g. an 8-bit Linear8bitLt base
        return None
    if getattr(module, "disable_adapters", False):
        return LoRAProjection(base, None, None, 0.0)
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return LoRAProjection(base, None, None, 0.0) if not active else None
    name = active[0]
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and not (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0):
        return None
    if getattr(module, "use_dora", {}).get(name, False) or getattr(module.lora_B[name], "bias", None) is not None:
        return None
    return LoRAProjection(base, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))


def _fused_linear_forward(self, x, *args, **kwargs):
    proj = lora_projection(self)
    if proj is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    return LoRALinearFunction.apply(x, proj.A, proj.B, proj)


def _make_mlp_forward(names: tuple[str, str, str], activation: str, output_to_residual: bool):
    gate_name, up_name, down_name = names

    def forward(self, x):
        gate, up = lora_projection(submodule(self, gate_name)), lora_projection(submodule(self, up_name))
        down = lora_projection(submodule(self, down_name))
        if gate is None or up is None or down is None:
            return type(self).forward(self, x)
        # In a checkpoint's recompute the output is only summed into the residual: not needed.
        output_unused = output_to_residual and outputs_feed_only_backward()
        return LoRAMLPFunction.apply(x, gate.A, gate.B, up.A, up.B, down.A, down.B, gate, up, down, activation,
                                     output_unused)  # fmt: skip

    return forward


def _make_norm_forward(gemma: bool):
    from loraforge.ops.rmsnorm import rms_norm

    def forward(self, x):
        eps = getattr(self, "variance_epsilon", None)
        eps = self.eps if eps is None else eps
        if not (self.training and stacked_lora.NORM_INTO_WIDE) or torch.compiler.is_compiling():
            return rms_norm(x, self.weight, eps, gemma)
        # Rows padded as the stacked projection reading this output last asked (stacked_lora.ROW_PADDING)
        state = self.__dict__
        y = rms_norm(x, self.weight, eps, gemma, state.get(stacked_lora.ROW_PADDING, 0))
        stacked_lora.offer_norm_output(y, state)
        return y

    return forward


_ATTENTION_FORWARDS: dict[tuple[type, AttentionRules], Callable] = {}


def _attention_forward(module: torch.nn.Module, rules: AttentionRules) -> Callable | None:
    """attention.py's forward for this module's class (built once per class), or None when the module
    does not look like the transformers attention the rule describes (it then keeps its own forward)."""
    key = (type(module), rules)
    if key not in _ATTENTION_FORWARDS:
        functions = _attention.module_functions(module)
        if functions is None or not _attention.rules_fit(module, rules):
            warnings.warn(f"{type(module).__name__} does not match loraforge's attention rule for this transformers "
                          "version; its attention keeps the stock forward", stacklevel=3)  # fmt: skip
            return None
        _ATTENTION_FORWARDS[key] = _attention.make_attention_forward(rules, *functions, lora_projection)
    return _ATTENTION_FORWARDS[key]


def _signed_like(original: Callable, forward: Callable) -> Callable:
    """`forward` under `original`'s name and signature: transformers' generate reads the model's forward
    signature (attention_mask, position ids, logits_to_keep) to decide what to pass, and a bare
    (*args, **kwargs) made it skip them (no mask from pad tokens, logits for every prompt position)."""

    @functools.wraps(original)
    def signed(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return signed


def _hub_kernels_off(model: torch.nn.Module) -> None:
    """Turn off transformers' hub kernels on every transformers model inside `model`.

    transformers 5.2x, which requires the `kernels` package, loads models with use_kernels=True: the layers
    it decorates (RMSNorm among them) are "kernelized", and every switch between train() and eval()
    kernelizes them again, which resets their `forward` and silently dropped the fused forward installed
    here (found 2026-12-07: after the first model.train(), every RMSNorm ran transformers' own). With
    use_kernels off, their forwards are their classes' own again, and train()/eval() leave them alone."""
    from transformers import PreTrainedModel

    for module in model.modules():
        state = module.__dict__  # 5.2x keeps the setting behind a property, earlier releases as an attribute
        if isinstance(module, PreTrainedModel) and True in (state.get("_use_kernels"), state.get("use_kernels")):
            module.use_kernels = False


def patch_model(model: torch.nn.Module) -> bool:
    """Install the fused forwards; returns False (with a warning) for an unknown architecture."""
    _hub_kernels_off(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    rules = RULES.get(model_type)
    if rules is None:
        warnings.warn(f"loraforge has no fast path for model_type={model_type!r}; training through plain PEFT. "
                      f"Fast paths exist for: {', '.join(RULES)}", stacklevel=2)  # fmt: skip
        return False
    activation = activation_of(config, rules.activation)
    count = 0
    for module in model.modules():
        if type(module).__name__ == rules.mlp_class and activation in ("silu", "gelu_tanh", "gelu"):
            module.forward = types.MethodType(
                _make_mlp_forward(rules.mlp_projections, activation, rules.mlp_output_to_residual), module
            )
            setattr(module, _PATCHED, True)
            count += 1
        if rules.norm_class and type(module).__name__ == rules.norm_class and not _is_marked(module):
            module.forward = types.MethodType(_make_norm_forward(rules.gemma_norm), module)
            setattr(module, _PATCHED, True)
        attention = rules.attention
        if attention and type(module).__name__ == attention.class_name and not _is_marked(module):
            forward = _attention_forward(module, attention)
            if forward is not None:
                module.forward = types.MethodType(forward, module)
                setattr(module, _PATCHED, True)
        for name in rules.attention_projections:
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Module) and not _is_marked(child):
                child.forward = types.MethodType(_fused_linear_forward, child)
                setattr(child, _PATCHED, True)
    for module in model.modules():
        mlp = module._modules.get("mlp")
        if mlp is not None and type(mlp).__name__ == rules.mlp_class and "self_attn" in module._modules:
            layer_split.install(module, rules.layer_split, rules.attention_output_to_residual)
    for module in model.modules():
        # The transformers *ForCausalLM itself (its backbone is `.model`), not PEFT's wrapper of it.
        is_causal_lm = type(module).__name__.endswith("ForCausalLM") and "model" in module._modules
        if is_causal_lm and "lm_head" in module._modules and not _is_marked(module):
            from loraforge.models.causal_lm_loss import fused_loss_forward

            module.forward = types.MethodType(_signed_like(type(module).forward, fused_loss_forward), module)
            setattr(module, _PATCHED, True)
    if count == 0:
        raise ValueError(f"model_type={model_type!r} but no {rules.mlp_class} module was found: nothing to patch")
    return True


def unpatch_model(model: torch.nn.Module) -> None:
    """Remove every fused forward that patch_model installed."""
    for module in model.modules():
        layer_split.uninstall(module)
        if _is_marked(module):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(stacked_lora.ROW_PADDING, None)
            del module.__dict__[_PATCHED]


def is_patched(model: torch.nn.Module) -> bool:
    return any(_is_marked(m) for m in model.modules())
