"""save_pretrained_merged: a LoRA model saved as a PEFT adapter, or merged into a checkpoint that
AutoModelForCausalLM.from_pretrained loads (16-bit, or NF4 4-bit in bitsandbytes' format).

    save_pretrained_merged(model, "out", tokenizer, save_method="merged_16bit")

Merging is done in float32 from the dequantized base (see merged_weights.py), one layer at a time,
then cast to the model's dtype (merged_16bit) or re-quantized to NF4 (merged_4bit). The checkpoint
is written into a temporary folder next to `save_directory` and renamed into place at the end.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch

from loraforge.export.atomic import atomic_directory, ensure_free_space, refuse_existing_directory
from loraforge.export.merged_weights import MergedTensor, has_lora, merged_tensors, refuse_sharded, transformer_of

__all__ = ["SAVE_METHODS", "merged_dtype", "save_pretrained_merged"]

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit")
# transformers' default shard size; a shard is assembled in memory before it is written.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
NF4_BLOCKSIZE = 64  # bitsandbytes' and transformers' default


def merged_dtype(model) -> torch.dtype:
    """The dtype a merged checkpoint is saved in: the model config's (the compute dtype for 4-bit loads)."""
    transformer = transformer_of(model)
    # Read from the instance dict: transformers 5 warns on every access to the old torch_dtype name.
    settings = vars(transformer.config)
    dtype = settings.get("dtype") or settings.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        embeddings = transformer.get_input_embeddings()
        dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _shard_budget(max_shard_bytes: int, maximum_memory_usage: float | None) -> int:
    """How many bytes one in-memory shard may hold. maximum_memory_usage is the fraction of the
    machine's currently available RAM the export may fill with a shard (Unsloth's knob)."""
    if maximum_memory_usage is None:
        return max_shard_bytes
    if not isinstance(maximum_memory_usage, (int, float)) or not 0 < maximum_memory_usage <= 1:
        raise ValueError(f"maximum_memory_usage must be a fraction in (0, 1], got {maximum_memory_usage!r}")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep the shard size
        return max_shard_bytes
    return max(1, min(max_shard_bytes, int(available * maximum_memory_usage)))


class _ShardWriter:
    """Collects tensors into safetensors shards of at most `budget` bytes, names them
    model-0000i-of-0000N.safetensors (or model.safetensors) and writes the index."""

    def __init__(self, directory: Path, budget: int):
        self.directory, self.budget = directory, budget
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.budget:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / f"shard-{len(self.shards):05d}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        count = len(self.shards)
        for index, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{index:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index_json = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2, sort_keys=True))


def _output_embedding_prefix(transformer) -> str | None:
    head = transformer.get_output_embeddings()
    for name, module in transformer.named_modules():
        if module is head:
            return name
    return None


def _nf4_entries(tensor: MergedTensor, weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The safetensors entries transformers writes for one bitsandbytes Linear4bit weight."""
    from loraforge import nf4

    # Quantized from the weight rounded to the model dtype: exactly what bitsandbytes makes when it
    # loads the merged_16bit checkpoint with load_in_4bit.
    packed, state = nf4.quantize(weight.to(dtype), blocksize=NF4_BLOCKSIZE, compress_statistics=True)
    return nf4.checkpoint_entries(tensor.name, packed, state)


def _write_config(transformer, directory: Path, dtype: torch.dtype, quantized_4bit: bool) -> None:
    config = copy.deepcopy(transformer.config)
    config.architectures = [type(transformer).__name__]
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantized_4bit:
        from loraforge import nf4

        config.quantization_config = nf4.transformers_config(dtype).to_dict()
    config.save_pretrained(directory)
    generation_config = getattr(transformer, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


def _estimated_bytes(tensors: list[MergedTensor], dtype: torch.dtype, quantize_names: set[str]) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for t in tensors:
        # NF4: half a byte per value plus one 8-bit absmax per block of 64.
        total += t.numel // 2 + t.numel // NF4_BLOCKSIZE + 1024 if t.name in quantize_names else t.numel * itemsize
    return total


def _save_lora(model, directory: Path, tokenizer, overwrite: bool) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel) or not has_lora(model):
        raise ValueError("save_method='lora' needs a PEFT model with LoRA adapters (FastLanguageModel.get_peft_model)")
    with atomic_directory(directory, overwrite) as temporary:
        model.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)


def save_pretrained_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    maximum_memory_usage: float | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    base_checkpoint: str | os.PathLike | None = None,
) -> str:
    """Save `model` (a PEFT LoRA model or a plain transformers model) to `save_directory`.

    save_method:
        "lora": the adapter only, as PEFT saves it (adapter_config.json + adapter_model.safetensors).
        "merged_16bit": base + LoRA merged in float32, cast to the model config's dtype (bf16, fp16,
            or fp32 when the model runs in fp32); config.json without quantization_config.
        "merged_4bit": the merged weights re-quantized to NF4 (bitsandbytes Linear4bit format with
            double quantization, blocksize 64; lm_head and non-Linear tensors stay in the model dtype).
            Re-quantizing adds rounding error on top of the adapter's effect; prefer merged_16bit
            unless the 4-bit size matters.
    maximum_memory_usage: fraction (0, 1] of the available RAM one shard may fill before it is
        written; None keeps max_shard_size (5 GB).
    overwrite: replace a non-empty `save_directory`; without it such a folder is refused.
    base_checkpoint: for a 4-bit model, the local folder of the 16-bit checkpoint it was loaded from;
        the merge then starts from those original weights instead of the NF4-rounded ones (nothing
        is lost to 4-bit rounding). Without it, the dequantized NF4 weights are the base.

    The tokenizer, when given, is saved alongside. Returns the directory path.
    """
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {SAVE_METHODS}, got {save_method!r}")
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    refuse_sharded(model, "save_pretrained_merged")
    directory = Path(save_directory)
    refuse_existing_directory(directory, overwrite)
    if save_method == "lora":
        _save_lora(model, directory, tokenizer, overwrite)
        return str(directory)

    budget = _shard_budget(max_shard_size, maximum_memory_usage)
    transformer = transformer_of(model)
    dtype = merged_dtype(model)
    tensors = merged_tensors(model, base_checkpoint)
    quantize_names: set[str] = set()
    if save_method == "merged_4bit":
        warnings.warn(
            "merged_4bit re-quantizes the merged weights to NF4, which adds rounding error to what the adapter "
            "learned; merged_16bit keeps the merge exact up to the 16-bit cast.",
            stacklevel=2,
        )
        head = _output_embedding_prefix(transformer)
        quantize_names = {t.name for t in tensors if t.is_linear_weight and t.module_name != head}
    ensure_free_space(
        directory.parent, _estimated_bytes(tensors, dtype, quantize_names), f"the {save_method} checkpoint"
    )

    with atomic_directory(directory, overwrite) as temporary:
        shards = _ShardWriter(temporary, budget)
        for tensor in tensors:
            value = tensor.load()
            if tensor.name in quantize_names:
                for name, entry in _nf4_entries(tensor, value, dtype).items():
                    shards.add(name, entry)
            else:
                shards.add(tensor.name, value.to(dtype).cpu().contiguous())
            del value
        shards.finish()
        _write_config(transformer, temporary, dtype, quantized_4bit=save_method == "merged_4bit")
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
    return str(directory)
