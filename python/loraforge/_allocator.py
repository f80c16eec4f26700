"""CUDA's caching allocator with expandable segments, on request (LORAFORGE_EXPANDABLE_SEGMENTS=1).

Why: a QLoRA step's working set changes shape from layer to layer (prefetched layer inputs, kept layers,
the loss), and the default allocator answers a request that no free block fits with a new segment from
the driver (cudaMalloc, which synchronises). On the 8B step (H100, 2026-12-07, d33dd5f and 9d4b27e,
benchmarks/results/train_step.csv) the defaults still took 23 and 0 new segments during 8 timed steps and
ran 328.8 and 335.5 ms; with expandable segments (segments that grow in place, mapped page by page) no
call took a new segment, and the steps ran 326.6 and 327.8 ms, spread over 17 and 13 ms instead of 15
and 35, at the same peak (6.85 GiB). Unsloth's import sets the same option.

The setting only takes effect if it is in the environment before CUDA's allocator starts, hence at
`import loraforge`; a process whose CUDA is up already keeps its allocator. A user's own
PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) wins.

Not the default yet: no GPU run has covered it beyond the train step. fast_generate's CUDA-graph decoding
under it is untested here (torch disabled expandable segments for graphs for a while; a failed capture
would fall back to eager decoding with a warning), and vLLM's sleep mode (GRPO with vLLM colocated) refuses
expandable segments. Setting it for every process at import is for when those are tested.
"""

from __future__ import annotations

import os
import sys


def prefer_expandable_segments() -> bool:
    """With LORAFORGE_EXPANDABLE_SEGMENTS=1, put expandable_segments:True in PYTORCH_CUDA_ALLOC_CONF where
    nothing else chose; whether it did."""
    if os.environ.get("LORAFORGE_EXPANDABLE_SEGMENTS", "0") != "1":
        return False
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late: the allocator has read its settings
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True
