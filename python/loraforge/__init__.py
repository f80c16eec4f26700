"""loraforge: fast, exact QLoRA / LoRA fine-tuning of open LLMs on one GPU, and export.

Importing loraforge registers its torch.library ops (torch.ops.loraforge.*). It works on a
machine without a GPU and with a `_core` built without CUDA; asking such a build for a CUDA
kernel raises an error that says how to rebuild.
"""

from loraforge import ops  # noqa: F401  (registers the ops)
from loraforge import nf4
from loraforge._native import cuda_architectures, cuda_kernels_built

__version__ = "0.1.0"
__all__ = ["nf4", "cuda_kernels_built", "cuda_architectures", "__version__"]
