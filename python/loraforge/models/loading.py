"""Where FastLanguageModel.from_pretrained puts a model, and how it reaches 4 bits.

Device. Under a launcher (torchrun, accelerate launch: LOCAL_RANK is set) every process loads onto
its own GPU, LOCAL_RANK, whether or not init_distributed() has run yet, and device_map="auto" (which
would spread one model over all the host's GPUs, in every process) becomes that one GPU. A single
process loads onto the current GPU. An explicit device_map dict is the caller's and is kept.

4-bit loads of a 16-bit checkpoint. By default transformers loads the 16-bit model into host memory
and loraforge's NF4 kernel quantizes it layer by layer onto the GPU (quantize_model.py). That needs
the whole 16-bit model in host memory, in every process on the host: 140 GB for a 70B model, per
GPU. Where that does not fit (`stream_quantize`), the load goes through transformers' own
bitsandbytes quantizer instead, which quantizes each weight as it is read from the checkpoint, so
host memory holds one tensor at a time. Both give the same bytes, absmax and nested statistics (our
kernel is bit-exact with bitsandbytes'; tests/models/test_loading.py compares the two loads).
"""

from __future__ import annotations

import os

import torch

# A 16-bit load into host memory is taken only while it leaves this share of the available memory
# free (page cache, the tokenizer, the other processes of a multi-GPU job loading at the same time).
HOST_MEMORY_SHARE = 0.6


def launcher_local_rank() -> int | None:
    """LOCAL_RANK when a launcher (torchrun, accelerate launch, deepspeed) started this process."""
    value = os.environ.get("LOCAL_RANK")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def load_device(device_map) -> str:
    """The device a non-quantized or loraforge-quantized load goes to: 'cpu' without CUDA or with
    device_map=None; 'cuda:<LOCAL_RANK>' under a launcher; else the current CUDA device."""
    if device_map is None or not torch.cuda.is_available():
        return "cpu"
    rank = launcher_local_rank()
    if rank is not None and rank < torch.cuda.device_count():
        return f"cuda:{rank}"
    return f"cuda:{torch.cuda.current_device()}"


def transformers_device_map(device_map, device: str):
    """device_map for loads that transformers places (pre-quantized checkpoints, 8-bit, streamed 4-bit):
    'auto' under a launcher is this process's own GPU (`device`), since 'auto' spreads the model over
    every visible GPU in each process; None means `device`; anything else is the caller's choice."""
    if device_map is None:
        return {"": device}
    if device_map == "auto" and launcher_local_rank() is not None:
        return {"": device}
    return device_map


def available_host_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sixteen_bit_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in `dtype`, counted on a meta-device instance (no memory used)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def local_processes() -> int:
    """Processes of this job on this host (torchrun's LOCAL_WORLD_SIZE), each loading its own copy."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def stream_quantize(config, dtype: torch.dtype) -> bool:
    """Whether a 4-bit load of this 16-bit checkpoint should quantize while reading (transformers +
    bitsandbytes) because the 16-bit model, once per process on this host, would not fit in
    HOST_MEMORY_SHARE of the available host memory. Unknown memory: no."""
    available = available_host_memory()
    if available is None:
        return False
    try:
        needed = sixteen_bit_bytes(config, dtype) * local_processes()
    except Exception:  # noqa: BLE001  (a config transformers cannot build here, e.g. remote code: keep the default)
        return False
    return needed > HOST_MEMORY_SHARE * available


def streamed_4bit_arguments(compute_dtype: torch.dtype, device: str, kwargs: dict) -> dict:
    """from_pretrained arguments that quantize each Linear to NF4 (double quantization, uint8 storage:
    the format loraforge's own quantization writes) as transformers reads it, onto `device`."""
    from loraforge import nf4

    if "quantization_config" in kwargs:
        raise ValueError("load_in_4bit=True builds its own quantization_config; pass one or the other")
    return {"device_map": {"": device}, "quantization_config": nf4.transformers_config(compute_dtype)}
