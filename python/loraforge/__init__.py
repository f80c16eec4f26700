"""loraforge: fast, exact QLoRA / LoRA fine-tuning of open LLMs on one GPU, and export.

Importing loraforge registers its torch.library ops (torch.ops.loraforge.*). It works on a
machine without a GPU and with a `_core` built without CUDA; asking such a build for a CUDA
kernel raises an error that says how to rebuild. The model and data APIs load lazily, so that
`import loraforge` does not pull in transformers and PEFT until they are used.
"""

from loraforge import (
    nf4,
    ops,  # noqa: F401  (registers the ops)
)
from loraforge._allocator import prefer_expandable_segments
from loraforge._native import cuda_architectures, cuda_kernels_built

prefer_expandable_segments()  # (importing torch and registering ops start no CUDA: see _allocator.py)

__version__ = "0.1.0"

_LAZY = {
    "FastLanguageModel": "loraforge.models",
    "is_bfloat16_supported": "loraforge.models",
    "get_chat_template": "loraforge.data",
    "standardize_sharegpt": "loraforge.data",
    "train_on_responses_only": "loraforge.data",
    "save_pretrained_merged": "loraforge.export",
    "save_pretrained_gguf": "loraforge.export",
    "push_to_hub_merged": "loraforge.export",
    "push_to_hub_gguf": "loraforge.export",
    "PatchFastRL": "loraforge.train.patch_fast_rl",
    "GRPOTrainer": "loraforge.train.grpo",
    "fast_generate": "loraforge.generation",
    "stream_base_weights": "loraforge.models.weight_streaming",
    "unstream_base_weights": "loraforge.models.weight_streaming",
}

__all__ = ["nf4", "cuda_kernels_built", "cuda_architectures", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in ("rewards", "distributed", "export", "data", "models", "train", "generation"):
        import importlib

        return importlib.import_module(f"loraforge.{name}")
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
