"""`PatchFastRL(algorithm, FastLanguageModel)`, so that RL notebooks written for Unsloth run unchanged.

Unsloth's PatchFastRL rewrites TRL's trainer source at run time so that `from trl import GRPOTrainer`
picks up its changes. loraforge rewrites no library source and swaps no library symbols (see
DESIGN.md), so here the call only checks its arguments and that TRL is importable, and returns None.
A notebook keeps working either way:

* `from trl import GRPOConfig, GRPOTrainer` with a loraforge model trains through TRL's own scoring
  (its fused lm_head), with loraforge's fused LoRA forwards inside the model;
* `from loraforge.train.grpo import GRPOTrainer` (same constructor) also scores tokens with
  loraforge's chunked log-probabilities (train/grpo.py).
"""

from __future__ import annotations

# Unsloth accepts these names (case-insensitively); all of them are TRL trainers we can run as they are.
KNOWN_ALGORITHMS = ("grpo", "gspo", "dr_grpo", "dapo", "dpo", "orpo", "kto", "sft", "rloo", "online_dpo")


def PatchFastRL(algorithm: str | None = None, FastLanguageModel=None) -> None:  # Unsloth's name, kept
    """Check the arguments and that TRL imports; otherwise a no-op (see the module docstring)."""
    if algorithm is not None and (not isinstance(algorithm, str) or algorithm.lower() not in KNOWN_ALGORITHMS):
        raise ValueError(f"PatchFastRL: unknown algorithm {algorithm!r}; expected one of "
                         f"{', '.join(a.upper() for a in KNOWN_ALGORITHMS)}")  # fmt: skip
    if FastLanguageModel is not None and not hasattr(FastLanguageModel, "from_pretrained"):
        raise TypeError(f"PatchFastRL: the second argument should be FastLanguageModel, got {FastLanguageModel!r}")
    try:
        import trl  # noqa: F401
    except ImportError as error:
        raise ImportError("PatchFastRL: reinforcement learning trains through TRL; pip install trl") from error
