"""The input embedding table kept in pinned host memory and read there by the GPU (`offload_embedding=True`).

Why: a training step reads only its tokens' rows of the input embedding (4,096 tokens of Llama-3 8B: 32 MiB),
yet the table sits whole on the GPU (128,256 x 4,096 bf16: 0.98 GiB), as much as seven decoder layers'
NF4 weights. A frozen table (every LoRA run) need not: kept in pinned host memory, it is still a valid
device address (CUDA's unified virtual addressing maps every page-locked host allocation into the GPU's
address space at the same address), so a CUDA tensor over that address lets torch's own embedding kernel
gather the rows over PCIe, inside the stream's order: no host synchronisation, no copy of the table, no
kernel of ours. The price is the rows' bytes over PCIe once a forward (32 MiB; ~0.6 ms at the 55 GB/s the
H100 machine's pinned copies reach, if the gather's reads stream as well: not yet timed on its own). The
freed GPU memory (0.97 GiB measured on the 8B step) keeps more layers out of the checkpoint, as many as it
pays for at each batch's tokens (train/kept_layer_budget.py; 3 layers at 2 x 2,048 tokens of the 8B model:
330.1 against 344.5 ms a step, 6.80 against 6.85 GiB, H100, benchmarks/results/train_step_limits.md).

Only a frozen table not tied to the output head: the head reads all of it at every step, and a trained
table needs its gradient on the GPU. `restore_input_embeddings(model)` puts the table back on the GPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_HOST_ATTR = "_loraforge_host_table"  # on the embedding module: the pinned host tensor behind its weight


class _DeviceAddress:
    """A pinned host tensor presented through __cuda_array_interface__ (v3), so that torch.as_tensor makes a
    CUDA tensor over the same address. Int16 elements: the interface's typestr has no bfloat16, and the
    caller views the result in the table's own dtype (any 2-byte one; 4-byte ones pass as int32)."""

    def __init__(self, host: torch.Tensor):
        self.host = host  # kept alive by the CUDA tensor, which holds this object until it is freed
        typestr = {2: "<i2", 4: "<i4"}[host.element_size()]
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape), "typestr": typestr, "data": (host.data_ptr(), False),
            "strides": None, "version": 3, "stream": None,  # None: no stream to wait for (the copy is done)
        }  # fmt: skip


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    integer = {2: torch.int16, 4: torch.int32}[host.element_size()]
    with torch.cuda.device(device):
        view = torch.as_tensor(_DeviceAddress(host), device=device)
    if view.data_ptr() != host.data_ptr() or view.dtype != integer:
        raise RuntimeError("torch did not wrap the pinned table at its own address; offload_embedding is not "
                           "available with this torch build")  # fmt: skip
    return view.view(host.dtype)


def _embedding_of(model: torch.nn.Module):
    """model.get_input_embeddings(), or None where the model has no such method."""
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def _input_embedding(model: torch.nn.Module) -> torch.nn.Module:
    embedding = _embedding_of(model)
    if not isinstance(embedding, torch.nn.Embedding):
        raise TypeError("offload_embedding needs a model whose get_input_embeddings() is a torch.nn.Embedding, "
                         f"got {type(embedding).__name__}")  # fmt: skip
    return embedding


def is_offloaded(model: torch.nn.Module) -> bool:
    """Whether `model`'s input embedding table lives in host memory (offload_input_embeddings)."""
    return _reads_host_table(_embedding_of(model))


def offloaded_table_bytes(model: torch.nn.Module) -> int:
    """The bytes of `model`'s input embedding table that live in host memory instead of on the GPU (0 where it
    is not offloaded): the room train/kept_layer_budget.py spends on layers kept out of the checkpoint."""
    embedding = _embedding_of(model)
    if not _reads_host_table(embedding):
        return 0
    return embedding.weight.numel() * embedding.weight.element_size()


def _reads_host_table(embedding) -> bool:
    """Whether the module's weight is still the CUDA view of its pinned table (a move such as model.cpu() or
    model.half() since the offload made it an ordinary tensor elsewhere)."""
    host = getattr(embedding, _HOST_ATTR, None)
    weight = getattr(embedding, "weight", None)
    return host is not None and weight is not None and weight.is_cuda and weight.data_ptr() == host.data_ptr()


