"""Multi-GPU LoRA / QLoRA training through PyTorch's own distributed engine: DDP and FSDP2.

Nothing here moves a tensor between processes by itself: DDP (`torch.nn.parallel`) and FSDP2
(`torch.distributed.fsdp.fully_shard`) do the communication; these helpers only set them up the
way a LoRA model wants them. Launch with torchrun or accelerate as usual, e.g.

    torchrun --nproc_per_node=8 train.py

    from loraforge import FastLanguageModel
    from loraforge.distributed import init_distributed, prepare_ddp, save_on_main, unwrap_model

    init_distributed()                      # picks NCCL on GPUs, gloo on CPU; sets this rank's GPU
    model, tok = FastLanguageModel.from_pretrained(path, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)
    ddp = prepare_ddp(model)                # only the LoRA adapters are all-reduced
    ... train on this rank's share of every batch ...
    save_on_main(unwrap_model(ddp).save_pretrained)("adapter")   # written once, by rank 0

Losses: DDP and FSDP2 average gradients over ranks. With equal-sized shares and mean losses that
average is the full-batch gradient. With padding or masks (unequal target counts), sum the loss
and divide by `data_parallel_num_items(labels)` instead (see there).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "WorldInfo",
    "barrier",
    "data_parallel_num_items",
    "gather_trainable_state_dict",
    "init_distributed",
    "is_main_process",
    "prepare_ddp",
    "prepare_fsdp2",
    "save_on_main",
    "unwrap_model",
    "world_info",
]


# --------------------------------------------------------------------------------------------
# Who am I
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldInfo:
    rank: int  # this process among all processes
    local_rank: int  # this process among those on its machine (= its GPU index)
    world_size: int


def _is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_info() -> WorldInfo:
    """Rank, local rank and world size: from the process group when there is one, else from the
    variables torchrun / accelerate set, else a single process (0, 0, 1)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _is_initialized():
        return WorldInfo(dist.get_rank(), local_rank, dist.get_world_size())
    return WorldInfo(int(os.environ.get("RANK", "0")), local_rank, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """True on rank 0 and in a plain single-process run."""
    return world_info().rank == 0


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> WorldInfo:
    """Start the default process group from the launcher's environment (once; later calls return).

    backend None: NCCL when CUDA is available, else gloo. On GPUs the current device is set to
    LOCAL_RANK first, so that from_pretrained (which loads onto the current device) and NCCL put
    each rank on its own GPU. A single process without a launcher gets no process group.
    """
    info = world_info()
    if _is_initialized() or ("RANK" not in os.environ and info.world_size == 1):
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend=backend, **kwargs)
    return world_info()


def barrier() -> None:
    """dist.barrier() when there is a process group; nothing in a single process."""
    if _is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------


def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def _frozen_names(model: torch.nn.Module) -> list[str]:
    # named_modules + recurse=False gives the fully qualified names DDP matches its ignore list
    # against (named_parameters() would hide a tied weight's second name).
    return [f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules()
            for name, param in module.named_parameters(recurse=False) if not param.requires_grad]  # fmt: skip


