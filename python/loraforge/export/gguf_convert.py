"""save_pretrained_gguf: a (LoRA) model written as GGUF files that llama.cpp and Ollama load.

    save_pretrained_gguf(model, "out", tokenizer, quantization_method=["q8_0", "q4_k_m"])
    # -> out/out.Q8_0.gguf, out/out.Q4_K_M.gguf, and an Ollama Modelfile next to each

LoRA adapters are merged first, in float32, one tensor at a time (merged_weights.py). Every tensor
is then renamed and rewritten for llama.cpp (gguf_arch.py), given the ggml type llama.cpp's own
quantize tool would choose for the mix (gguf_mixes.py), packed byte for byte as llama.cpp packs it
(loraforge.gguf, and the gguf package's Q5_0/Q5_1 for row-length fallbacks), and streamed into all
requested files in one pass: the merged model is never held in memory as a whole. Files are written
under temporary names and renamed when complete.

Quantized types (Q8_0, Q4_0, Q2_K..Q6_K) are packed on a GPU when one is usable (`pack_device`,
"auto" by default) and on the CPU otherwise; both run the same per-block code, so the files are
byte-identical either way. On the GPU the K-quant searches of an 8B model take seconds instead of
minutes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from loraforge import _native
from loraforge import gguf as lf_gguf
from loraforge.export.atomic import atomic_file, ensure_free_space, refuse_existing_file
from loraforge.export.gguf_arch import (
    GGUFArchitecture,
    architecture_for,
    llama3_rope_factors,
    needs_rope_freqs,
    permute_for_pairwise_rope,
    write_architecture_metadata,
)
from loraforge.export.gguf_mixes import ModelShape, QuantizationMix, plan_tensor_types, resolve_mixes
from loraforge.export.gguf_tokenizer import write_tokenizer_metadata
from loraforge.export.merged_weights import MergedTensor, merged_tensors, refuse_sharded, transformer_of
from loraforge.export.modelfile import modelfile_paths, write_modelfiles

__all__ = [
    "PlannedTensor",
    "encode_tensor",
    "gguf_file_name",
    "plan_gguf_tensors",
    "resolve_pack_device",
    "save_pretrained_gguf",
]


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF file: its llama.cpp name, shape (numpy order) and how to compute it."""

    name: str
    shape: tuple[int, ...]
    # float32, contiguous, in llama.cpp's layout: a torch tensor on the model's device, or numpy
    values: Callable[[], torch.Tensor | np.ndarray]


def gguf_file_name(model_name: str, mix: QuantizationMix) -> str:
    return f"{model_name}.{mix.name}.gguf"


def _rewrite(tensor: MergedTensor, gguf_name: str, arch: GGUFArchitecture, config) -> Callable[[], np.ndarray]:
    """The loader for one tensor with llama.cpp's rewrites applied (Q/K permutation, norm offset)."""
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    heads = None
    if arch.permute_qk and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        heads = n_heads if ".attn_q." in gguf_name else n_kv_heads
    offset = arch.norm_offset if arch.is_norm(gguf_name) else 0.0

    def load() -> torch.Tensor:
        value = tensor.load().detach()
        if heads is not None:
            value = permute_for_pairwise_rope(value, heads)
        if offset:
            value = value + offset
        return value.to(torch.float32).contiguous()  # stays on the model's device

    return load


def plan_gguf_tensors(model, arch: GGUFArchitecture | None = None, base_checkpoint=None) -> list[PlannedTensor]:
    """Every tensor of the GGUF file for `model` (a PEFT LoRA model or a transformers model); NF4 bases
    from the 16-bit `base_checkpoint` folder when given (merged_weights)."""
    transformer = transformer_of(model)
    config = transformer.config
    arch = arch or architecture_for(config)
    planned = []
    for tensor in merged_tensors(model, base_checkpoint):
        gguf_name = arch.gguf_tensor_name(tensor.name)
        if gguf_name == "output.weight" and arch.always_tied:
            raise NotImplementedError(
                f"llama.cpp's {arch.gguf_name} architecture always uses the embedding matrix as the output "
                "projection, but this model's lm_head is a separate (untied) weight"
            )
        planned.append(PlannedTensor(gguf_name, tensor.shape, _rewrite(tensor, gguf_name, arch, config)))
    return planned


def _rope_freqs_tensor(config) -> PlannedTensor:
    factors = llama3_rope_factors(config)
    return PlannedTensor("rope_freqs.weight", factors.shape, lambda: factors)