def _refusal(model: torch.nn.Module, embedding: torch.nn.Module):
    """Why `model`'s table cannot go to host memory, as the exception to raise; None when it can."""
    weight = embedding.weight
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # (DDP broadcasts every parameter at wrap time, FSDP2 shards them: neither is tested on a table
        # that only has a host address)
        return NotImplementedError("offload_embedding with torch.distributed (DDP/FSDP2) is not supported")
    if weight.requires_grad:
        return ValueError("offload_embedding needs a frozen input embedding (it trains here: full_finetuning or "
                          "embed_tokens in modules_to_save); leave offload_embedding=False")  # fmt: skip
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    head_weight = getattr(head, "weight", None)
    if isinstance(head_weight, torch.Tensor) and head_weight.data_ptr() == weight.data_ptr():
        return ValueError("offload_embedding: this model ties its input embedding to the output head, which reads "
                          "the whole table at every step; it stays on the GPU (leave offload_embedding=False)")  # fmt: skip
    if weight.element_size() not in (2, 4) or not weight.is_contiguous():
        return ValueError(f"offload_embedding takes a contiguous 16- or 32-bit table, got {weight.dtype} "
                          f"with strides {weight.stride()}")  # fmt: skip
    if weight.device.type != "cuda":
        return ValueError(f"offload_embedding moves a GPU table to host memory; this model's is on {weight.device} "
                          "(load it on a CUDA device, or leave offload_embedding=False)")  # fmt: skip
    return None


def offload_input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """Move `model`'s input embedding table to pinned host memory, where the GPU reads the rows it needs (see
    the module docstring); returns the embedding module. The table must be on a CUDA device, frozen, and
    not shared with the output head. A second call is a no-op."""
    embedding = _input_embedding(model)
    if _reads_host_table(embedding):
        return embedding
    embedding.__dict__.pop(_HOST_ATTR, None)  # a table moved away since an earlier offload
    refusal = _refusal(model, embedding)
    if refusal is not None:
        raise refusal
    weight = embedding.weight
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    host.copy_(weight.detach())
    view = _device_view(host, weight.device)
    embedding.__dict__[_HOST_ATTR] = host
    embedding.weight = torch.nn.Parameter(view, requires_grad=False)  # the GPU table is freed with the old one
    return embedding


def offload_where_possible(model: torch.nn.Module) -> bool:
    """offload_embedding="auto": offload_input_embeddings where the table qualifies (a frozen, untied 16- or
    32-bit table on a CUDA device, in a single process), and leave it where it is otherwise, silently;
    returns whether the table is in host memory now. "A single process" also excludes a torchrun/accelerate
    launch whose process group is not set up yet (WORLD_SIZE > 1): DDP would later broadcast the table."""
    embedding = _embedding_of(model)
    if not isinstance(embedding, torch.nn.Embedding) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return False
    if not _reads_host_table(embedding) and _refusal(model, embedding) is not None:
        return False
    offload_input_embeddings(model)
    return True


def apply_offload_setting(model: torch.nn.Module, setting) -> None:
    """from_pretrained's offload_embedding (and the SFT/GRPO settings'): True offloads or raises, "auto"
    offloads where the table qualifies, False leaves it."""
    if setting is True:
        offload_input_embeddings(model)
    elif setting == "auto":
        offload_where_possible(model)


def restore_input_embeddings(model: torch.nn.Module) -> None:
    """Undo offload_input_embeddings: the table back in GPU memory. A no-op where it was not offloaded."""
    embedding = _input_embedding(model)
    reads_host = _reads_host_table(embedding)
    host = embedding.__dict__.pop(_HOST_ATTR, None)
    if not reads_host:  # never offloaded, or moved since (the weight is an ordinary tensor already)
        return
    device = embedding.weight.device
    embedding.weight = torch.nn.Parameter(host.to(device), requires_grad=False)