def prepare_ddp(model: torch.nn.Module, **ddp_kwargs) -> torch.nn.parallel.DistributedDataParallel:
    """Wrap a (PEFT LoRA) model in torch DDP so that only the trainable adapters communicate.

    - DDP's reducer only ever holds parameters that require grad, so frozen base weights (16-bit
      or NF4) are never all-reduced; the fused LoRA functions take A and B as autograd inputs, so
      DDP's per-parameter gradient hooks fire as with any module.
    - Frozen weights are also left out of DDP's start-up broadcast: every rank loads them from the
      same checkpoint, so broadcasting them would send the whole model once more (for NF4, packed
      bytes without their quantization state, which is not a parameter). Adapters are still
      broadcast from rank 0, so all ranks start from the same A and B whatever their seeds.
    - Buffers are not re-broadcast from rank 0 before every forward, as DDP does by default:
      decoder LLMs have no running statistics, and a rank's RoPE buffers (dynamic scaling) depend
      on its own sequence lengths.

    prepare_ddp moves nothing: the model must already be on this rank's device (see
    init_distributed). ddp_kwargs go to DistributedDataParallel and override these defaults.
    Build the optimizer over `ddp.parameters()` or the model's, it is the same tensors.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not _is_initialized():
        raise RuntimeError("prepare_ddp needs a process group: launch with torchrun and call init_distributed()")
    if not _trainable_names(model):
        raise ValueError("the model has no trainable parameters: attach adapters (get_peft_model) before prepare_ddp")
    # DDP's own (static, documented) way to name parameters it must leave alone.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, _frozen_names(model))
    device = next(p for p in model.parameters() if p.requires_grad).device
    defaults: dict = {"device_ids": [device.index]} if device.type == "cuda" else {}
    # torch 2.13 renamed the per-forward buffer sync; older versions only know broadcast_buffers.
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    defaults["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return DistributedDataParallel(model, **{**defaults, **ddp_kwargs})


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 wraps nothing: its model is the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def data_parallel_num_items(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """num_items_in_batch for one rank's share, such that DDP/FSDP averaging gives the gradient of
    the whole global batch's loss.

    Rank r's loss is S_r / M with S_r its summed token loss. Data parallelism averages gradients
    over the W ranks, giving (S_1 + ... + S_W) / (W M); the full-batch loss is (S_1 + ... + S_W) / N
    with N the targets of all ranks, so M = N / W. N counts labels[..., 1:] != ignore_index, the
    targets the causal-LM loss has after shifting by one. Collective: every rank must call it.
    """
    count = (labels[..., 1:] != ignore_index).sum().to(torch.float32)
    world_size = 1
    if _is_initialized():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    return count / world_size


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


def _decoder_layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names transformers lists as never to be split across devices: its decoder layers
    (e.g. {"LlamaDecoderLayer"}), the natural unit to shard and all-gather at a time."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from loraforge.models.base_weight import is_linear4bit

    # `"weight" in _parameters`: the bitsandbytes layer itself, not PEFT's LoRA wrapper around it
    # (which shows its base layer's weight through a property).
    return [module for module in model.modules() if "weight" in module._parameters and is_linear4bit(module)]


def _unsharded_4bit_weight_is_readable(layer: torch.nn.Module) -> bool:
    """Whether loraforge's fused LoRA path can read a Linear4bit the way FSDP2 hands it over.

    When fully_shard all-gathers a layer it installs a plain nn.Parameter holding the packed bytes
    in place of the bitsandbytes Params4bit, so the weight's quant_state is gone (the Linear4bit
    module keeps its own copy in `quant_state`, bitsandbytes sets it for this reason). We rebuild
    that situation on a shallow copy of one layer and compare what the base-weight reader gives."""
    import copy

    from loraforge.models.base_weight import dense_weight

    if getattr(layer, "quant_state", None) is None:
        return False
    stand_in = copy.copy(layer)
    plain = torch.nn.Parameter(layer.weight.data, requires_grad=False)
    stand_in._parameters = {**layer._parameters, "weight": plain}
    try:
        got = dense_weight(stand_in, torch.float32)
    except Exception:  # noqa: BLE001  (any failure means: not readable)
        return False
    expected = dense_weight(layer, torch.float32)
    return got.shape == expected.shape and torch.equal(got, expected)


def _storage_dtype(mp_policy) -> torch.dtype:
    """The float dtype the packed NF4 bytes are held in under FSDP2: the mixed-precision param_dtype
    (so FSDP2 casts nothing), else bfloat16."""
    dtype = getattr(mp_policy, "param_dtype", None) or torch.bfloat16
    if not dtype.is_floating_point:
        raise ValueError(f"mp_policy.param_dtype must be a floating-point dtype, got {dtype}")
    return dtype


def _hold_packed_as_float(layers: list[torch.nn.Module], dtype: torch.dtype) -> None:
    """Re-view each Linear4bit's packed codes [bytes, 1] as `dtype` [bytes / itemsize, 1], in place:
    the same memory, the same bytes (nf4.packed_as_bytes reads them back), a dtype FSDP2 can shard."""
    from loraforge import nf4
    from loraforge.models.base_weight import packed_codes

    itemsize = dtype.itemsize
    for layer in layers:
        weight = layer._parameters["weight"]
        packed = packed_codes(weight)
        if packed.dtype == dtype:
            continue
        raw = nf4.packed_as_bytes(packed)
        if raw.numel() % itemsize:
            raise ValueError(f"a 4-bit weight of {raw.numel()} bytes cannot be held as {dtype} for FSDP2 "
                             f"(needs a multiple of {itemsize} bytes); pass an mp_policy with a 16-bit "
                             "param_dtype or load with load_in_4bit=False")  # fmt: skip
        weight.data = raw.view(dtype).reshape(-1, 1)
        for holder in (weight, layer):  # bitsandbytes' own record of the storage dtype
            if hasattr(holder, "quant_storage"):
                holder.quant_storage = dtype


FSDP2_4BIT_UNSUPPORTED = (
    "FSDP2 with 4-bit (NF4 Linear4bit) base weights is not supported yet: fully_shard can shard the "
    "packed bytes, but when it all-gathers a layer it replaces each bitsandbytes Params4bit by a "
    "plain parameter without its quantization state, which loraforge's fused LoRA path does not "
    "read. Train QLoRA with prepare_ddp (4-bit weights replicate cheaply: about 5.5 GiB for an 8B "
    "model), or load with load_in_4bit=False to shard 16-bit weights with prepare_fsdp2."
)


def prepare_fsdp2(model: torch.nn.Module, *, layer_classes: set[str] | None = None, **fully_shard_kwargs):
    """Shard a LoRA model with FSDP2: `fully_shard` on every decoder layer, then on the root.

    Each rank then holds 1/W of every weight, base and adapter; a layer's weights are all-gathered
    just before its forward (and again for backward), and the adapters' gradients are
    reduce-scattered, averaged over ranks. Frozen base weights share their layer's unit with its
    trainable adapters: FSDP2 handles mixed requires_grad, and only the adapters get gradients.

    layer_classes: class names to shard one by one; default: the model's `_no_split_modules`
    (its decoder layers). fully_shard_kwargs (mesh, reshard_after_forward, mp_policy,
    offload_policy, ...) go to every fully_shard call.

    The model is changed in place (fully_shard turns parameters into DTensors and the class of
    each sharded module into an FSDP subclass) and returned. Build the optimizer afterwards.
    Save adapters with `gather_trainable_state_dict` on every rank, then `save_on_main`.

    4-bit (NF4) base weights: their packed bytes are re-viewed as a 16-bit float storage first
    (`_hold_packed_as_float`, what bitsandbytes calls quant_storage), because FSDP2 before torch
    2.13 makes every sharded parameter with requires_grad=True, which an integer tensor refuses
    ("only Tensors of floating point dtype can require gradients", seen with torch 2.11 on an H100).
    The storage dtype is the mp_policy's param_dtype where one is given, so that mixed precision has
    nothing to cast (a cast would turn the codes into other bytes). FSDP2 then all-gathers the unit
    as raw bytes and installs a plain parameter in place of each Params4bit; loraforge's
    base-weight reader takes the quantization state from the Linear4bit module then. Where it cannot
    (`_unsharded_4bit_weight_is_readable`) this raises NotImplementedError (FSDP2_4BIT_UNSUPPORTED).
    """
    from torch.distributed.fsdp import fully_shard

    if not _is_initialized():
        raise RuntimeError("prepare_fsdp2 needs a process group: launch with torchrun and call init_distributed()")
    if not _trainable_names(model):
        raise ValueError("the model has no trainable parameters: attach adapters (get_peft_model) before prepare_fsdp2")
    quantized = _linear4bit_layers(model)
    if quantized:
        if not _unsharded_4bit_weight_is_readable(quantized[0]):
            raise NotImplementedError(FSDP2_4BIT_UNSUPPORTED)
        _hold_packed_as_float(quantized, _storage_dtype(fully_shard_kwargs.get("mp_policy")))
    classes = layer_classes if layer_classes is not None else _decoder_layer_classes(model)
    layers = [module for module in model.modules() if type(module).__name__ in classes]
    if not layers:
        raise ValueError(f"no module of the classes {sorted(classes)} to shard; pass layer_classes= "
                         "with the class name of the model's decoder layers")  # fmt: skip
    for layer in layers:
        fully_shard(layer, **fully_shard_kwargs)
    # The root holds what is left (embeddings, final norm, lm_head) and drives the others' hooks.
    fully_shard(model, **fully_shard_kwargs)
    return model


def gather_trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies, on the CPU, of every trainable parameter, keyed as in the model's
    state_dict: for PEFT, what `save_pretrained(path, state_dict=...)` writes as the adapter.

    Under FSDP2 this all-gathers each adapter (a collective: call it on every rank, in the same
    order); under DDP or in one process it just copies. The base weights are never gathered."""
    from torch.distributed.tensor import DTensor

    model = unwrap_model(model)
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = full.detach().to("cpu", copy=True)
    return state