def _byte_layout(shape: tuple[int, ...], type_name: str) -> tuple[tuple[int, ...], int]:
    """(the byte shape GGUFWriter expects, total bytes) for a tensor of `shape` stored as `type_name`."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    row_bytes = shape[-1] // block_elems * block_bytes
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return (*shape[:-1], row_bytes), rows * row_bytes


def _packs_on_gpu(type_name: str) -> bool:
    t = lf_gguf.TYPES.get(type_name)
    return t is not None and t.packed


def encode_tensor(values: np.ndarray | torch.Tensor, type_name: str) -> np.ndarray:
    """float32 values -> the bytes llama.cpp stores for `type_name` (uint8, one row per matrix row).

    values: a numpy array or a torch tensor. A CUDA tensor is packed on its GPU when loraforge packs
    `type_name` (Q8_0, Q4_0, Q2_K..Q6_K); everything else is encoded on the CPU. The bytes are the
    same either way."""
    if isinstance(values, torch.Tensor):
        matrix = values.detach().reshape(-1, values.shape[-1])
        if matrix.device.type == "cuda" and _packs_on_gpu(type_name):
            return lf_gguf.quantize(matrix, type_name).cpu().numpy()
        values = matrix.to("cpu", torch.float32).numpy()
    matrix = values.reshape(-1, values.shape[-1])
    if type_name in lf_gguf.TYPES:
        return lf_gguf.quantize(matrix, type_name)
    # Q5_0 / Q5_1 appear only as llama.cpp's fallbacks for rows that K-quants cannot pack; the gguf
    # package's reference quantizers produce the same bytes as ggml's (checked in the tests).
    return gguf.quants.quantize(matrix, gguf.GGMLQuantizationType[type_name])


class _GGUFFile:
    """One output file: its writer (metadata and tensor table written up front) and tensor types."""

    def __init__(self, path: Path, mix: QuantizationMix, arch: GGUFArchitecture, types: dict[str, str]):
        self.path, self.mix, self.types = path, mix, types
        self.writer = gguf.GGUFWriter(path=None, arch=arch.gguf_name)

    def write_header(self, tensors: list[PlannedTensor], path: Path) -> None:
        for tensor in tensors:
            type_name = self.types[tensor.name]
            byte_shape, nbytes = _byte_layout(tensor.shape, type_name)
            self.writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes,
                                        raw_dtype=gguf.GGMLQuantizationType[type_name])  # fmt: skip
        self.writer.write_header_to_file(path=path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write_tensor(self, tensor: PlannedTensor, values: _TensorValues) -> None:
        self.writer.write_tensor_data(values.encode(self.types[tensor.name]))

    def size(self, tensors: list[PlannedTensor]) -> int:
        return sum(_byte_layout(t.shape, self.types[t.name])[1] for t in tensors)


def resolve_pack_device(pack_device="auto") -> torch.device | None:
    """The CUDA device save_pretrained_gguf packs quantized tensors on, or None for the CPU.

    "auto" (or None): the current CUDA device when torch sees one and loraforge._core has CUDA
    kernels for it, else the CPU. "cpu": the CPU. "cuda", "cuda:1" or a torch.device: that GPU, with
    a RuntimeError when it cannot be used."""
    if pack_device is None or (isinstance(pack_device, str) and pack_device.strip().lower() == "auto"):
        if not (torch.cuda.is_available() and _native.cuda_kernels_built()):
            return None
        device = torch.device("cuda", torch.cuda.current_device())
        try:
            _native.require_cuda_kernels(device)
        except RuntimeError:  # _core holds no code for this GPU: pack on the CPU
            return None
        return device
    try:
        device = torch.device(pack_device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"pack_device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {pack_device!r}")
    if device.type == "cpu":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(f"pack_device={pack_device!r}, but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    _native.require_cuda_kernels(device)
    return device


class _TensorValues:
    """One tensor's values, encoded for each file that asks: quantized types on the packing GPU
    (the GPU the tensor is already on, else `gpu`), everything else from one host copy."""

    def __init__(self, values: torch.Tensor | np.ndarray, gpu: torch.device | None):
        self.values = values
        on_gpu = isinstance(values, torch.Tensor) and values.device.type == "cuda"
        self.gpu = (values.device if on_gpu else gpu) if gpu is not None else None
        self.host: np.ndarray | None = None

    def encode(self, type_name: str) -> np.ndarray:
        if self.gpu is not None and _packs_on_gpu(type_name):
            values = self.values
            if isinstance(values, np.ndarray):
                values = torch.from_numpy(values)
            self.values = values.to(self.gpu)  # a no-op once it is there
            return encode_tensor(self.values, type_name)
        if self.host is None:
            values = self.values
            if isinstance(values, torch.Tensor):
                values = values.to("cpu", torch.float32).numpy()
            self.host = np.ascontiguousarray(values)
        return encode_tensor(self.host, type_name)


def _write_metadata(writer: gguf.GGUFWriter, config, arch, tokenizer, vocab_size, model_name, mix, pre_tokenizer):
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(mix.file_type)
    write_architecture_metadata(writer, config, arch, vocab_size)
    write_tokenizer_metadata(writer, tokenizer, vocab_size, pre_tokenizer)


def save_pretrained_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer,
    quantization_method="q8_0",
    *,
    overwrite: bool = False,
    model_name: str | None = None,
    pre_tokenizer: str | None = None,
    write_modelfile: bool = True,
    pack_device="auto",
    base_checkpoint=None,
) -> list[str]:
    """Write `model` as one GGUF file per quantization method into `save_directory`.

    quantization_method: a name or a list of names among f32, f16, bf16, q8_0, q4_0, q2_k, q3_k_s,
        q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (Unsloth's "not_quantized",
        "fast_quantized" and "quantized" mean f16, q8_0 and q4_k_m). Each file holds exactly the
        tensor types llama.cpp's quantize tool chooses for that mix.
    model_name: the file stem and general.name; defaults to save_directory's folder name.
    pre_tokenizer: llama.cpp's pre-tokenizer name, when it cannot be told from the tokenizer.
    write_modelfile: also write an Ollama Modelfile per GGUF (`<file>.Modelfile`) and `Modelfile`
        for the first one.
    overwrite: replace existing files of the same names; without it they are refused.
    pack_device: where the quantized types are packed. "auto" (the default): on a GPU when torch sees
        one and loraforge._core has CUDA kernels for it, else on the CPU. "cuda", "cuda:N" or a
        torch.device: on a GPU (RuntimeError when none is usable). "cpu": on the CPU. On the GPU, a
        weight of a model that is on a GPU is packed where it is; one on the CPU is moved to the chosen
        (or current) GPU. The files are byte-identical whichever packs them.

    base_checkpoint: for a 4-bit model, the local folder of its 16-bit checkpoint: the original
        weights, not the NF4-rounded ones, are merged and exported (as in save_pretrained_merged).

    Returns the paths of the GGUF files, in the order of quantization_method.
    """
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer: a GGUF file carries the vocabulary")
    refuse_sharded(model, "save_pretrained_gguf")
    mixes = resolve_mixes(quantization_method)
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    model_name = model_name or directory.resolve().name or "model"
    transformer = transformer_of(model)
    config = transformer.config
    arch = architecture_for(config)

    tensors = plan_gguf_tensors(model, arch, base_checkpoint)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"two tensors map to the same GGUF name: {sorted(n for n in names if names.count(n) > 1)}")
    embedding = next(t for t in tensors if t.name == "token_embd.weight")
    vocab_size = embedding.shape[0]
    if needs_rope_freqs(config, arch):
        tensors.insert(0, _rope_freqs_tensor(config))

    model_shape = ModelShape(arch.gguf_name, config.num_hidden_layers, config.num_attention_heads,
                             getattr(config, "num_key_value_heads", None) or config.num_attention_heads)  # fmt: skip
    shapes = {t.name: t.shape for t in tensors}
    targets = [directory / gguf_file_name(model_name, mix) for mix in mixes]
    for target in targets:  # every refusal before anything is written
        refuse_existing_file(target, overwrite)
    if write_modelfile:
        for target, _ in modelfile_paths(targets):
            refuse_existing_file(target, overwrite)
    files = [
        _GGUFFile(target, mix, arch, plan_tensor_types(mix, shapes, model_shape)) for target, mix in zip(targets, mixes)
    ]
    # Metadata first: a tokenizer or config the export cannot represent fails before any file exists.
    for file in files:
        _write_metadata(file.writer, config, arch, tokenizer, vocab_size, model_name, file.mix, pre_tokenizer)
    ensure_free_space(directory, sum(f.size(tensors) for f in files), f"{len(files)} GGUF file(s)")
    gpu = resolve_pack_device(pack_device)

    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(atomic_file(f.path, overwrite)) for f in files]
        try:
            for file, temporary in zip(files, temporaries):
                file.write_header(tensors, temporary)
            for tensor in tensors:
                values = _TensorValues(tensor.values(), gpu)
                for file in files:
                    file.write_tensor(tensor, values)
                del values
        finally:
            for file in files:
                file.writer.close()

    paths = [str(target) for target in targets]
    if write_modelfile:
        write_modelfiles(model, tokenizer, paths, overwrite=overwrite)
    return paths
