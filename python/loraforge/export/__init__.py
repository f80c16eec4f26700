"""Export: LoRA merging, GGUF conversion for llama.cpp, and Ollama Modelfiles.

    from loraforge.export import save_pretrained_merged, save_pretrained_gguf

    save_pretrained_merged(model, "merged", tokenizer, save_method="merged_16bit")
    save_pretrained_gguf(model, "gguf", tokenizer, quantization_method=["q8_0", "q4_k_m"])

push_to_hub_merged / push_to_hub_gguf (hub.py) write the same files into a temporary folder and
upload them to a Hugging Face Hub repository. `attach_export_methods(model)` binds all four as
methods, so Unsloth-style notebooks can call `model.save_pretrained_merged(...)`,
`model.save_pretrained_gguf(...)`, `model.push_to_hub_merged(...)` and `model.push_to_hub_gguf(...)`.
"""

from __future__ import annotations

import types

from loraforge.export.gguf_convert import save_pretrained_gguf
from loraforge.export.gguf_mixes import MIXES as GGUF_QUANTIZATION_METHODS
from loraforge.export.hub import push_to_hub_gguf, push_to_hub_merged
from loraforge.export.merge import SAVE_METHODS, save_pretrained_merged

__all__ = [
    "GGUF_QUANTIZATION_METHODS",
    "SAVE_METHODS",
    "attach_export_methods",
    "push_to_hub_gguf",
    "push_to_hub_merged",
    "save_pretrained_gguf",
    "save_pretrained_merged",
]


def attach_export_methods(model):
    """Bind the save_pretrained_* and push_to_hub_* exports to `model` (an instance, not its class)."""
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
    model.push_to_hub_merged = types.MethodType(push_to_hub_merged, model)
    model.push_to_hub_gguf = types.MethodType(push_to_hub_gguf, model)
    return model