# --------------------------------------------------------------------------------------------
# Writing once
# --------------------------------------------------------------------------------------------


def finish_distributed() -> None:
    """At the end of a launched run: wait for every rank, then tear the process group down. Neither
    the Trainer nor accelerate does; with gloo a rank that exits with the group alive can abort
    (SIGABRT) after all its work is done, and the launcher then kills the others. No-op without a group."""
    if _is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def save_on_main(fn):
    """Wrap `fn` (a save or export) so that, called on every rank, it runs on rank 0 only.

    Every rank returns only after rank 0 has finished, so files exist when any rank goes on;
    rank 0 gets fn's result, the others None. If fn fails on rank 0, every rank raises (the
    others a RuntimeError naming the error) instead of waiting forever. Usable as a decorator.
    In a single process fn just runs. fn must not itself call collectives (gather first, on every
    rank: see gather_trainable_state_dict). The other ranks wait within the process group's
    timeout: raise it (init_distributed(timeout_s=...)) for exports longer than that.
    """

    @functools.wraps(fn)
    def run_on_main(*args, **kwargs):
        if not _is_initialized() or dist.get_world_size() == 1:
            return fn(*args, **kwargs)
        result, failure = None, None
        if dist.get_rank() == 0:
            try:
                result = fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (reported to every rank below, then re-raised)
                failure = error
        # The broadcast is the barrier: no rank passes it before rank 0 has sent its outcome.
        outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', 'save')}: {outcome[0]}")
        return result

    return run_on_main
