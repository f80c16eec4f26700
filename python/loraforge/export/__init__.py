"""Export: LoRA merging, GGUF conversion for llama.cpp, and Ollama Modelfiles.

    from loraforge.export import save_pretrained_merged, save_pretrained_gguf

    save_pretrained_merged(model, "merged", tokenizer, save_method="merged_16bit")
    save_pretrained_gguf(model, "gguf", tokenizer, quantization_method=["q8_0", "q4_k_m"])

`attach_export_methods(model)` binds both as methods, so Unsloth-style notebooks can call
`model.save_pretrained_merged(...)` / `model.save_pretrained_gguf(...)`.
"""

from __future__ import annotations

import types

from loraforge.export.gguf_convert import save_pretrained_gguf
from loraforge.export.gguf_mixes import MIXES as GGUF_QUANTIZATION_METHODS
from loraforge.export.merge import SAVE_METHODS, save_pretrained_merged

__all__ = [
    "GGUF_QUANTIZATION_METHODS",
    "SAVE_METHODS",
    "attach_export_methods",
    "save_pretrained_gguf",
    "save_pretrained_merged",
]


def attach_export_methods(model):
    """Bind save_pretrained_merged and save_pretrained_gguf to `model` (an instance, not its class)."""
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.save_pretrained_gguf = types.MethodType(save_pretrained_gguf, model)
    return model
