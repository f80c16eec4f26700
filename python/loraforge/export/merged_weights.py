"""The weights of a (PEFT LoRA) model with its adapters merged in, one tensor at a time, in fp32.

Every export reads the model through `merged_tensors(model)`: a list of `MergedTensor`, each with
the name the tensor has in the plain transformers model (what `merge_and_unload()` followed by
`state_dict()` would show) and a `load()` that computes it only when asked. A LoRA projection's
weight is

    W = dequantize(W_base) + sum over active adapters of scaling * B @ A      (all in float32)

where W_base is a bitsandbytes NF4 Linear4bit (dequantized bit-exactly by loraforge.nf4) or a
plain nn.Linear. Nothing else is materialised: exporting a 70B model needs one fp32 matrix at a
time, never the whole model in fp32.

Tied weights (an lm_head that is the embedding matrix) appear once, under the first name met, as
transformers' own save_pretrained stores them.

`base_checkpoint`: for a 4-bit model, the folder of the 16-bit checkpoint it was quantized from.
Then W_base of every NF4 weight is read from there (safetensors, one tensor at a time) instead of
dequantized: the export keeps the original weights plus the trained deltas, and loses nothing to NF4
rounding. (The adapters were trained against the NF4-rounded base; merging into the original
weights is the usual choice for 16-bit serving, and the one Unsloth makes.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraforge.models.base_weight import dense_weight, is_linear4bit

__all__ = ["CheckpointWeights", "MergedTensor", "has_lora", "merged_tensors", "refuse_sharded", "transformer_of"]


class CheckpointWeights:
    """Tensors of a local safetensors checkpoint by state-dict name, read one at a time."""

    def __init__(self, folder):
        from pathlib import Path

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"base_checkpoint must be a local folder holding *.safetensors, got {str(folder)!r} "
                             "(download a hub model first, e.g. huggingface_hub.snapshot_download)")  # fmt: skip
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"base_checkpoint {str(folder)!r} holds no *.safetensors files")
        from safetensors import safe_open

        self.file_of: dict[str, object] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    self.file_of[name] = file

    def load(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        file = self.file_of.get(name)
        if file is None:
            raise KeyError(f"{name} is not in base_checkpoint {str(self.folder)!r}: is it the checkpoint this model "
                           "was loaded from?")  # fmt: skip
        with safe_open(str(file), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name} in base_checkpoint has shape {list(tensor.shape)}, the model's is {list(shape)}")
        return tensor.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class MergedTensor:
    name: str  # the plain transformers state-dict name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the model keeps it in (compute dtype for NF4 weights)
    is_linear_weight: bool  # the weight matrix of a Linear projection (what bitsandbytes would quantize)
    module_name: str
    _load: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        """The tensor in float32, contiguous, on the model's device."""
        return self._load()

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def transformer_of(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def has_lora(model: torch.nn.Module) -> bool:
    return any(_is_lora_layer(m) for m in model.modules())


def _is_lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # PEFT missing: no adapters can exist
        return False
    return isinstance(module, LoraLayer)


def _is_modules_to_save(module) -> bool:
    try:
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return False
    return isinstance(module, ModulesToSaveWrapper)


def _active_adapters(layer) -> list[str]:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        # Disabled: the base alone is the model. Merged: the base weight already holds the deltas.
        return []
    names = layer.active_adapters
    return [names] if isinstance(names, str) else list(names)


def _check_plain_lora(layer, adapter: str, module_name: str) -> None:
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise NotImplementedError(
            f"{module_name} uses DoRA (adapter {adapter!r}); loraforge merges plain LoRA only. Merge with PEFT's "
            "model.merge_and_unload() first, then export the merged model."
        )
    if adapter in getattr(layer, "lora_variant", {}):
        raise NotImplementedError(f"{module_name}: adapter {adapter!r} is a LoRA variant loraforge cannot merge")


def _linear_delta(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scaling * B @ A (and the LoRA bias, scaled as the forward applies it), in float32."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    scaling = float(layer.scaling[adapter])
    delta = (lora_b.weight.float() @ lora_a.weight.float()).mul_(scaling)
    if getattr(layer, "fan_in_fan_out", False):  # GPT-2 style Conv1D stores W transposed
        delta = delta.t()
    bias = lora_b.bias.float() * scaling if getattr(lora_b, "bias", None) is not None else None
    return delta, bias


def _embedding_delta(layer, adapter: str) -> torch.Tensor:
    # PEFT's Embedding LoRA: A [r, num_embeddings], B [embedding_dim, r]; delta = (B @ A)^T * scaling.
    a = layer.lora_embedding_A[adapter].float()
    b = layer.lora_embedding_B[adapter].float()
    return (b @ a).t().mul_(float(layer.scaling[adapter]))


def _nf4_base(base, name: str, source: CheckpointWeights | None) -> torch.Tensor:
    """W of an NF4 layer in fp32: from the 16-bit checkpoint when given, else dequantized."""
    if source is not None:
        return source.load(name, _weight_shape(base), base.weight.device)
    return dense_weight(base, torch.float32)  # dequantized into a fresh tensor


def _lora_tensors(layer, prefix: str, module_name: str, source: CheckpointWeights | None = None):
    base = layer.get_base_layer()
    adapters = _active_adapters(layer)
    linear_adapters = [a for a in adapters if a in layer.lora_A]
    embedding_adapters = [a for a in adapters if a in getattr(layer, "lora_embedding_A", {})]
    for adapter in linear_adapters + embedding_adapters:
        _check_plain_lora(layer, adapter, module_name)
    if not isinstance(base, (torch.nn.Linear, torch.nn.Embedding)) and not is_linear4bit(base):
        raise NotImplementedError(f"{module_name}: LoRA on a {type(base).__name__} cannot be merged by loraforge")

    def load_weight() -> torch.Tensor:
        if is_linear4bit(base):
            weight = _nf4_base(base, prefix + "weight", source)
        else:
            weight = base.weight.detach().float().clone()  # .float() of an fp32 weight is the weight itself
        for adapter in linear_adapters:
            weight += _linear_delta(layer, adapter)[0].to(weight.device)
        for adapter in embedding_adapters:
            weight += _embedding_delta(layer, adapter).to(weight.device)
        return weight.contiguous()

    is_linear = isinstance(base, torch.nn.Linear) or is_linear4bit(base)
    yield MergedTensor(prefix + "weight", _weight_shape(base), _stored_dtype(base), is_linear, module_name, load_weight)

    lora_biases = [a for a in linear_adapters if getattr(layer.lora_B[a], "bias", None) is not None]
    if getattr(base, "bias", None) is not None:

        def load_bias() -> torch.Tensor:
            bias = base.bias.detach().float().clone()
            for adapter in lora_biases:
                bias += _linear_delta(layer, adapter)[1].to(bias.device)
            return bias

        yield MergedTensor(prefix + "bias", tuple(base.bias.shape), base.bias.dtype, False, module_name, load_bias)
    elif lora_biases:
        raise ValueError(f"{module_name}: the adapter has a bias (lora_bias=True) but the base layer has none")


def _weight_shape(layer) -> tuple[int, ...]:
    if is_linear4bit(layer):
        return tuple(layer.weight.quant_state.shape)
    return tuple(layer.weight.shape)


def _stored_dtype(layer) -> torch.dtype:
    if is_linear4bit(layer):
        return layer.weight.quant_state.dtype
    return layer.weight.dtype


def _linear4bit_tensors(layer, prefix: str, module_name: str, source: CheckpointWeights | None = None):
    yield MergedTensor(prefix + "weight", _weight_shape(layer), _stored_dtype(layer), True, module_name,
                       lambda: _nf4_base(layer, prefix + "weight", source).contiguous())  # fmt: skip
    if layer.bias is not None:
        yield MergedTensor(prefix + "bias", tuple(layer.bias.shape), layer.bias.dtype, False, module_name,
                           lambda: layer.bias.detach().float().contiguous())  # fmt: skip


def _plain_tensors(module, prefix: str, module_name: str):
    is_linear = isinstance(module, torch.nn.Linear)
    for name, param in module.named_parameters(recurse=False):
        if param is None:
            continue
        yield MergedTensor(prefix + name, tuple(param.shape), param.dtype, is_linear and name == "weight", module_name,
                           lambda p=param: p.detach().float().contiguous())  # fmt: skip
    persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
    for name in persistent:
        buffer = module._buffers[name]
        if buffer is not None and buffer.is_floating_point():
            yield MergedTensor(prefix + name, tuple(buffer.shape), buffer.dtype, False, module_name,
                               lambda b=buffer: b.detach().float().contiguous())  # fmt: skip


def _walk(module, module_name: str, source: CheckpointWeights | None = None):
    prefix = module_name + "." if module_name else ""
    if _is_lora_layer(module):
        yield from _lora_tensors(module, prefix, module_name, source)
        return
    if _is_modules_to_save(module):
        # PEFT's fully trained copy of a module (modules_to_save): the active copy is the model.
        adapter = module.active_adapter
        adapter = adapter[0] if isinstance(adapter, (list, tuple)) else adapter
        # (nn.ModuleDict has no .get)
        copy = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module  # noqa: SIM401
        yield from _walk(copy, module_name, source)
        return
    if callable(getattr(module, "get_base_layer", None)):
        raise NotImplementedError(
            f"{module_name} is a {type(module).__name__} PEFT wrapper loraforge cannot merge; "
            "merge with PEFT's model.merge_and_unload() first"
        )
    if is_linear4bit(module):
        yield from _linear4bit_tensors(module, prefix, module_name, source)
        return
    yield from _plain_tensors(module, prefix, module_name)
    for child_name, child in module.named_children():
        yield from _walk(child, prefix + child_name, source)


def refuse_sharded(model: torch.nn.Module, what: str) -> None:
    """A model sharded by FSDP2 holds 1/W of each weight per rank (DTensor parameters): an export
    from it would write one rank's pieces. Refuse, and say what works instead."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"{what}: the model is sharded by FSDP2 (its parameters are DTensors), so each rank holds only "
            "pieces of every weight. Gather the adapters with loraforge.distributed.gather_trainable_state_dict("
            "model) on every rank and write them once with save_on_main; then load the base model and that "
            "adapter in one process and export from there")  # fmt: skip


def merged_tensors(model: torch.nn.Module, base_checkpoint=None) -> list[MergedTensor]:
    """Every tensor of the merged model, lazily, in module order, tied tensors once. With
    `base_checkpoint` (a local 16-bit checkpoint folder) NF4 bases are read from it (module docstring)."""
    transformer = transformer_of(model)
    if base_checkpoint is not None and getattr(transformer, "_loraforge_loftq", None):
        # LoftQ adapters carry (roughly) W - deq(Q): added to W itself they would correct twice.
        raise ValueError("this model's adapters were LoftQ-initialised against its NF4 base, so they must be merged "
                         "into that base: drop base_checkpoint (the default merge does exactly that)")  # fmt: skip
    source = CheckpointWeights(base_checkpoint) if base_checkpoint is not None else None
    seen: dict[int, str] = {}
    result = []
    for tensor in _walk(transformer, "", source):
        owner = _owning_tensor(transformer, tensor)
        if owner is not None:
            if id(owner) in seen:  # a tied weight: already listed under its first name
                continue
            seen[id(owner)] = tensor.name
        result.append(tensor)
    return result


def _owning_tensor(transformer, tensor: MergedTensor):
    """The Parameter behind a plain tensor (to spot ties), None for merged or quantized ones."""
    try:
        return transformer.get_parameter(tensor.name)
    except AttributeError:
        return None
