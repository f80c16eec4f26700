"""Models: FastLanguageModel and the per-architecture rule tables of the fused forwards."""

from loraforge.models.fast_language_model import FastLanguageModel, is_bfloat16_supported

__all__ = ["FastLanguageModel", "is_bfloat16_supported"]
