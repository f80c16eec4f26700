"""llama.cpp (through llama-cpp-python) as the reference that reads our GGUF files."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

GGML_TYPE_F32 = 0


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF reference) is not installed")


def logits(path: str | os.PathLike, ids: list[int], n_ctx: int = 256) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for the token sequence `ids`, evaluated at once.

    The KV cache is kept in F32 (llama.cpp's default is F16), so an F32 file is compared with
    transformers without an extra rounding step in between."""
    lib = llama_cpp()
    llm = lib.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                    n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)  # fmt: skip
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def tokenize(path: str | os.PathLike, texts: list[str], add_bos: bool, special: bool) -> list[list[int]]:
    lib = llama_cpp()
    llm = lib.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special) for text in texts]
    finally:
        llm.close()


def quantize(source: str | os.PathLike, target: str | os.PathLike, file_type: int) -> None:
    """llama.cpp's own quantize tool (llama_model_quantize), no importance matrix."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = 2
    status = lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed with status {status}"


def tensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (ggml type name, shape in ggml order, raw bytes) of every tensor in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), t.data.tobytes()) for t in reader.tensors}


def metadata(path: str | os.PathLike) -> dict[str, object]:
    """Scalar and string metadata of a GGUF file (arrays are left out)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    result = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            result[name] = bytes(value).decode("utf-8")
        else:
            result[name] = value.tolist()[0]
    return result
