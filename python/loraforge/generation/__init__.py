"""Generation: `fast_generate`, model.generate's results from a static KV cache and a CUDA-graph decode step.

settings.py   the call's generation settings, merged as model.generate merges them, or why it falls back
sampling.py   greedy / temperature, top-k, top-p, min-p sampling with static shapes
decode.py     static cache, the decode step, its capture and replay
generate.py   fast_generate itself
"""

from loraforge.generation.generate import fast_generate, release

__all__ = ["fast_generate", "release"]
