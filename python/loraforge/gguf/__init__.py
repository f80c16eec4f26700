"""GGUF support: llama.cpp's tensor block formats, packed byte for byte as llama.cpp packs them.

    from loraforge import gguf
    blocks = gguf.quantize(weight, "q4_k")          # uint8 [rows, cols // 256 * 144]
    blocks = gguf.quantize(weight.cuda(), "q4_k")   # packed on the GPU: a CUDA uint8 tensor, same bytes
    values = gguf.dequantize(blocks, "q4_k", weight.shape)

See `loraforge.gguf.quants` for the types and the exactness contract.
"""

from loraforge.gguf.quants import TYPES, GGUFType, dequantize, quantize, resolve_type, row_bytes

__all__ = ["TYPES", "GGUFType", "dequantize", "quantize", "resolve_type", "row_bytes"]
